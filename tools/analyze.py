"""
The paper's fig. 2 for a checkpoint: how far a SiT's hidden states are from a pretrained
encoder's, block by block and noise level by noise level. CKNNA (Huh et al. 2024, the Platonic
Representation Hypothesis) between the pooled hidden state after every block at t and the
encoder's pooled features of the clean image, and the top-1 accuracy of a linear probe on every
(t, block) and on the encoder itself. Writes analysis.json and analysis.png (fig. 2a, 2b).

  torchrun --nproc_per_node=8 tools/analyze.py last.pt --data-dir IMAGENET/val \
      --enc-type dinov2-vit-g            # the paper's setting: 10,000 val images, DINOv2-g
  python tools/analyze.py results/repa --data-dir data/imagenet256   # prepared shards

The measures themselves (repa.cknna, repa.linear_probe, repa.block_features) are repa.py's, which
training's --align-every uses too; this file picks the images, gathers the features over ranks,
and reports. tools/demo.py --analyze measures its own checkpoints with its data and target.
"""
import argparse
import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import prepare  # noqa: E402  (the SD-VAE's moments of an image folder)
import evaluate  # noqa: E402  (ADM's crop and the folder walk)
import repa  # noqa: E402
import sample  # noqa: E402
from repa import UserError, atomic_write, barrier, print0  # noqa: E402


@dataclass
class AnalyzeConfig:
    """The flags of tools/analyze.py, generated from these fields as repa.py's are."""
    ckpt: str = ""              # checkpoint or run folder (its newest): ours or an official one
    data_dir: str = "data/imagenet256"  # prepared shards, or an ImageNet-style folder of images
    vae: str = "stabilityai/sd-vae-ft-mse"  # an image folder's latents (the shards': theirs)
    enc_type: str = "dinov2-vit-b"  # encoder(s) to compare with, comma-separated; NAME=PATH
    analyze_images: int = 10_000  # images measured (the paper: 10,000 of ImageNet val)
    analyze_t: str = "0,0.25,0.5,0.75"  # noise levels, comma-separated (t = 0 is data)
    knn: int = 10               # k, the nearest neighbours of CKNNA (the paper's 10)
    probe_epochs: int = 90      # linear probe: epochs over the probe's images (MAE's 90)
    probe_batch: int = 16384    # linear probe: batch size (MAE's; at most the probe's images)
    probe_lr: float = 1e-3      # linear probe: Adam's lr, cosine-decayed to 0
    probe_holdout: float = 0.2  # fraction of the images the probe is tested on
    batch_size: int = 256       # images per forward pass, over all processes
    seed: int = 0               # the images chosen, their noise, the probe's split
    results_dir: str = "results"  # a checkpoint outside a run folder: results_dir/exp_name/analysis
    exp_name: str = "repa"


LIMITS = {
    **{k: (lambda v: v >= 1, "at least 1") for k in (
        "analyze_images", "probe_epochs", "probe_batch", "batch_size")},
    "seed": (lambda v: v >= 0, "at least 0"),
    "knn": (lambda v: v >= 2, "at least 2"),
    "probe_lr": (lambda v: v > 0, "positive"),
    "probe_holdout": (lambda v: 0 < v < 1, "in (0, 1)"),
}
# what does not change the numbers, and so does not name the analysis folder
NOT_SETTINGS = ("ckpt", "batch_size", "results_dir", "exp_name")


def parse_times(text):
    """'0,0.25,0.5' -> [0.0, 0.25, 0.5]: the noise levels, each in [0, 1]."""
    try:
        ts = [float(v) for v in text.split(",")]
    except ValueError:
        ts = []
    if not ts or not all(0 <= t <= 1 for t in ts):
        raise UserError(f"--analyze-t must be comma-separated times in [0, 1], got {text!r}")
    return ts


class ImageFolderData(torch.utils.data.Dataset):
    """An ImageNet-style folder read on the fly: a measurement reads each image once, so shards
    would not pay. ADM crop and SD-VAE moments per batch, in this process (on its GPU)."""
    latent_scale = repa.LATENT_SCALE

    def __init__(self, src, resolution, vae_name, device):
        paths, labels, classes = evaluate.list_image_folder(src)
        self.paths, self.labels, self.num_classes = paths, np.asarray(labels), len(classes)
        self.resolution, self.device = resolution, device
        self.vae = repa.load_vae(vae_name, device)

    def __len__(self):
        return len(self.paths)

    def __getitems__(self, indices):
        images, _, failed = evaluate.read_images([self.paths[i] for i in indices], self.resolution)
        if failed:  # a measurement over other images than asked for would mislead
            raise UserError(f"cannot read {failed[0]}")
        moments = prepare.vae_moments(self.vae, images, len(images), self.device)
        return (torch.from_numpy(images), torch.from_numpy(moments),
                torch.from_numpy(self.labels[np.asarray(indices)]))


def analysis_images(cfg, info, device, data=None):
    """(dataset, sorted indices) of the images to measure: a tool's own (analyze_checkpoint's
    `data`), prepared shards, or an ImageNet-style folder read on the fly; a seeded random choice
    of --analyze-images of them. A pixel-space model needs its own data (the demo's)."""
    if data is None and info["pixel_space"]:
        raise UserError(f"{info['path']} is a pixel-space model: measure it on its own data, "
                        f"with the tool that trained it")
    if data is not None:
        data = data()
    elif os.path.isfile(os.path.join(cfg.data_dir, "manifest.json")):
        data = repa.ShardDataset(cfg.data_dir)
    else:
        data = ImageFolderData(cfg.data_dir, info["resolution"], cfg.vae, device)
    if data.resolution != info["resolution"]:
        raise UserError(f"{cfg.data_dir} holds {data.resolution} px images, the checkpoint is "
                        f"for {info['resolution']} px")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed))
    return data, order[:cfg.analyze_images].sort().values.numpy()


def gather_rows(x, n, world, device):
    """Rank r holds rows r, r + world, r + 2 world, ... of n: all n rows, in order, on rank 0
    (on the CPU; None on the others). Padded to equal shares, as gather needs equal shapes."""
    if world == 1:
        return x
    rank, share = dist.get_rank(), -(-n // world)
    padded = torch.zeros((share,) + x.shape[1:], dtype=x.dtype, device=device)
    padded[:len(x)] = x.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)] if rank == 0 else None
    dist.gather(padded, parts, dst=0)
    return torch.stack(parts, dim=1).flatten(0, 1)[:n].cpu() if rank == 0 else None


@torch.no_grad()
def extract_features(model, encoders, data, rows, ts, cfg, info, device):
    """Each rank takes every world-th image; then rank 0 holds, in order: labels (N,), the
    encoders' pooled features [(N, D_k)], and the SiT's pooled hidden states (N, len(ts), depth,
    D), float32 on the CPU. One noise draw per image serves every t, so that the curves of the
    different t differ only by t. REG: the first encoder's class token, noised, is token 0."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    size, g = (len(rows), model.in_channels, info["input_size"], info["input_size"]), \
        torch.Generator().manual_seed(cfg.seed)
    noise = torch.randn(size, generator=g)[rank::world]
    cls_noise = torch.randn(len(rows), encoders[0].dim, generator=g)[rank::world]
    mine, per = rows[rank::world], max(1, cfg.batch_size // world)
    labels, enc, sit = [], [], []
    for s in tqdm(range(0, len(mine), per), desc=f"features (rank 0 of {world})", unit="batch",
                  disable=rank != 0):
        images, moments, y = data.__getitems__(mine[s:s + per])
        x, eps = repa.clean_latents(moments, data).to(device), noise[s:s + per].to(device)
        labels.append(y)
        feats = repa.encode(encoders, images.to(device), model.reg)
        enc.append([f[:, model.reg:].float().mean(1).cpu() for f in feats])
        cls = [feats[0][:, 0].float(), cls_noise[s:s + per].to(device)] if model.reg else []
        sit.append(torch.stack([repa.block_features(
            model, x, torch.full((len(x),), t, device=device), eps, info["path_type"], cls).cpu()
            for t in ts], dim=1))
    n = len(rows)
    return (gather_rows(torch.cat(labels), n, world, device),
            [gather_rows(torch.cat(f), n, world, device) for f in zip(*enc)],
            gather_rows(torch.cat(sit), n, world, device))


def alignment_report(labels, enc, sit, ts, encoders, num_classes, cfg, device):
    """CKNNA of every (t, block) with every encoder, on L2-normalised pooled features (as the PRH
    pipeline), and the top-1 accuracy of a linear probe on every (t, block) and on every encoder,
    trained on a seeded (1 - holdout) of the images and tested on the rest."""
    split = torch.randperm(len(labels), generator=torch.Generator().manual_seed(cfg.seed))
    held = max(1, round(len(labels) * cfg.probe_holdout))
    test, train, labels = split[:held], split[held:], labels.to(device)

    def probe(f):
        f = f.to(device)
        return round(repa.linear_probe(f[train], labels[train], f[test], labels[test], num_classes,
                                  cfg.probe_epochs, cfg.probe_batch, cfg.probe_lr, cfg.seed), 4)

    targets = [F.normalize(z.to(device), dim=-1) for z in enc]
    report = {"probe": {}, "encoders": {e.name: {"probe": probe(z), "cknna": {}}
                                        for e, z in zip(encoders, enc)}}
    for i, t in enumerate(tqdm(ts, desc="CKNNA and probes", unit="t")):
        h = sit[:, i].to(device)  # (N, depth, D)
        report["probe"][str(t)] = [probe(h[:, b]) for b in range(h.shape[1])]
        h = F.normalize(h, dim=-1)
        for e, z in zip(encoders, targets):
            report["encoders"][e.name]["cknna"][str(t)] = [
                round(repa.cknna(h[:, b], z, cfg.knn), 4) for b in range(h.shape[1])]
    return report


def plot_alignment(result, path):
    """The PNG: linear-probe accuracy against block (fig. 2a: one line per t, each encoder's own
    accuracy dashed), then CKNNA against block for each encoder (fig. 2b: one line per t)."""
    from matplotlib.figure import Figure  # files only, no display
    encoders = result["encoders"]
    fig = Figure(figsize=(5.5 * (1 + len(encoders)), 4.2))
    axes = fig.subplots(1, 1 + len(encoders), squeeze=False)[0]
    panels = [(axes[0], result["probe"], "linear probe top-1 accuracy", "(a) semantic gap")] + [
        (ax, e["cknna"], f"CKNNA with {name}", "(b) alignment")
        for ax, (name, e) in zip(axes[1:], encoders.items())]
    for ax, curves, ylabel, title in panels:
        for t, values in curves.items():
            ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=f"t = {t}")
        ax.set(xlabel="block", ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
    for name, e in encoders.items():
        axes[0].axhline(e["probe"], linestyle="--", color="gray")
        axes[0].annotate(name, (1, e["probe"]), textcoords="offset points", xytext=(2, 3),
                         fontsize=8, color="gray")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle(f"{os.path.basename(result['checkpoint'])}: {result['images']:,} images, "
                 f"k = {result['knn']}, t = 0 is data", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))


def analyze_checkpoint(cfg, data=None, encoders=None):
    """For a checkpoint (ours, an official one, a run folder), CKNNA and linear-probe
    accuracy of the hidden state after every block at every t; writes analysis.json and
    analysis.png under <run>/analysis/<checkpoint>-<settings' hash>/ for a checkpoint of a run
    folder (so that no analysis overwrites another), else under results_dir/exp_name. Feature
    extraction is split over torchrun's ranks; rank 0 computes the metrics. A tool measures on
    its own data set and encoders, factories as train's `data` and `encoders`."""
    repa.check_values(cfg, LIMITS, images="analyze_images")  # every value and name, first
    ts = parse_times(cfg.analyze_t)
    for entry in cfg.enc_type.split(",") if encoders is None else []:
        repa.parse_encoder(entry)
    rank, world, device = repa.setup_distributed()
    model, info = sample.load_checkpoint(cfg.ckpt, device)  # the EMA
    data, rows = analysis_images(cfg, info, device, data)
    if len(rows) <= max(world, cfg.knn + 3):
        raise UserError(f"{len(rows)} images are too few to measure with --knn {cfg.knn} on "
                        f"{world} processes")
    encoders = encoders(device) if encoders else repa.load_encoders(
        cfg.enc_type, info["resolution"], device)
    if model.reg and (encoders[0].dim != model.cls_projectors2.in_features or not encoders[0].cls):
        raise UserError(f"a REG model takes its training encoder's class token: put that encoder "
                        f"({model.cls_projectors2.in_features} wide) first in --enc-type")
    print0(f"measuring {info['path']} ({len(model.blocks)} blocks) on {len(rows):,} images at "
           f"t = {ts} against {', '.join(e.name for e in encoders)}; no class label")
    labels, enc, sit = extract_features(model, encoders, data, rows, ts, cfg, info, device)
    result = None
    if rank == 0:
        result = dict(checkpoint=info["path"], steps=info["steps"], images=len(rows), t=ts,
                      knn=cfg.knn, features="hidden states averaged over tokens, L2-normalised "
                      "for CKNNA", probe_protocol=dict(
                          epochs=cfg.probe_epochs, batch=cfg.probe_batch, lr=cfg.probe_lr,
                          holdout=cfg.probe_holdout),
                      **alignment_report(labels, enc, sit, ts, encoders, data.num_classes, cfg,
                                         device))
        folder, name = os.path.split(os.path.abspath(info["path"]))
        run_dir = os.path.dirname(folder)
        if not (os.path.basename(folder) == "checkpoints" and
                os.path.isfile(os.path.join(run_dir, "config.json"))):
            run_dir = os.path.join(cfg.results_dir, cfg.exp_name)  # a file of no run of ours
        # every setting that changes the numbers picks the folder, so none replaces another's
        settings = {k: v for k, v in asdict(cfg).items() if k not in NOT_SETTINGS}
        digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
        out = os.path.join(run_dir, "analysis", f"{os.path.splitext(name)[0]}-{digest}")
        result["settings"] = settings
        os.makedirs(out, exist_ok=True)
        atomic_write(os.path.join(out, "analysis.json"),
                     lambda f: json.dump(result, f, indent=1), "w")
        plot_alignment(result, os.path.join(out, "analysis.png"))
        for t in map(str, ts):
            best = {n: max(e["cknna"][t]) for n, e in result["encoders"].items()}
            print(f"t = {t}: best probe {max(result['probe'][t]):.3f}, best CKNNA " +
                  ", ".join(f"{n} {v:.3f}" for n, v in best.items()))
        print(f"wrote {out}/analysis.json and analysis.png")
    barrier()
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("ckpt", help="checkpoint file, or a run folder (its newest checkpoint)")
    repa.add_flags(parser, AnalyzeConfig, skip=("ckpt",))
    cfg = AnalyzeConfig(**vars(parser.parse_args(argv)))
    repa.run_command(lambda: analyze_checkpoint(cfg), [evaluate.UserError])


if __name__ == "__main__":
    main()
