"""
The laptop demo: REPA's speed-up in miniature, on a CPU, in one command.

ImageNet + DINOv2 + Inception in miniature: 16 x 16 images of ten shapes (DemoDataset), a small ViT
pretrained on them without labels (SimCLR) as the target, and a CNN on the labels as the judge
(FD_demo, class accuracy). A T/2 SiT trains on them in pixel space through repa.train's seam, so
training's flags, resume and torchrun work as for the paper's runs. The design and its numbers:
README, "Try it: the demo".

  python tools/demo.py                         # REPA on the shapes: ~5 min on a 2-core CPU
  python tools/demo.py --compare               # vanilla and REPA side by side: compare.md / .png
  python tools/demo.py --compare REPA= iREPA="--projector conv --spatial-norm 0.6"  # any two
  python tools/demo.py --analyze results/demo  # fig. 2 (CKNNA, linear probes) on held-out shapes
  torchrun --nproc_per_node=2 tools/demo.py --max-steps 20
  python sample.py --ckpt results/demo         # a labelled grid of samples
"""
import contextlib
import json
import math
import os
import shlex
import signal
import sys
import time
from collections import OrderedDict
from dataclasses import fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import analyze  # noqa: E402
import compare  # noqa: E402
import evaluate  # noqa: E402
import repa  # noqa: E402
import sample  # noqa: E402
from repa import UserError, atomic_write, print0  # noqa: E402

#################################################################################
#       The data: procedural shapes, a self-supervised encoder, and a judge      #
#################################################################################

class DemoDataset(torch.utils.data.Dataset):
    """16 x 16 images of one light shape, the class, on a dark background; the rest is random, so
    that only the shape tells the class. In pixel space: the 'moments' are the image in [-1, 1]
    with std 0. Centred and lighter: at high noise a SiT's label moves its velocity only as far as
    the classes' mean images lie apart (rms 0.26 here; 0.012 for shapes anywhere, either
    brightness). Turned little: with any turn a sample must pick the turn in its noisiest steps."""
    latent_scale = 1.0
    num_classes, resolution = 10, 16
    description = ("procedural shapes in pixel space (no VAE); the alignment target is "
                   "demo-simclr-vit, a ViT pretrained on the shapes without labels (SimCLR)")
    version = 3  # of the images' recipe: networks cached for another recipe are not used
    # half a shape's extent and its centre's offset from the image's centre (each axis), in
    # pixels; its largest turn either way, in radians; the background's gradient
    size_range, jitter, turn, ramp = (5, 6.7), 1.0, 0.5, 0.05
    class_names = ["disk", "ring", "square", "frame", "triangle", "plus", "bar", "crescent", "L",
                   "half-disk"]
    # inside(u, v, r) for each class: (u, v) the rotated offset from the centre in units of the
    # shape's size, r = |(u, v)|. No two classes are rotations of each other.
    shapes = [lambda u, v, r: r < 1,
              lambda u, v, r: (r < 1) & (r > 0.55),
              lambda u, v, r: (u.abs() < 0.8) & (v.abs() < 0.8),
              lambda u, v, r: (u.abs() < 0.85) & (v.abs() < 0.85) & (
                  (u.abs() > 0.45) | (v.abs() > 0.45)),
              lambda u, v, r: (v < 0.7) & (u.abs() < (v + 1) * 0.55),
              lambda u, v, r: ((u.abs() < 0.28) | (v.abs() < 0.28)) & (u.abs() < 1) & (v.abs() < 1),
              lambda u, v, r: (u.abs() < 1) & (v.abs() < 0.3),
              lambda u, v, r: (r < 1) & (torch.hypot(u - 0.5, v) > 0.75),
              lambda u, v, r: (u.abs() < 0.8) & (v.abs() < 0.8) & ((u < -0.25) | (v > 0.25)),
              lambda u, v, r: (r < 1) & (v > -0.05)]

    def __init__(self, n=20_000, seed=0):
        g = torch.Generator().manual_seed(seed)
        uniform = lambda low, high, *shape: low + (high - low) * torch.rand(*shape, generator=g)
        r = self.resolution
        # (u, v) turned by -a: the offsets in the frame of a shape turned by a
        rotated = lambda u, v, a: (u * a.cos() + v * a.sin(), v * a.cos() - u * a.sin())
        yy, xx = torch.meshgrid(torch.arange(r) + 0.5, torch.arange(r) + 0.5, indexing="ij")
        self.labels = torch.randint(0, self.num_classes, (n,), generator=g)
        size = uniform(*self.size_range, n, 1, 1)
        cx, cy = (r / 2 + uniform(-self.jitter, self.jitter, n, 1, 1) for _ in "xy")
        turn = uniform(-self.turn, self.turn, n, 1, 1)
        u, v = rotated((xx - cx) / size, (yy - cy) / size, turn)
        mask = torch.empty(n, r, r, dtype=torch.bool)
        for c, inside in enumerate(self.shapes):  # each image tested against its own shape only
            k = self.labels == c
            mask[k] = inside(u[k], v[k], torch.hypot(u[k], v[k]))
        # a light colour on a dark background, with a random linear gradient
        colour, background = uniform(0.55, 1, n, 3, 1, 1), uniform(0, 0.35, n, 3, 1, 1)
        ramp, _ = rotated((xx - r / 2) / (r / 2), (yy - r / 2) / (r / 2),
                          uniform(0, 2 * math.pi, n, 1, 1, 1))
        background = (background + ramp * uniform(-self.ramp, self.ramp, n, 3, 1, 1)).clamp(0, 1)
        self.images = (torch.where(mask[:, None], colour, background) * 255).round().byte()

    def __len__(self):
        return len(self.labels)

    def __getitems__(self, indices):  # (images, moments: the image in [-1, 1] and std 0, labels)
        mean = self.images[indices].float() / 127.5 - 1
        return self.images[indices], torch.cat([mean, 0 * mean], dim=1), self.labels[indices]


def cache_once(name, make, module, every_rank=False):
    """Load into `module` the weights kept as `name` in $REPA_CACHE (else ~/.cache/repa), in a
    folder of the images' version; the first time make() -> (trained module, info) makes them.
    Returns the info. every_rank: all of torchrun's processes call it, and wait for rank 0's."""
    path = os.path.join(os.environ.get("REPA_CACHE") or os.path.expanduser("~/.cache/repa"),
                        f"shapes-v{DemoDataset.version}", name)
    if int(os.environ.get("RANK", 0)) == 0 and not os.path.isfile(path):
        print0(f"training {name} once (cached at {path})")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        began = time.perf_counter()
        trained, info = make()
        info["seconds"] = round(time.perf_counter() - began, 1)
        atomic_write(path, lambda f: torch.save({"model": trained.state_dict(), "info": info}, f))
    if every_rank:
        repa.barrier()
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        module.load_state_dict(state["model"])
    except RuntimeError:
        raise UserError(f"{path} holds networks of another recipe of the demo: delete it, "
                        f"and it is made again") from None
    return state["info"]


DEMO_ENCODER = "demo-simclr-vit"
DEMO_PATCH = 2  # the encoder's patch side: an 8 x 8 grid, the tokens of a T/2 SiT
DEMO_ENCODER_STEPS = 200  # SimCLR steps of 2 x 128 views: 1.4-2.5 min on 2 cores with its probe


class Standardize(nn.Module):
    """x -> (x - mean) / std in each channel, with fixed statistics kept with the weights."""
    def __init__(self, dim):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def forward(self, x):
        return (x - self.mean) / self.std


def demo_vit():
    """timm's VisionTransformer (as DINOv2 is) with 2 x 2 patches, as many tokens as the demo SiT
    (64), no CLS token, width 96, 4 blocks; its patch embedding a small convolutional stem (Xiao
    et al. 2021: with the plain linear one, the same pretraining's linear probe fell from 0.46 to
    0.16). Its tokens leave through `Standardize`, the identity until pretrain_simclr sets it."""
    import timm
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=DemoDataset.resolution, patch_size=DEMO_PATCH, embed_dim=96, depth=4, num_heads=3,
        num_classes=0, class_token=False, global_pool="avg")
    vit.patch_embed.proj = nn.Sequential(nn.Conv2d(3, 48, 3, 1, 1), nn.BatchNorm2d(48), nn.ReLU(),
                                         nn.Conv2d(48, vit.embed_dim, 3, DEMO_PATCH, 1))
    vit.norm = Standardize(vit.embed_dim)
    return vit


def simclr_view(images, g):
    """A random view of uint8 images (B, 3, H, W), in [0, 1]: turned (by at most the data's
    `turn`), flipped, scaled and shifted (one affine resampling), the colour channels permuted,
    the brightness inverted half the time, contrast and brightness jittered: the demo's nuisances
    and more, so that what two views of one image share is the shape."""
    b = len(images)
    uniform = lambda *shape: torch.rand(*shape, generator=g)
    angle = DemoDataset.turn * (2 * uniform(b) - 1)
    scale = torch.exp(0.5 * (uniform(b) - 0.5))
    flip, shift = torch.where(uniform(b) < 0.5, -1.0, 1.0), 0.4 * (uniform(b, 2) - 0.5)
    cos, sin = angle.cos() * scale, angle.sin() * scale
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1),
                         torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
    x = F.grid_sample(images / 255, F.affine_grid(theta, images.shape, align_corners=False),
                      padding_mode="border", align_corners=False)
    x = torch.gather(x, 1, uniform(b, 3).argsort(1)[:, :, None, None].expand_as(x))
    x = torch.where(uniform(b, 1, 1, 1) < 0.5, 1 - x, x)
    return ((x - 0.5) * (0.6 + 0.8 * uniform(b, 3, 1, 1)) + 0.5 + 0.3 * (uniform(b, 3, 1, 1) - 0.5)
            ).clamp(0, 1)


def pretrain_simclr(batch_size=128, temperature=0.2):
    """SimCLR (Chen et al. 2020) on demo images of seed 100 (not the training set's): two views of
    each image, their pooled tokens through a projection head, and the InfoNCE (NT-Xent) loss
    that finds each view's partner among the other 2B - 1 views. Returns the encoder (the head
    dropped) and its steps and linear probe."""
    steps = DEMO_ENCODER_STEPS
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data, vit = DemoDataset(20_000, seed=100), demo_vit()
    head = nn.Sequential(nn.Linear(vit.embed_dim, 256), nn.BatchNorm1d(256), nn.ReLU(),
                         nn.Linear(256, 64))
    partner = torch.arange(2 * batch_size).roll(batch_size)  # view i's partner: i + B or i - B

    def loss(step):
        bar.update()
        images = data.images[torch.randint(0, len(data), (batch_size,), generator=g)]
        views = torch.cat([simclr_view(images, g), simclr_view(images, g)])
        z = F.normalize(head(vit.forward_features(views).mean(1)), dim=-1)
        return F.cross_entropy((z @ z.T / temperature).fill_diagonal_(-math.inf), partner)
    with tqdm(total=steps, desc="SimCLR", unit="step") as bar:  # minutes, on the first run
        repa.fit([*vit.parameters(), *head.parameters()], loss, steps, 2e-3, warmup=20)
    # The tokens share one large direction (a token's cosine to the mean token: 0.85), so as a
    # cosine target they are nearly constant and eq. (8) carries little. Standardized in each
    # channel over the pretraining images, the target is what varies between patches and images
    # (the mean cosine of two tokens: 0.73 before, 0.01 after).
    vit.eval().requires_grad_(False)
    with torch.no_grad():
        tokens = torch.cat([vit.forward_features(b / 255) for b in data.images[:2000].split(500)])
    vit.norm.mean.copy_(tokens.mean((0, 1)))
    vit.norm.std.copy_(tokens.std((0, 1)))
    seen, unseen = DemoDataset(5000, 7), DemoDataset(2000, 8)  # the linear probe's images
    with torch.no_grad():
        x = [torch.cat([vit.forward_features(b / 255).mean(1) for b in d.images.split(500)])
             for d in (seen, unseen)]
    probe = repa.linear_probe(x[0], seen.labels, x[1], unseen.labels, DemoDataset.num_classes,
                              epochs=100, batch_size=1000, lr=1e-2)
    print0(f"{DEMO_ENCODER}: linear probe on its pooled features {probe:.3f} (chance 0.1)")
    return vit, {"steps": steps, "probe": round(probe, 4)}


def demo_encoders(device="cpu"):
    """The demo's alignment target: the SimCLR ViT. Its inputs are the images in [0, 1] as they
    are (mean 0, std 1); its features the 64 patch tokens. It has no CLS token: REG's class token
    is their mean, the pooled feature its SimCLR head learns from (global_pool="avg")."""
    vit = demo_vit()
    cache_once(DEMO_ENCODER + ".pt", pretrain_simclr, vit, every_rank=True)
    return [repa.Encoder(name=DEMO_ENCODER, model=vit.to(device).eval().requires_grad_(False),
                         size=DemoDataset.resolution, tokens=vit.patch_embed.num_patches,
                         mean=torch.zeros(1, 3, 1, 1, device=device),
                         std=torch.ones(1, 3, 1, 1, device=device), dim=vit.embed_dim, prefix=0,
                         cls="mean")]


DEMO_JUDGE_STEPS = 600


def demo_judge(device="cpu"):
    """The demo's Inception, never its target: a small CNN (another architecture, objective, seed
    and data than the encoder) trained on the labels (cross-entropy, AdamW, cosine; seed 1, images
    of seed 200), with its accuracy on held-out images. Its input is x / 255; `body` gives the
    128-d features of FD_demo, `classify` the class of a sample. Rank 0 alone judges."""
    conv = lambda i, o, stride: [nn.Conv2d(i, o, 3, stride, 1), nn.BatchNorm2d(o), nn.ReLU()]
    judge_net = lambda: nn.Sequential(OrderedDict(body=nn.Sequential(
        *conv(3, 32, 1), *conv(32, 64, 2), *conv(64, 128, 2), *conv(128, 128, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten()), classify=nn.Linear(128, DemoDataset.num_classes)))

    def make():
        torch.manual_seed(1)
        g = torch.Generator().manual_seed(1)
        judge, data, test = judge_net(), DemoDataset(20_000, seed=200), DemoDataset(2000, seed=8)

        def loss(step):
            bar.update()
            rows = torch.randint(0, len(data), (128,), generator=g)
            return F.cross_entropy(judge(data.images[rows] / 255), data.labels[rows])
        with tqdm(total=DEMO_JUDGE_STEPS, desc="judge", unit="step") as bar:
            repa.fit(judge.parameters(), loss, DEMO_JUDGE_STEPS, 2e-3)
        with torch.no_grad():
            right = judge.eval()(test.images / 255).argmax(1) == test.labels
        return judge, {"steps": DEMO_JUDGE_STEPS, "accuracy": round(right.float().mean().item(), 4)}
    judge = judge_net()
    info = cache_once("demo-judge.pt", make, judge)
    return judge.to(device).eval().requires_grad_(False), info


#################################################################################
#        Training on the shapes, and measuring it: FD_demo, class accuracy        #
#################################################################################
# A tiny SiT (size T/2: 6 blocks, width 128) on 16 x 16 pixels in 10 classes. These replace
# Config's defaults unless a flag is given; more small steps beat fewer big ones here. lambda stays
# the paper's 0.5 (with the target standardized; see pretrain_simclr).
DEMO = dict(model="T/2", enc_type=DEMO_ENCODER, projector_dim=256, batch_size=32, max_steps=1000,
            lr=2e-3, ema_decay=0.99, log_every=25, ckpt_every=500, latest_every=200,
            sample_every=500, num_workers=0, exp_name="demo", align_every=250, align_images=500)
HELDOUT_SEED = 1  # alignment and FD_demo are measured on shapes of this seed (training's: 0)
# fields the demo sets itself (its data and target), or does not run (--bench)
NOT_FLAGS = ("data_dir", "resolution", "vae", "enc_type", "bench")


def demo_score(run, num_steps=6):
    """The demo's --align-every: repa's alignment measures on held-out shapes, and the judge's
    verdict on samples of the EMA (as FID on a real run): FD_demo, the Fréchet distance of its
    features of samples and held-out images, and the share of samples in their class. The same
    noise all run, the classes in turn, Heun in 6 steps, no guidance (as the paper's headline)."""
    heldout = DemoDataset(run.cfg.align_images, seed=HELDOUT_SEED)
    align = repa.alignment_log(run, heldout)
    judge, info = demo_judge(run.device)
    print0(f"the demo's judge: accuracy {info['accuracy']:.3f} on held-out shapes")
    with torch.no_grad():
        real = evaluate.gaussian_statistics(judge.body(heldout.images.to(run.device) / 255).cpu())
    g = torch.Generator().manual_seed(run.cfg.seed + 1)
    labels = (torch.arange(len(heldout)) % run.model.num_classes).to(run.device)
    noise = torch.randn(heldout.images.shape, generator=g).to(run.device)
    solver = sample.Solver("ode", num_steps, heun=True, cfg_scale=1.0, path_type=run.cfg.path_type)
    if run.model.learn_sigma:  # a DiT: its DDPM chain, as many model calls as Heun's, seeded
        solver = sample.Solver("ddpm", 2 * num_steps - 1, cfg_scale=1.0)
    chunk = 4 * max(1, run.cfg.batch_size // run.world)  # 4 x what a training step holds
    autocast = torch.autocast(run.device.type, torch.bfloat16, run.precision == "bf16")

    @torch.no_grad()
    def measure():
        generator = torch.Generator(run.device).manual_seed(run.cfg.seed + 2)  # DDPM's noise
        with autocast:
            x = torch.cat([solver(run.ema, z, y, generator) for z, y in zip(
                noise.split(chunk), labels.split(chunk))])
        feats = judge.body(repa.to_uint8(x).permute(0, 3, 1, 2).to(run.device) / 255)  # as saved
        fd = evaluate.frechet_distance(*evaluate.gaussian_statistics(feats.cpu()), *real)
        correct = (judge.classify(feats).argmax(1) == labels).float().mean()
        return {"fd_demo": round(fd, 3), "class_acc": round(correct.item(), 4), **align()}
    return measure


def train_demo(cfg):  # the seam: the demo's data, target and measurements
    return repa.train(cfg, data=DemoDataset, encoders=demo_encoders, measure=demo_score)


#################################################################################
#           --compare: the paper's speed-up, in miniature (fig. 1 and 4)          #
#################################################################################

def train_in_child(cfg, threads):
    """One run of train_side_by_side, its output in its train.log, in a process group of its own
    (setsid): a signal reaches it once, from the parent."""
    os.setsid()
    torch.set_num_threads(threads)
    folder = os.path.join(cfg.results_dir, cfg.exp_name)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "train.log"), "a", buffering=1) as log, \
            contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        train_demo(cfg)


def progress(folder):
    """(step, images/s) of a run's last log row in its metrics.jsonl; (0, None) before the first."""
    path = os.path.join(folder, "metrics.jsonl")
    lines = open(path).read().splitlines(keepends=True) if os.path.isfile(path) else []
    rows = [json.loads(line) for line in lines if line.endswith("\n")]  # whole lines only
    return next(((r["step"], r["img_s"]) for r in reversed(rows) if "loss" in r), (0, None))


def train_side_by_side(cfgs, threads):
    """Train the runs at once, each in a child process with `threads` threads (so a 2-core CPU
    trains the pair in 50-60% of the time of one after the other); SIGINT and SIGTERM are passed
    on to them, once: they save and stop. Returns whether both finished."""
    demo_encoders(), demo_judge()
    context = torch.multiprocessing.get_context("spawn")
    children = [context.Process(target=train_in_child, args=(c, threads)) for c in cfgs]
    folders = [os.path.join(c.results_dir, c.exp_name) for c in cfgs]
    print(f"training side by side, {threads} thread(s) each; logs: "
          f"{', '.join(os.path.join(f, 'train.log') for f in folders)}", flush=True)
    total = cfgs[0].max_steps
    bar = tqdm(total=total, initial=min(progress(f)[0] for f in folders), unit="step",
               bar_format="{desc} | {elapsed} elapsed, ETA {remaining}", dynamic_ncols=True)
    with repa.stop_signal() as stop:
        for child in children:
            child.start()
        while any(child.is_alive() for child in children) and not stop():
            time.sleep(1)
            now = [progress(f) for f in folders]
            bar.set_description_str(" | ".join(
                f"{os.path.basename(f)} step {n}/{total}, {rate or '-'} img/s"
                for f, (n, rate) in zip(folders, now)), refresh=False)
            bar.update(min(n for n, _ in now) - bar.n)
        stopped = stop()
        for child in children:
            if stopped and child.is_alive():
                os.kill(child.pid, signal.SIGTERM)
            child.join()
    bar.close()
    for folder, child in zip(folders, children):
        if child.exitcode:
            raise UserError(f"a run of --compare failed (exit code {child.exitcode}); its log: "
                            f"{os.path.join(folder, 'train.log')}")
    if stopped:
        print("stopped by signal; both runs saved: resume with the same command")
    return not stopped


VERSUS = ["vanilla=--proj-coeff 0", "REPA="]  # --compare's recipes unless it names two


def recipes(cfg, texts):
    """{NAME: Config} for --compare's 'NAME=FLAGS' (the baseline first): FLAGS, repa.py's, on top
    of the command's, e.g. REPA= (the command's own) or iREPA="--projector conv"."""
    if len(texts) != 2 or not all(t.partition("=")[0] and "=" in t for t in texts):
        raise UserError(f"--compare takes two recipes NAME=FLAGS (the baseline first), e.g. "
                        f"REPA= iREPA=\"--spatial-norm 0.6\", got {' '.join(texts)}")
    runs = {}
    for text in texts:
        name, _, flags = text.partition("=")
        parser = repa.Parser(prog=f"tools/demo.py --compare {name}=", allow_abbrev=False)
        repa.add_flags(parser, repa.Config, defaults=vars(cfg), skip=NOT_FLAGS)
        given = vars(parser.parse_args(shlex.split(flags)))
        runs[name] = replace(cfg, **{**given, "exp_name": os.path.join(cfg.exp_name, name.lower())})
    a, b = runs.values()
    if replace(a, exp_name="") == replace(b, exp_name=""):
        raise UserError(f"--compare's two recipes are the same run ({', '.join(texts)})")
    for c in runs.values():
        if not 0 < c.align_every <= c.max_steps or (c.max_steps, c.align_every) != (
                a.max_steps, a.align_every):
            raise UserError("--compare measures both runs at the same steps: it needs one "
                            "--align-every from 1 to --max-steps, and one --max-steps")
    return runs


def demo_compare(cfg, texts):
    """Train two recipes with the same seed, weights, data order and noise, both measured every
    --align-every steps (a finished run is not trained again); then compare.md (the speed-up to
    the baseline's final FD_demo, what sets it, every measurement) and compare.png."""
    runs = recipes(cfg, texts or VERSUS)
    (base, other), flags = runs, [t.partition("=")[2] or "the command's flags" for t in texts or
                                  VERSUS]
    folder = os.path.join(cfg.results_dir, cfg.exp_name)
    threads = torch.get_num_threads() // len(runs)
    if "RANK" in os.environ or torch.cuda.is_available() or threads < 1:
        for name, run_cfg in runs.items():
            print0(f"--- {name}")
            train_demo(run_cfg)
    else:
        for run_cfg in runs.values():  # before the encoder and judge are made
            repa.check_config(run_cfg, 1, named_encoders=False)
        if not train_side_by_side(list(runs.values()), threads):
            return
    if int(os.environ.get("RANK", 0)):
        return
    block = cfg.encoder_depth or repa.size_config(cfg.model)["encoder_depth"]
    speedup = compare.report(
        {name: os.path.join(folder, name.lower()) for name in runs},
        f"tools/demo.py --compare, seed {cfg.seed}",
        f"{cfg.model}, {cfg.max_steps} steps of batch {cfg.batch_size} at lr {cfg.lr:g} (both "
        f"runs), aligned at block {block} to {DEMO_ENCODER}; judge: a CNN on the labels. {base}: "
        f"{flags[0]}; {other}: {flags[1]}.")
    print0(f"{speedup}. Report: {os.path.join(folder, 'compare.md')}, compare.png")


#################################################################################
#                                  Command line                                 #
#################################################################################

def parse_args(argv=None):
    """(Config, compare, AnalyzeConfig or None): the demo's own flags, then repa.py's training flags
    and tools/analyze.py's with the demo's defaults."""
    parser = repa.Parser(description=__doc__.strip().split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--compare", nargs="*", metavar="NAME=FLAGS", help="train two recipes "
                        "with the same seed, side by side, and write compare.md and compare.png;"
                        " alone: vanilla=\"--proj-coeff 0\" REPA= (FLAGS on top of the command's)")
    parser.add_argument("--analyze", default="", metavar="CKPT", help="instead of training, "
                        "measure a checkpoint or run folder on held-out shapes (fig. 2)")
    training = parser.add_argument_group("training", "repa.py's flags, with the demo's defaults")
    repa.add_flags(training, repa.Config, defaults=DEMO, skip=NOT_FLAGS)
    measuring = parser.add_argument_group("--analyze", "tools/analyze.py's flags")
    shared = [f.name for f in fields(repa.Config)]
    repa.add_flags(measuring, analyze.AnalyzeConfig, defaults={"analyze_images": 2000},
                   skip=["ckpt", *NOT_FLAGS, *shared])
    args = vars(parser.parse_args(argv))
    compare, ckpt = args.pop("compare"), args.pop("analyze")
    measured = {k: args.pop(k) for k in list(args) if k not in shared}
    cfg = repa.Config(**{**DEMO, **args})
    measure = analyze.AnalyzeConfig(ckpt=ckpt, enc_type=DEMO_ENCODER, **measured, **{
        k: getattr(cfg, k) for k in ("knn", "batch_size", "seed", "results_dir", "exp_name")})
    return cfg, compare, measure if ckpt else None


def main(argv=None):
    cfg, compare, measure = parse_args(argv)
    heldout = lambda: DemoDataset(measure.analyze_images, seed=HELDOUT_SEED)
    repa.run_command(lambda: demo_compare(cfg, compare) if compare is not None else
                     analyze.analyze_checkpoint(measure, heldout, demo_encoders) if measure else
                     train_demo(cfg))


if __name__ == "__main__":
    main()
