"""
ImageNet -> the shards that repa.py trains on: ADM's centre crop, the SD-VAE's posterior moments,
in shards that a stopped run resumes, over torchrun's ranks; and the benchmark of their reader.

  torchrun --nproc_per_node=8 tools/prepare.py IMAGENET/train --data-dir data/imagenet256
  python tools/prepare.py --bench-data 20000 --data-dir /tmp/benchdata   # the reader's samples/s

The layout (read by repa.ShardDataset): a folder of shards, each a folder of three .npy arrays that
training memory-maps: images (N, 3, R, R) uint8, moments (N, 8, R/8, R/8) float32 (the VAE
posterior mean and std, as the official preprocessing stores them), labels (N,) int64;
manifest.json lists the shards and the unreadable files, prepare.json the recipe, which a resume
must repeat. ImageNet at 256 px: 1.28M x (196,608 + 32,768) bytes, about 294 GB.
"""
import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import evaluate  # noqa: E402  (ADM's crop and the folder walk)
import repa  # noqa: E402
from repa import UserError, atomic_write, barrier, print0  # noqa: E402


@torch.no_grad()
def vae_moments(vae, images, batch_size, device):
    """uint8 images -> the posterior mean and std of the SD-VAE, float32 (N, 8, R/8, R/8)."""
    moments = []
    for batch in torch.from_numpy(images).split(batch_size):
        posterior = vae.encode(batch.to(device).float() / 127.5 - 1).latent_dist
        moments.append(torch.cat([posterior.mean, posterior.std], dim=1).float().cpu())
    latent = images.shape[-1] // repa.VAE_DOWNSAMPLE
    return torch.cat(moments).numpy() if moments else np.zeros((0, 8, latent, latent), np.float32)


SHARD = "shard-{:05d}"  # the folder of shard k


def write_shard(out, k, images, moments, labels, failed=()):
    """Write shard k under a temporary name, then rename it: a shard folder that exists is whole,
    so a stopped preparation is resumed by redoing only the shards that do not exist."""
    tmp = os.path.join(out, f".{SHARD.format(k)}.tmp{os.getpid()}")
    os.makedirs(tmp, exist_ok=True)
    for name, array in [("images", images), ("moments", moments), ("labels", labels)]:
        np.save(os.path.join(tmp, f"{name}.npy"), array)
    with open(os.path.join(tmp, "failed.json"), "w") as f:
        json.dump(list(failed), f)
    os.replace(tmp, os.path.join(out, SHARD.format(k)))


def write_manifest(out, n_shards, resolution, classes, vae_name):
    """manifest.json: the shards, their sizes and every unreadable file, written last."""
    names = [SHARD.format(k) for k in range(n_shards)]
    shards = [{"name": d, "count": len(np.load(os.path.join(out, d, "labels.npy")))} for d in names]
    failed = [f for d in names for f in json.load(open(os.path.join(out, d, "failed.json")))]
    manifest = {"resolution": resolution, "vae": vae_name, "classes": classes,
                "count": sum(s["count"] for s in shards), "shards": shards, "failed": failed}
    atomic_write(os.path.join(out, "manifest.json"), lambda f: json.dump(manifest, f, indent=1),
                 "w")
    return manifest


def report(manifest, out):
    return (f"{manifest['count']} images in {len(manifest['shards'])} shards at {out}; "
            f"{len(manifest['failed'])} unreadable" +
            "".join(f"\n  skipped {f}" for f in manifest["failed"]))


def check_recipe(out, recipe):
    """A preparation resumes only as it began: shards made from another source or with another
    size, resolution or VAE (or by --bench-data) are refused, never mixed with new ones."""
    path = os.path.join(out, "prepare.json")
    if os.path.isfile(path):
        stored = json.load(open(path))
        changed = [f"{k} {stored.get(k)} -> {v}" for k, v in recipe.items() if stored.get(k) != v]
        if changed:
            raise UserError(f"{out} is prepared otherwise ({'; '.join(changed)}): use another "
                            f"--data-dir, or the flags it began with")
    elif os.path.isdir(out) and any(n.startswith("shard-") or n == "manifest.json"
                                    for n in os.listdir(out)):
        raise UserError(f"{out} holds shards that no tools/prepare.py began (no prepare.json): "
                        f"use an empty --data-dir")


def prepare(src, cfg):
    """ImageFolder -> shards in cfg.data_dir, sharded over torchrun ranks and resumable (finished
    shards are skipped; a half-written one is redone). Unreadable images are counted and listed.
    A finished folder is left as it is."""
    from tqdm import tqdm
    rank, world, device = repa.setup_distributed()
    out, size = cfg.data_dir, cfg.shard_size
    paths, labels, classes = evaluate.list_image_folder(src)
    recipe = dict(source=os.path.abspath(src), files=len(paths), resolution=cfg.resolution,
                  vae=cfg.vae, shard_size=size)
    check_recipe(out, recipe)  # read only, on every rank: all fail alike
    chunks = [range(i, min(i + size, len(paths))) for i in range(0, len(paths), size)]
    # every rank lists the same missing shards and takes every world-th: balanced after a resume
    missing = [k for k in range(len(chunks))
               if not os.path.isdir(os.path.join(out, SHARD.format(k)))]
    manifest = os.path.join(out, "manifest.json")
    if not missing and os.path.isfile(manifest):
        print0(f"{out} is prepared already, nothing to do: " +
               report(json.load(open(manifest)), out))
        return
    todo = missing[rank::world]
    vae = repa.load_vae(cfg.vae, device) if missing else None  # all ranks fail alike if absent
    if rank == 0:  # nothing is written before the checks
        os.makedirs(out, exist_ok=True)
        atomic_write(os.path.join(out, "prepare.json"), lambda f: json.dump(recipe, f), "w")
        for name in os.listdir(out):  # what a stopped preparation left unfinished: redone
            if name.startswith(".shard-"):
                shutil.rmtree(os.path.join(out, name))
    barrier()  # every rank has listed before any shard is written
    bar = tqdm(total=sum(len(chunks[k]) for k in todo), disable=rank != 0, desc="prepare",
               unit="img")
    for k in todo:
        images, keep, failed = evaluate.read_images([paths[i] for i in chunks[k]], cfg.resolution,
                                                    bar)
        moments = vae_moments(vae, images, cfg.batch_size, device)
        write_shard(out, k, images, moments, np.asarray([labels[chunks[k][i]] for i in keep],
                                                        np.int64), failed)
    bar.close()
    barrier()
    if rank == 0:
        print0("prepared " + report(write_manifest(out, len(chunks), cfg.resolution, classes,
                                                   cfg.vae), out))


def benchmark_reader(cfg):
    """Reader throughput, as training reads it (DataLoader, workers, batches of --batch-size).
    A --data-dir that does not exist (or is empty) is first filled with random shards of the real
    shapes; any other folder must be a prepared dataset, and is only read."""
    if not os.path.isdir(cfg.data_dir) or not os.listdir(cfg.data_dir):
        os.makedirs(cfg.data_dir, exist_ok=True)
        r, n, latent = cfg.resolution, 5_000, cfg.resolution // repa.VAE_DOWNSAMPLE
        rng = np.random.default_rng(0)
        for k in range(4):
            write_shard(cfg.data_dir, k, rng.integers(0, 256, (n, 3, r, r), np.uint8),
                        rng.standard_normal((n, 8, latent, latent), np.float32),
                        rng.integers(0, repa.NUM_CLASSES, n))
        write_manifest(cfg.data_dir, 4, r, [str(c) for c in range(repa.NUM_CLASSES)], "random")
    dataset = repa.ShardDataset(cfg.data_dir)
    data = iter(repa.loader(dataset, repa.ResumableBatches(len(dataset), cfg.batch_size,
                                                           seed=cfg.seed), cfg.num_workers))
    next(data)  # start the workers
    start, seen = time.perf_counter(), 0
    while seen < cfg.bench_data:
        seen += len(next(data)[2])
    print(f"reader: {seen / (time.perf_counter() - start):.0f} samples/s ({len(dataset)} samples, "
          f"{dataset.resolution} px, batch {cfg.batch_size}, {cfg.num_workers} workers)")


@dataclass
class PrepareConfig:
    """The flags of tools/prepare.py, generated from these fields as repa.py's are."""
    data_dir: str = "data/imagenet256"  # the shards' folder (repa.py's --data-dir)
    resolution: int = 256       # image side in pixels, a multiple of 8 (the SD-VAE's downsampling)
    vae: str = "stabilityai/sd-vae-ft-mse"  # the VAE that makes the latents (official: ft-mse)
    shard_size: int = 10_000    # images per shard (the unit of resumption)
    batch_size: int = 64        # images per VAE call; --bench-data: samples per batch read
    bench_data: int = 0         # instead of preparing: read this many samples, print samples/s
    num_workers: int = 4        # --bench-data: data loader processes, as training's
    seed: int = 0               # --bench-data: the order's seed


LIMITS = {"resolution": (lambda v: v >= repa.VAE_DOWNSAMPLE and v % repa.VAE_DOWNSAMPLE == 0,
                         f"a multiple of {repa.VAE_DOWNSAMPLE}"),
          **{k: (lambda v: v >= 1, "at least 1") for k in ("shard_size", "batch_size")},
          **{k: (lambda v: v >= 0, "at least 0") for k in ("bench_data", "num_workers", "seed")}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("src", nargs="?", help="ImageNet-style folder: one sub-folder per class")
    repa.add_flags(parser, PrepareConfig)
    args = vars(parser.parse_args(argv))
    src, cfg = args.pop("src"), PrepareConfig(**args)

    def work():  # one line for a bad value, before anything runs
        if bool(src) == bool(cfg.bench_data):
            raise UserError("give a source folder to prepare, or --bench-data N to time the "
                            "reader (one of them)")
        repa.check_values(cfg, LIMITS)
        benchmark_reader(cfg) if cfg.bench_data else prepare(src, cfg)
    repa.run_command(work, [evaluate.UserError])


if __name__ == "__main__":
    main()
