"""
Sampling for REPA: the official ODE and SDE solvers with classifier-free guidance and its
interval, and DiT's DDPM sampler; a labelled PNG grid; 50K images and the `.npz` for FID,
evaluated in-process as ADM's suite (FID, sFID, IS, precision, recall) by tools/evaluate.py.

The solvers, in the notation of repa.py (t = 0 data, t = 1 noise, x_t = alpha_t x_* + sigma_t eps)
--------------------------------------------------------------------------------------------------
  The network learns the velocity field  v(x, t) = E[alpha'_t x_* + sigma'_t eps | x_t = x].

  ODE (probability flow)   dx = v(x, t) dt,  from t = 1 to t = 0 on linspace(1, 0, N + 1);
                           Euler, or Heun (trapezoid with an Euler predictor), Heun skipped on the
                           last step, so it costs 2N - 1 model calls.
  score from velocity      s(x, t) = grad log p_t(x) = -E[eps | x_t = x] / sigma_t
                                   = (r v - x) / (sigma^2 - r sigma' sigma),   r = alpha / alpha'
  SDE (reverse time)       dx = [v - (w/2) s] dt + sqrt(w) dW,   w(t) = 2t,  dt < 0.
                           Any w >= 0 keeps the marginals p_t; w = 2t is the official choice.
                           Euler-Maruyama on linspace(1, 0.04, N), then one noiseless step 0.04 -> 0
                           (the score blows up like 1/t at t = 0: for the linear path the
                           denominator above is exactly t).
  guidance (CFG)           v = v(x, t, null) + cfg (v(x, t, y) - v(x, t, null)),
                           only while guidance_low <= t <= guidance_high (Kynkaanniemi et al. 2024).
                           The paper's FID 1.42 is the SDE, 250 steps, cfg 1.8, interval [0, 0.7].
  DiT (DDPM)               ancestral steps x_{k-1} = mu_theta(x_k, k) + sigma_theta(x_k, k) z on the
                           1000-step chain respaced to N steps, with the learned variance (DiT's
                           sample_ddp.py); guidance mixes eps: eps_null + cfg (eps_y - eps_null).

Commands
--------
  python sample.py --ckpt results/demo                 # a labelled grid from the newest checkpoint
  torchrun --nproc_per_node=8 sample.py --ckpt C --num-fid-samples 50000   # PNGs + .npz for FID
  torchrun --nproc_per_node=8 sample.py --ckpt C --num-fid-samples 50000 --fid-ref REF.npz
                  # ... and evaluated against REF: ADM's VIRTUAL_imagenet256_labeled.npz or images
  python sample.py --evaluate SAMPLES.npz --fid-ref REF.npz   # the same for any .npz
  python sample.py --ckpt last.pt --model XL/2 --resolution 256 --encoder-depth 8   # released
  python sample.py --ckpt DiT-XL-2-256x256.pt --model DiT-XL/2 --resolution 256 --cfg-scale 1.5

Numbers match the official samplers (sihyun-yu/REPA samplers.py) to float64 rounding, and DiT's
sampler (facebookresearch/DiT) to the bit on a CPU; see test_repa.py for the golden runs.
"""
import argparse
import math
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist  # set up by repa.setup_distributed (torchrun env)
from PIL import Image
from tqdm import tqdm

import repa
from repa import GRID_CLASSES, decode, guidance_scale, guided, sample_ddpm, save_grid

VAES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
SDE_T_LAST = 0.04  # the SDE's last noisy time; from there one mean step goes to t = 0 (official)


#################################################################################
#          Solvers: ODE (Euler, Heun) and SDE (Euler-Maruyama), with CFG         #
#################################################################################

def velocity(model, x, t, y, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0,
             dtype=torch.float32, guide_t=None):
    """v(x, t | y) in float64 for the float64 state x, guided while `guide_t` (default t) is in
    the guidance interval. The model sees x and t in `dtype`, the latents' (float32 t, as the
    official samplers). The official SDE guides its drift, which is affine in v at fixed (x, t);
    an affine map commutes with u + w (c - u) (weights 1 - w and w), so guiding v is the same."""
    scale = guidance_scale(cfg_scale, t if guide_t is None else guide_t, guidance_low,
                           guidance_high)
    t_batch = torch.full((x.shape[0],), t, dtype=dtype, device=x.device)
    return guided(model, x.to(dtype), t_batch, y, scale, torch.float64)


def score(v, x, t, path_type="linear"):
    """grad_x log p_t(x) from the velocity (float64), using the path of repa.interpolant:
    x = alpha E[x_*|x] + sigma E[eps|x] and v = alpha' E[x_*|x] + sigma' E[eps|x]; eliminating
    E[x_*|x] gives r v - x = (r sigma' - sigma) E[eps|x] with r = alpha / alpha', and the score of
    a Gaussian perturbation is -E[eps|x] / sigma. Linear path: s = ((t - 1) v - x) / t."""
    alpha, sigma, d_alpha, d_sigma = repa.interpolant(
        torch.tensor(t, dtype=torch.float64, device=x.device), path_type)
    ratio = alpha / d_alpha
    return (ratio * v - x) / (sigma ** 2 - ratio * d_sigma * sigma)


@torch.no_grad()
def sample_ode(model, z, y, num_steps=50, heun=False, cfg_scale=1.0, guidance_low=0.0,
               guidance_high=1.0, path_type="linear"):
    """dx = v dt from noise z (t = 1) to data (t = 0) in float64, so that 250 small steps add no
    rounding drift. v is the model's, on its own path: path_type goes unused (as official)."""
    v = lambda x, t, **kw: velocity(model, x, t, y, cfg_scale, guidance_low, guidance_high,
                                    z.dtype, **kw)
    ts = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64).tolist()
    x = z.to(torch.float64)
    for i, (t_cur, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        d = v(x, t_cur)
        if heun and i < num_steps - 1:
            # the last step would evaluate v at t = 0, so it stays Euler; the corrector's
            # guidance is decided at t_cur (official), so both slopes agree on being guided
            d = 0.5 * d + 0.5 * v(x + (t_next - t_cur) * d, t_next, guide_t=t_cur)
        x = x + (t_next - t_cur) * d
    return x


@torch.no_grad()
def sample_sde(model, z, y, num_steps=50, heun=False, cfg_scale=1.0, guidance_low=0.0,
               guidance_high=1.0, path_type="linear", generator=None):
    """Euler-Maruyama on dx = [v - t s] dt + sqrt(2t) dW from noise z (t = 1) to data, float64.
    Each noisy step draws eps ~ N(0, I) *before* the model call, from `generator` (the global RNG
    when None), as the official sampler, whose signature has heun too (ignored)."""
    def drift(x, t):  # v - (w / 2) s with the diffusion coefficient w = 2t
        v = velocity(model, x, t, y, cfg_scale, guidance_low, guidance_high, z.dtype)
        return v - 0.5 * (2 * t) * score(v, x, t, path_type)

    ts = torch.linspace(1, SDE_T_LAST, num_steps, dtype=torch.float64).tolist()
    x = z.to(torch.float64)
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        eps = torch.randn(x.shape, generator=generator, dtype=torch.float64, device=x.device)
        dt = t_next - t_cur  # negative: time runs backwards; dW = eps sqrt(|dt|)
        x = x + drift(x, t_cur) * dt + math.sqrt(2 * t_cur) * (eps * math.sqrt(abs(dt)))
    return x + (0.0 - ts[-1]) * drift(x, ts[-1])


@dataclass(frozen=True)
class Solver:
    """A sampling recipe, by default the paper's FID 1.42 one: sde and ode for a SiT (velocity),
    ddpm for a DiT (eps and variance). `generator` feeds the SDE's and the DDPM's noise. A REG
    model's class token starts as N(0, I) after z and is integrated with it, guided by
    cls_cfg_scale (REG's recipe: SDE, 250 steps, both scales 2.3, guidance_high 0.85)."""
    mode: str = "sde"
    num_steps: int = 250
    heun: bool = False
    cfg_scale: float = 1.8
    guidance_low: float = 0.0
    guidance_high: float = 0.7
    path_type: str = "linear"
    cls_cfg_scale: float = None

    def __call__(self, model, z, y, generator=None):
        if model.reg:
            joint = repa.JointClassToken(model, z.shape[1:], self.cls_cfg_scale)
            cls = torch.randn((len(z), model.cls_projectors2.in_features), generator=generator,
                              device=z.device)
            return joint.split(self(joint, joint.join(z, cls), y, generator))[0]
        guidance = (self.cfg_scale, self.guidance_low, self.guidance_high)
        if self.mode == "ddpm":
            return sample_ddpm(model, z, y, self.num_steps, *guidance, generator)
        args = (model, z, y, self.num_steps, self.heun, *guidance, self.path_type)
        return sample_sde(*args, generator) if self.mode == "sde" else sample_ode(*args)


#################################################################################
#         Checkpoints: one small reader per format, one way to build the model   #
#################################################################################
# A plain state dict is by default the released last.pt (a DiT's: DiT-XL/2), at 256 px (official)
PLAIN_MODEL, PLAIN_RESOLUTION = "XL/2", 256


def _merge(stored, overrides):
    """The checkpoint's settings, with flags ('' and 0: unset) filling what it does not store. A
    flag that contradicts the checkpoint is an error: a wrong size or path would only give noise."""
    norm = lambda k, v: v.removeprefix("SiT-") if k == "model" else v
    for k, v in overrides.items():
        if v and stored.get(k) is not None and norm(k, stored[k]) != norm(k, v):
            raise repa.UserError(f"--{k.replace('_', '-')} {v} disagrees with the checkpoint, "
                                 f"which stores {k}={stored[k]}; drop the flag")
    return {**stored, **{k: v for k, v in overrides.items() if v}}


def read_ours(ckpt, weights, overrides):
    """repa.py's checkpoints: `model_kwargs` is the exact SiT(...) call (in_channels 3 means
    pixel space, no VAE); the size and resolution it implies are named to check flags against."""
    kwargs, args = dict(ckpt["model_kwargs"]), dict(ckpt.get("args") or {})
    size = next((name for name, sz in repa.SIZES.items() if all(
        kwargs.get(k, False) == v for k, v in {"learn_sigma": False, **sz}.items()
        if k != "encoder_depth")), None)
    pixels = kwargs["input_size"] * (1 if kwargs["in_channels"] == 3 else repa.VAE_DOWNSAMPLE)
    cfg = _merge(dict(model=size, resolution=pixels, encoder_depth=kwargs.get("encoder_depth"),
                      path_type=args.get("path_type")), overrides)
    return kwargs, ckpt[weights], cfg


def official_kwargs(cfg, state_dict):
    """repa.SiT kwargs for an official checkpoint: encoder and projector widths from the projector
    weights (the official defaults do not fit the released model), and the label table's rows."""
    layers = {}  # projector k -> {layer index: weight}
    for key, value in state_dict.items():
        parts = key.removeprefix("module.").split(".")
        if parts[0] == "projectors" and parts[-1] == "weight":
            layers.setdefault(int(parts[1]), {})[int(parts[2])] = value
    z_dims = [w[max(w)].shape[0] for _, w in sorted(layers.items())]
    projector_dim = layers[0][min(layers[0])].shape[0] if layers else repa.PROJECTOR_DIM
    find = lambda suffix: next((v for k, v in state_dict.items() if k.endswith(suffix)), None)
    rows = getattr(find("embedding_table.weight"), "shape", [None])[0]  # classes (+1: null label)
    num_classes = cfg.get("num_classes") or (rows - 1 if rows else repa.NUM_CLASSES)
    size = repa.size_config(cfg["model"])
    return dict(size, input_size=cfg["resolution"] // repa.VAE_DOWNSAMPLE,
                encoder_depth=cfg.get("encoder_depth") or size["encoder_depth"],
                num_classes=num_classes, qk_norm=bool(cfg.get("qk_norm")), z_dims=z_dims,
                projector_dim=projector_dim, reg=find("cls_projectors2.weight") is not None,
                class_dropout_prob=repa.CLASS_DROPOUT if rows != num_classes else 0.0)


def read_official(ckpt, weights, overrides):
    """The official train.py's {"model", "ema", "opt", "args" (argparse.Namespace), "steps"}."""
    args = vars(ckpt["args"])
    cfg = _merge({k: args.get(k) for k in (*overrides, "num_classes", "qk_norm")}, overrides)
    return official_kwargs(cfg, ckpt[weights]), ckpt[weights], cfg


def read_plain(ckpt, weights, overrides):
    """A bare state dict (the released last.pt, or DiT's): qk-norm and DiT's learned variance (a
    final layer twice as wide as a patch) from the weights, the size from the flags."""
    find = lambda suffix: next((v for k, v in ckpt.items() if k.endswith(suffix)), None)
    patch, final = find("x_embedder.proj.weight"), find("final_layer.linear.weight")
    dit = patch is not None and final is not None and final.shape[0] == 2 * patch[0].numel()
    cfg = dict(overrides, model=overrides["model"] or ("DiT-" if dit else "") + PLAIN_MODEL,
               resolution=overrides["resolution"] or PLAIN_RESOLUTION,
               qk_norm=any(".attn.q_norm." in k for k in ckpt))
    if repa.size_config(cfg["model"]).get("learn_sigma", False) != dit:
        size = cfg["model"].removeprefix("SiT-").removeprefix("DiT-")
        kind = "DiT (eps and a learned variance)" if dit else "SiT"
        raise repa.UserError(f"this state dict is a {kind}, not a {cfg['model']}: use --model "
                             f"{'DiT-' if dit else ''}{size}")
    return official_kwargs(cfg, ckpt), ckpt, cfg


def load_checkpoint(path, device="cpu", use_ema=True, model="", resolution=0, encoder_depth=0,
                    path_type=""):
    """(model in eval mode on `device`, info) from ours, an official checkpoint or a state dict,
    in a file, a run folder or its checkpoints/ (the newest); model ... path_type as the flags.
    info: path, format, path_type, pixel_space, input_size, resolution, steps, class_names."""
    path = repa.checkpoint_in(path)
    ckpt = repa.load_checkpoint(path)  # weights_only, memory-mapped; one line if unreadable
    found = ckpt if isinstance(ckpt, dict) else {}
    fmt, reader = (("ours", read_ours) if "model_kwargs" in found else
                   ("official", read_official) if isinstance(found.get("args"), argparse.Namespace)
                   else ("plain", read_plain) if found and all(map(torch.is_tensor, found.values()))
                   else (None, None))
    if reader is None:
        raise repa.UserError(f"{path}: it is not a SiT checkpoint: expected ours or an official "
                             f"REPA checkpoint ('ema', 'args', ...) or a state dict of tensors")
    kwargs, state_dict, cfg = reader(ckpt, "ema" if use_ema else "model", dict(
        model=model, resolution=resolution, encoder_depth=encoder_depth, path_type=path_type))
    path_type = cfg.get("path_type") or "linear"
    repa.interpolant(torch.zeros(()), path_type)  # an unknown path fails here, not while sampling
    with torch.device(device):  # initialised where it runs: XL/2's init takes a while on a CPU
        model = repa.SiT(**kwargs)
    repa.load_sit_weights(model, state_dict)  # strict; one clear line when it does not fit
    info = dict(path=path, format=fmt, path_type=path_type, pixel_space=model.in_channels == 3,
                input_size=kwargs["input_size"], resolution=cfg["resolution"],
                steps=found.get("steps"),
                class_names=found.get("class_names") or list(range(model.num_classes)))
    return model.eval().requires_grad_(False), info


#################################################################################
#                  Images: batches, PNGs and the FID folder                      #
#################################################################################

def generate(model, vae, labels, generator, solver, input_size):
    """uint8 (B, H, W, 3): z and then the solver's noise drawn from `generator`, one stream."""
    z = torch.randn((len(labels), model.in_channels, input_size, input_size),
                    generator=generator, device=labels.device)
    return decode(solver(model, z, labels, generator), vae)


def save_png(image, path):
    """Atomic: a killed run leaves no truncated PNG that a restart would take as done."""
    repa.atomic_write(path, lambda f: Image.fromarray(image.numpy()).save(f, format="PNG"))


def write_npz(folder, num):
    """The ADM evaluation suite's input: arr_0 = uint8 (N, H, W, 3), images 0 .. N-1 in order."""
    def read(i):
        try:
            return np.asarray(Image.open(f"{folder}/{i:06d}.png").convert("RGB"))
        except (OSError, ValueError) as e:  # missing (on another node's disk) or damaged
            raise repa.UserError(f"{folder}/{i:06d}.png cannot be read ({e}): delete it if it "
                                 f"is there, and the same command samples it again") from None
    arr = np.empty((num, *read(0).shape), dtype=np.uint8)  # preallocated: 50K x 256^2 x 3 = 9.8 GB
    for i in tqdm(range(num), desc="building .npz"):
        arr[i] = read(i)
    repa.atomic_write(f"{folder}.npz", lambda f: np.savez(f, arr_0=arr))
    print(f"wrote {folder}.npz ({num} images)")


def sample_fid(model, vae, info, solver, num, batch, global_seed, folder):
    """{index:06d}.png for index < num in `folder` across ranks, then `folder`.npz. As the official
    generate.py, batch k of rank r holds the indices k G + i W + r (G = n W, i < n); the rank's
    RNG draws one seed per batch, so a restart redoes only the batches with a missing PNG, to the
    same images. Classes are balanced (index i has class i mod num_classes), not random."""
    rank, world, device = repa.setup_distributed()
    stride = batch * world
    batches = math.ceil(num / stride)  # the last batch may run past N: those images are dropped
    os.makedirs(folder, exist_ok=True)  # each rank lists and writes only its own PNGs
    done = set(os.listdir(folder))  # one listing, not 50K stat calls on a network disk
    seeds = torch.randint(2 ** 62, (batches,), generator=torch.Generator().manual_seed(
        global_seed * world + rank)).tolist()
    index = lambda k: [k * stride + i * world + rank for i in range(batch)]
    todo = [k for k in range(batches)  # whole batches are redone, only missing PNGs written
            if any(j < num and f"{j:06d}.png" not in done for j in index(k))]
    count = torch.tensor([len(todo)], device=device)  # on the GPU for NCCL, the CPU for gloo
    if dist.is_initialized():
        dist.all_reduce(count)  # only for the message: each rank works through its own list
    repa.print0(f"{folder}: {sum(f.endswith('.png') for f in done)} of {num} images on disk, "
                f"sampling {count.item()} batches of {world} x {batch}")
    for k in tqdm(todo, desc=f"rank 0 of {world}", unit="batch", disable=rank != 0):
        generator = torch.Generator(device).manual_seed(seeds[k])
        labels = torch.tensor([j % model.num_classes for j in index(k)], device=device)
        images = generate(model, vae, labels, generator, solver, info["input_size"])
        for j, image in zip(index(k), images):
            if j < num and f"{j:06d}.png" not in done:
                save_png(image, f"{folder}/{j:06d}.png")
    repa.barrier()  # every rank has written its PNGs; no barrier after: the .npz can take minutes
    if rank == 0:
        write_npz(folder, num)


def evaluation():
    """tools/evaluate.py (ADM's suite; it imports nothing of ours), for --fid-ref and --evaluate."""
    tools = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools")
    if tools not in sys.path:
        sys.path.insert(0, tools)
    import evaluate
    return evaluate


#################################################################################
#                                  Command line                                  #
#################################################################################

@dataclass
class SampleConfig:
    """The flags of sample.py, generated from these fields as repa.py's are from its Config."""
    ckpt: str = ""              # ours, an official REPA checkpoint, a state dict, or a run folder
    ema: bool = True            # sample the EMA weights (default) or the online ones (--no-ema)
    # the model: only for a plain state dict, the other formats store it
    model: str = ""             # size, e.g. XL/2, SiT-XL/2, DiT-XL/2 (plain: XL/2 or DiT-XL/2)
    resolution: int = 0         # image pixels (plain state dicts: 256)
    encoder_depth: int = 0      # aligned block (plain state dicts: the size table's)
    path_type: str = ""         # linear | cosine (default: the checkpoint's, else linear)
    mode: str = ""              # SiT: sde (default) | ode (Euler, or Heun); DiT: ddpm (its own)
    num_steps: int = 0          # 0: 250 for FID (the paper's), 50 for a grid (a quick look)
    heun: bool = False          # Heun's corrector on the ODE (2N - 1 model calls)
    cfg_scale: float = Solver.cfg_scale  # classifier-free guidance scale; 1 turns guidance off
    cls_cfg_scale: float = -1.0  # REG: the class token's guidance scale (-1: --cfg-scale's; 0: off)
    guidance_low: float = 0.0   # guide only while guidance_low <= t <= guidance_high (t = 0 data)
    guidance_high: float = -1.0  # -1: 0.7 for SiT (the paper's), 1 for DiT (t = timestep / 1000)
    vae: str = "ema"            # ema | mse (stabilityai/sd-vae-ft-*), a HF name or a local folder
    global_seed: int = 0        # rank r of W is seeded with global_seed * W + r (official)
    per_proc_batch_size: int = 32  # images per model call on each process
    num_fid_samples: int = 0    # 0: a grid; N: N PNGs and an .npz for FID (torchrun: many GPUs)
    classes: str = ""           # grid rows, e.g. 207,360 (default: 8 showcase ImageNet classes)
    per_class: int = 4          # grid columns: images per class
    sample_dir: str = ""        # default: results/<run>/samples next to the checkpoint, else ./samples
    tf32: bool = True           # TF32 matmuls on GPUs (official default): faster, ~1e-3 relative
    fid_ref: str = ""           # ADM's reference .npz (arr_0; mu, sigma, mu_s, sigma_s) or images
    evaluate: str = ""          # evaluate this .npz (arr_0) against --fid-ref, instead of sampling
    inception: str = ""         # FID Inception weights ('': torch.hub's cache, as torch-fidelity)


GUIDANCE_RULE = "the guidance interval must satisfy 0 <= --guidance-low <= --guidance-high <= 1"


def parse_args(argv=None):
    """The flags, and their values that would fail late or quietly, checked before anything is
    loaded (the defaults that depend on the model are checked once it is)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(), allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    repa.add_flags(p, SampleConfig)
    args = SampleConfig(**vars(p.parse_args(argv)))
    rules = [(bool(args.ckpt) != bool(args.evaluate),
              "give --ckpt CKPT to sample or --evaluate SAMPLES.npz to evaluate (one of them)"),
             (args.fid_ref or not args.evaluate, "--evaluate needs --fid-ref REF"),
             (not args.fid_ref or args.evaluate or args.num_fid_samples,
              "--fid-ref evaluates the samples of --num-fid-samples N (or of --evaluate)"),
             (all(c.isdecimal() for c in args.classes.split(",")) or not args.classes,
              f"--classes must be class numbers separated by commas, got {args.classes!r}"),
             (args.mode in ("", "sde", "ode", "ddpm"),
              f"--mode must be sde, ode or ddpm, got {args.mode!r}"),
             (not args.heun or args.mode == "ode", "--heun applies to the ODE only: add --mode ode"),
             (all(v >= 0 for v in (args.num_steps, args.num_fid_samples, args.resolution,
                                   args.encoder_depth, args.cfg_scale))
              and min(args.per_class, args.per_proc_batch_size) >= 1,
              "--num-steps, --num-fid-samples, --resolution, --encoder-depth and --cfg-scale must "
              "be at least 0, --per-class and --per-proc-batch-size at least 1"),
             (0 <= args.guidance_low <= (1 if args.guidance_high == -1 else args.guidance_high)
              <= 1, GUIDANCE_RULE),
             (args.cls_cfg_scale >= 0 or args.cls_cfg_scale == -1,
              "--cls-cfg-scale must be at least 0, or -1 for --cfg-scale's")]
    for ok, message in rules:
        if not ok:
            raise repa.UserError(message)
    return args


def output_stem(args, solver, info, world):
    """sample_dir/name (by default results/<run>/samples beside the run's checkpoints/, else
    ./samples). The name holds all that changes the images (world size and batch fix the seeds),
    so a restart with other settings starts a new folder rather than mixing two recipes."""
    parent = os.path.dirname(os.path.abspath(info["path"]))
    sample_dir = args.sample_dir or (os.path.join(os.path.dirname(parent), "samples") if
                                     os.path.basename(parent) == "checkpoints" else "samples")
    stem = os.path.splitext(os.path.basename(info["path"]))[0]
    steps = f"-s{info['steps']}" if info["steps"] is not None else ""
    vae = "" if info["pixel_space"] else f"-vae-{os.path.basename(os.path.normpath(args.vae))}"
    return os.path.join(sample_dir, (
        f"{stem}{steps}-{'ema' if args.ema else 'raw'}{vae}-{solver.mode}{solver.num_steps}"
        f"{'-heun' if solver.heun else ''}-cfg{solver.cfg_scale}-{solver.guidance_low}-"
        f"{solver.guidance_high}-{solver.path_type}"
        f"{'' if solver.cls_cfg_scale is None else f'-cls{solver.cls_cfg_scale}'}"
        f"-seed{args.global_seed}-{world}x"
        f"{args.per_proc_batch_size}"))


def make_solver(args, model, path_type):
    """The Solver of the flags, with the defaults that depend on the model (see SampleConfig)."""
    dit = model.learn_sigma
    mode = args.mode or ("ddpm" if dit else "sde")
    if (mode == "ddpm") != dit:
        raise repa.UserError(f"this is a {'DiT' if dit else 'SiT'}: it samples with --mode "
                             f"{'ddpm (eps and a learned variance)' if dit else 'sde or ode'}")
    high = args.guidance_high if args.guidance_high >= 0 else 1.0 if dit else Solver.guidance_high
    if args.guidance_low > high:
        raise repa.UserError(GUIDANCE_RULE)
    if args.cls_cfg_scale >= 0 and not model.reg:
        raise repa.UserError("--cls-cfg-scale guides REG's class token, and this model has "
                             "none (it trained without --reg): drop the flag")
    steps = args.num_steps or (Solver.num_steps if args.num_fid_samples else 50)
    cls = (args.cfg_scale if args.cls_cfg_scale < 0 else args.cls_cfg_scale) if model.reg else None
    return Solver(mode, steps, args.heun, args.cfg_scale, args.guidance_low, high, path_type, cls)


@torch.no_grad()  # a context, not set_grad_enabled: tests call main() in their own process
def run(args):
    torch.backends.cuda.matmul.allow_tf32 = args.tf32  # as the official generate.py (CUDA only)
    rank, world, device = repa.setup_distributed()  # NCCL on GPUs, gloo on CPUs, or none
    if args.evaluate:  # an .npz from anywhere (ours, the official code's, a peer's): no model
        return evaluation().evaluate(args.evaluate, args.fid_ref, args.inception,
                                     args.per_proc_batch_size)
    model, info = load_checkpoint(args.ckpt, device, args.ema, args.model, args.resolution,
                                  args.encoder_depth, args.path_type)
    if args.fid_ref:  # a bad reference fails now, not after hours of sampling; missing weights
        evaluation().check_evaluation(None, args.fid_ref, info["resolution"])  # the weights
        if evaluation().inception_weights(args.inception) is None:  # can be fetched meanwhile
            repa.print0(f"warning: {evaluation().missing_inception()}; sampling goes on, and the "
                        "evaluation at its end needs them")
    if args.cfg_scale != 1 and model.y_embedder.embedding_table.num_embeddings == model.num_classes:
        raise repa.UserError("this model trained without label dropout (cfg_prob 0), so it "
                             "has no null label to guide with: use --cfg-scale 1")
    solver = make_solver(args, model, info["path_type"])
    # samples are decoded with ft-ema (official), although the latents were made with ft-mse
    vae = None if info["pixel_space"] else repa.load_vae(VAES.get(args.vae, args.vae), device)
    stem = output_stem(args, solver, info, world)
    if args.num_fid_samples:
        sample_fid(model, vae, info, solver, args.num_fid_samples, args.per_proc_batch_size,
                   args.global_seed, stem)
        if args.fid_ref:
            repa.barrier()  # rank 0 has written the .npz
            try:
                evaluation().evaluate(f"{stem}.npz", args.fid_ref, args.inception,
                                      args.per_proc_batch_size)
            except evaluation().UserError as e:  # exit 2: no numbers; but the samples are safe
                raise repa.UserError(f"{e}; the samples are kept, evaluate them with: python "
                                     f"sample.py --evaluate {stem}.npz --fid-ref {args.fid_ref}")
    elif rank == 0:  # a grid is one process's work
        classes = ([int(c) for c in args.classes.split(",")] if args.classes else
                   GRID_CLASSES if model.num_classes == repa.NUM_CLASSES else
                   list(range(min(10, model.num_classes))))
        if not all(0 <= c < model.num_classes for c in classes):
            raise repa.UserError(f"--classes must be in [0, {model.num_classes})")
        labels = torch.tensor(classes, device=device).repeat_interleave(args.per_class)
        # one generator for the whole grid, drawn chunk after chunk: the grid depends on the seed
        # and on --per-proc-batch-size, like the official sample.py on one device
        generator = torch.Generator(device).manual_seed(args.global_seed)
        images = torch.cat([generate(model, vae, chunk, generator, solver, info["input_size"])
                            for chunk in labels.split(args.per_proc_batch_size)])
        shown = f"-classes{'_'.join(map(str, classes))}" if args.classes else ""
        path = f"{stem}{shown}-x{args.per_class}-grid.png"
        save_grid(images, [info["class_names"][c] for c in classes], path)
        print(f"wrote {path} ({len(classes)} classes x {args.per_class})")


def main(argv=None):
    try:
        run(parse_args(argv))
    except (repa.UserError, evaluation().UserError, FileExistsError, NotADirectoryError) as e:
        print(f"error: {repa.in_words(e)}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
