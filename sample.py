"""
Sampling for REPA: the ODE and SDE solvers of the official code, with classifier-free guidance and
its guidance interval, and DiT's DDPM sampler; a labelled PNG grid to look at; 50K images plus
the `.npz` for FID; and the evaluation of that `.npz` in-process: FID, sFID, Inception Score,
precision and recall as ADM's suite computes them, on torch-fidelity's port of its TensorFlow
Inception (no TensorFlow needed).

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
  python sample.py --help                              # every flag, with its default
  torchrun --nproc_per_node=8 sample.py --ckpt C --num-fid-samples 50000   # PNGs + .npz for FID
  torchrun --nproc_per_node=8 sample.py --ckpt C --num-fid-samples 50000 --fid-ref REF.npz
                                 # ... then FID, sFID, IS, precision and recall against REF, e.g.
                                 # ADM's VIRTUAL_imagenet256_labeled.npz, or a folder of images
  python sample.py --evaluate SAMPLES.npz --fid-ref REF.npz   # the same for any .npz
  python sample.py --ckpt last.pt --model XL/2 --resolution 256 --encoder-depth 8   # released
  python sample.py --ckpt DiT-XL-2-256x256.pt --model DiT-XL/2 --resolution 256 --cfg-scale 1.5

Numbers match the official samplers (sihyun-yu/REPA samplers.py) to float64 rounding, and DiT's
sampler (facebookresearch/DiT) to the bit on a CPU; see test_repa.py for the golden runs.
"""
import argparse
import contextlib
import json
import math
import os
import re
import sys
import warnings
import zipfile
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.distributed as dist  # set up by repa.setup_distributed (torchrun env)

import repa

# The default grid: DiT's and REPA's showcase ImageNet classes (golden retriever, otter, red panda,
# geyser, macaw, valley, balloon, arctic fox). Models with fewer classes show their first 8.
GRID_CLASSES = [207, 360, 387, 974, 88, 979, 417, 279]
VAES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
SDE_T_LAST = 0.04  # the SDE's last noisy time; from there one mean step goes to t = 0 (official)


#################################################################################
#             Guidance (CFG and its interval), and the guided velocity          #
#################################################################################

def guidance_scale(cfg_scale, t, guidance_low, guidance_high):
    """The CFG scale at time t: cfg_scale inside [guidance_low, guidance_high], else 1 (none).
    Inclusive on both ends, compared in float64: with 5 ODE steps t = 0.2 exactly, so an interval
    starting at 0.2 guides the last step (as the official code does)."""
    return cfg_scale if guidance_low <= t <= guidance_high else 1.0


def guided(model, x, t, y, cfg_scale, dtype, mixed_channels=None):
    """model(x, t, y)[0] as `dtype`; with cfg_scale > 1, classifier-free guidance
    out = uncond + cfg_scale (cond - uncond) on the first `mixed_channels` channels (all by
    default; DiT's eps), the others (DiT's variance value) being the conditional half's.

    This is the only place where guidance happens. One batched call: the conditional half first,
    then the same x with the null label (row `num_classes` of the label table, learned through
    label dropout in training; the official code hard-codes 1000, the same for ImageNet)."""
    if cfg_scale <= 1:
        return model(x, t, y)[0].to(dtype)
    null = torch.full_like(y, model.num_classes)
    cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))[0].to(
        dtype).chunk(2)
    k = mixed_channels or cond.shape[1]
    return torch.cat([uncond[:, :k] + cfg_scale * (cond[:, :k] - uncond[:, :k]), cond[:, k:]], 1)


def velocity(model, x, t, y, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0,
             dtype=torch.float32, guide_t=None):
    """v(x, t | y) in float64, with classifier-free guidance while t is in the guidance interval.

    x is the float64 solver state (B, C, H, W); t a float64 Python float. The model sees x and t
    cast to `dtype` (the latents' dtype, as in the official samplers: float32 t, not float64) and
    t broadcast to the batch. `guide_t` is the time at which guidance is decided (default t):
    the official Heun corrector decides at the step's start t_cur, not at the t_next it evaluates.

    The official SDE guides the drift rather than v, but the drift is affine in v at fixed (x, t),
    d = a v + b x, and an affine map commutes with u + w (c - u) (its weights 1 - w and w sum to
    1): guiding v gives the same drift."""
    scale = guidance_scale(cfg_scale, t if guide_t is None else guide_t, guidance_low,
                           guidance_high)
    t_batch = torch.full((x.shape[0],), t, dtype=dtype, device=x.device)
    return guided(model, x.to(dtype), t_batch, y, scale, torch.float64)


def score(v, x, t, path_type="linear"):
    """grad_x log p_t(x) from the velocity (float64), using the path of repa.interpolant.

    x = alpha E[x_*|x] + sigma E[eps|x] and v = alpha' E[x_*|x] + sigma' E[eps|x]; eliminating
    E[x_*|x] gives r v - x = (r sigma' - sigma) E[eps|x] with r = alpha / alpha', and the score of
    a Gaussian perturbation is -E[eps|x] / sigma. Linear path: s = ((t - 1) v - x) / t."""
    alpha, sigma, d_alpha, d_sigma = repa.interpolant(
        torch.tensor(t, dtype=torch.float64, device=x.device), path_type)
    ratio = alpha / d_alpha
    return (ratio * v - x) / (sigma ** 2 - ratio * d_sigma * sigma)


#################################################################################
#                    Solvers: ODE (Euler, Heun) and SDE (Euler-Maruyama)         #
#################################################################################

@torch.no_grad()
def sample_ode(model, z, y, num_steps=50, heun=False, cfg_scale=1.0, guidance_low=0.0,
               guidance_high=1.0, path_type="linear"):
    """Integrate dx = v dt from noise z (t = 1) to data (t = 0); returns float64 (B, C, H, W).

    path_type is not needed: the ODE only follows v, which the model gives for its own path
    (the official sampler ignores it too); it is checked and accepted so both solvers share one
    signature. The state stays float64 throughout, so 250 small steps add no rounding drift."""
    repa.interpolant(torch.zeros(()), path_type)  # an unknown path is an error, not ignored
    v = lambda x, t, **kw: velocity(model, x, t, y, cfg_scale, guidance_low, guidance_high,
                                    z.dtype, **kw)
    ts = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64).tolist()
    x = z.to(torch.float64)
    for i, (t_cur, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        d = v(x, t_cur)
        x_next = x + (t_next - t_cur) * d                        # Euler predictor
        if heun and i < num_steps - 1:
            # trapezoid rule: average the slopes at both ends (second order). The last step
            # would evaluate v at t = 0 exactly, so it stays Euler. Guidance of the corrector
            # is decided at t_cur (official), so the two slopes always agree on being guided.
            d_next = v(x_next, t_next, guide_t=t_cur)
            x_next = x + (t_next - t_cur) * (0.5 * d + 0.5 * d_next)
        x = x_next
    return x


@torch.no_grad()
def sample_sde(model, z, y, num_steps=50, heun=False, cfg_scale=1.0, guidance_low=0.0,
               guidance_high=1.0, path_type="linear", generator=None):
    """Euler-Maruyama on the reverse SDE dx = [v - t s] dt + sqrt(2t) dW from z (t = 1) to t = 0;
    returns float64 (B, C, H, W).

    Grid: linspace(1, 0.04, num_steps) then 0: num_steps - 1 noisy steps and a final mean step.
    Each noisy step draws eps ~ N(0, I) of the latent's shape in float64 *before* the model call,
    from `generator` (the global RNG when None), so a seeded run equals the official one.
    heun is accepted (the official signature has it) but Euler-Maruyama has no corrector."""
    if heun:
        raise repa.UserError("heun applies to the ODE only (mode ode)")
    ts = torch.cat([torch.linspace(1, SDE_T_LAST, num_steps, dtype=torch.float64),
                    torch.zeros(1, dtype=torch.float64)]).tolist()
    x = z.to(torch.float64)
    for i, (t_cur, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        dt = t_next - t_cur                                      # negative: time runs backwards
        noisy = i < num_steps - 1
        if noisy:
            eps = torch.randn(x.shape, generator=generator, dtype=torch.float64, device=x.device)
        v = velocity(model, x, t_cur, y, cfg_scale, guidance_low, guidance_high, z.dtype)
        w = 2 * t_cur                                            # diffusion coefficient w(t)
        drift = v - 0.5 * w * score(v, x, t_cur, path_type)
        if noisy:  # the noise enters as sqrt(w) dW, with dW = eps sqrt(|dt|)
            x = x + drift * dt + math.sqrt(w) * (eps * math.sqrt(abs(dt)))
        else:      # 0.04 -> 0: the mean of the transition only, a final denoising step
            x = x + dt * drift
    return x


#################################################################################
#         DiT's sampler: ancestral steps of the improved DDPM (learned variance)  #
#################################################################################

@torch.no_grad()
def sample_ddpm(model, z, y, num_steps=250, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0,
                generator=None):
    """DiT's sampler (its sample_ddp.py, for FID): ancestral steps x <- mean + sigma noise of the
    model's p(x_{k-1} | x_k) down the chain respaced to `num_steps` (repa.ddpm_schedule), from
    noise z to data; returns z's dtype (float32, like the official: no float64 state here).

    Each step calls the model with the ORIGINAL timestep k (int64), then draws the step's noise
    (torch.randn_like, or `generator`); the last step's draw is masked, so there are num_steps
    draws. Guidance is on while k / 1000 (its t, 0 = data) is in [guidance_low, guidance_high]."""
    sched = repa.ddpm_schedule(num_steps, z.device)
    x = z
    for i, k in reversed(list(enumerate(repa.space_timesteps(num_steps)))):
        t = torch.full((x.shape[0],), i, device=x.device)  # the step of the respaced tables
        scale = guidance_scale(cfg_scale, k / repa.DDPM_STEPS, guidance_low, guidance_high)
        out = guided(model, x, torch.full_like(t, k), y, scale, x.dtype, x.shape[1])
        mean, log_var, _ = repa.ddpm_model_gaussian(sched, x, t, *out.chunk(2, dim=1))
        noise = torch.randn_like(x) if generator is None else torch.randn(
            x.shape, generator=generator, dtype=x.dtype, device=x.device)
        x = mean + float(i > 0) * torch.exp(0.5 * log_var) * noise  # no noise into x_0
    return x


@dataclass(frozen=True)
class Solver:
    """A sampling recipe: which solver, how many steps, and the guidance. Calling it solves from
    noise z to data for labels y; `generator` feeds the SDE's and the DDPM's noise. Modes sde and
    ode are for SiT (velocity), ddpm for DiT (eps and variance)."""
    mode: str = "sde"
    num_steps: int = 250
    heun: bool = False
    cfg_scale: float = 1.8
    guidance_low: float = 0.0
    guidance_high: float = 0.7
    path_type: str = "linear"

    def __call__(self, model, z, y, generator=None):
        if self.mode == "ddpm":
            return sample_ddpm(model, z, y, self.num_steps, self.cfg_scale, self.guidance_low,
                               self.guidance_high, generator)
        kwargs = dict(num_steps=self.num_steps, heun=self.heun, cfg_scale=self.cfg_scale,
                      guidance_low=self.guidance_low, guidance_high=self.guidance_high,
                      path_type=self.path_type)
        if self.mode == "sde":
            return sample_sde(model, z, y, generator=generator, **kwargs)
        return sample_ode(model, z, y, **kwargs)


#################################################################################
#         Checkpoints: one small reader per format, one way to build the model   #
#################################################################################
# Each reader takes the loaded file and returns (model_kwargs, state_dict, cfg): the exact
# repa.SiT(...) call, the weights, and the settings a user may also give as flags (`OVERRIDES`).
OVERRIDES = ("model", "resolution", "encoder_depth", "path_type", "num_classes", "qk_norm")
PLAIN_MODEL = "XL/2"  # the released last.pt; the official generate.py's defaults: 256 px, linear
# (for a DiT state dict, DiT-XL/2: the released DiT-XL-2-256x256.pt and -512x512.pt)


def _merge(stored, overrides):
    """The checkpoint's settings, with command-line values filling what it does not store. A flag
    that contradicts the checkpoint is an error: a wrong size or path would only give noise."""
    cfg = dict(stored)
    norm = lambda k, v: v.removeprefix("SiT-") if k == "model" and isinstance(v, str) else v
    for k, v in overrides.items():
        if v is None:
            continue
        if cfg.get(k) is not None and norm(k, cfg[k]) != norm(k, v):
            raise repa.UserError(f"--{k.replace('_', '-')} {v} disagrees with the checkpoint, "
                                 f"which stores {k}={cfg[k]}; drop the flag")
        cfg[k] = v
    return cfg


def read_ours(ckpt, weights, overrides):
    """repa.py's checkpoints: `model_kwargs` is the exact SiT(...) call (in_channels 3 means
    pixel space, no VAE); the size and resolution it implies are named to check flags against."""
    kwargs, args = dict(ckpt["model_kwargs"]), dict(ckpt.get("args") or {})
    size = next((name for name, sz in repa.SIZES.items() if all(  # SiT sizes: learn_sigma False
        kwargs.get(k, False) == v for k, v in {"learn_sigma": False, **sz}.items()
        if k != "encoder_depth")), None)
    pixels = kwargs["input_size"] * (1 if kwargs["in_channels"] == 3 else repa.VAE_DOWNSAMPLE)
    stored = {k: kwargs.get(k) for k in ("encoder_depth", "num_classes", "qk_norm")}
    cfg = _merge(dict(stored, model=size, resolution=pixels, path_type=args.get("path_type")),
                 overrides)
    return kwargs, ckpt[weights], cfg


def official_kwargs(cfg, state_dict):
    """repa.SiT kwargs for an official checkpoint. The encoder widths and the projector width come
    from the projector weights (the file stores only the encoder's name, and the official
    generate.py's default widths do not fit the released model); the null label row exists only
    if the model was trained with label dropout."""
    layers = {}  # projector k -> {layer index: weight}
    for key, value in state_dict.items():
        parts = key.removeprefix("module.").split(".")
        if parts[0] == "projectors" and parts[-1] == "weight":
            layers.setdefault(int(parts[1]), {})[int(parts[2])] = value
    z_dims = [w[max(w)].shape[0] for _, w in sorted(layers.items())]
    projector_dim = layers[0][min(layers[0])].shape[0] if layers else repa.PROJECTOR_DIM
    num_classes = cfg.get("num_classes") or repa.NUM_CLASSES
    rows = next((v.shape[0] for k, v in state_dict.items()
                 if k.endswith("embedding_table.weight")), num_classes + 1)
    size = repa.size_config(cfg["model"])
    return dict(size, input_size=(cfg.get("resolution") or 256) // repa.VAE_DOWNSAMPLE,
                encoder_depth=cfg.get("encoder_depth") or size["encoder_depth"],
                num_classes=num_classes, qk_norm=bool(cfg.get("qk_norm")), z_dims=z_dims,
                projector_dim=projector_dim,
                class_dropout_prob=repa.CLASS_DROPOUT if rows > num_classes else 0.0)


def read_official(ckpt, weights, overrides):
    """The official train.py's {"model", "ema", "opt", "args" (argparse.Namespace), "steps"}."""
    args = vars(ckpt["args"])
    cfg = _merge({k: args.get(k) for k in OVERRIDES}, overrides)
    return official_kwargs(cfg, ckpt[weights]), ckpt[weights], cfg


def read_plain(ckpt, weights, overrides):
    """A bare state dict: the released REPA XL/2 last.pt (legacy `decoder_blocks.*` keys) or an
    official DiT checkpoint. The class count, qk-norm and DiT's learned variance (a final layer
    twice as wide as a patch) are read from the weights; the size comes from the flags."""
    find = lambda suffix: next((v for k, v in ckpt.items() if k.endswith(suffix)), None)
    table, patch, final = (find(k) for k in ("embedding_table.weight", "x_embedder.proj.weight",
                                             "final_layer.linear.weight"))
    dit = patch is not None and final is not None and final.shape[0] == 2 * patch[0].numel()
    inferred = dict(num_classes=None if table is None else table.shape[0] - 1,
                    qk_norm=any(".attn.q_norm." in k for k in ckpt))
    cfg = _merge(dict(inferred, model=None), overrides)
    cfg["model"] = cfg["model"] or ("DiT-" if dit else "") + PLAIN_MODEL
    if repa.size_config(cfg["model"]).get("learn_sigma", False) != dit:
        size = cfg["model"].removeprefix("SiT-").removeprefix("DiT-")
        kind = "DiT (eps and a learned variance)" if dit else "SiT"
        raise repa.UserError(f"this state dict is a {kind}, not a {cfg['model']}: use --model "
                             f"{'DiT-' if dit else ''}{size}")
    return official_kwargs(cfg, ckpt), ckpt, cfg


def read_format(ckpt):
    """(name, reader) for a loaded checkpoint, or one clear error."""
    if isinstance(ckpt, dict) and "model_kwargs" in ckpt:
        return "ours", read_ours
    if isinstance(ckpt, dict) and isinstance(ckpt.get("args"), argparse.Namespace):
        return "official", read_official
    if isinstance(ckpt, dict) and ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        return "plain", read_plain
    raise repa.UserError("it is not a SiT checkpoint: expected ours or an official REPA "
                         "checkpoint ('ema', 'args', ...) or a state dict of tensors")


def load_checkpoint(path, device="cpu", use_ema=True, **overrides):
    """(model in eval mode on `device`, info) from our checkpoints, the official ones, or a plain
    state dict; `path` may also be a run folder (results/<run>) or its checkpoints/ (the newest).

    overrides: model, resolution, encoder_depth, path_type, num_classes, qk_norm (None = unset).
    info: path (the file read), format, path_type, pixel_space, input_size (the model's),
    resolution (the images'), num_classes, steps, class_names (None where it stores none)."""
    unknown = set(overrides) - set(OVERRIDES)
    if unknown:
        raise TypeError(f"unknown overrides {sorted(unknown)}; choose from {OVERRIDES}")
    path = repa.checkpoint_in(path)
    ckpt = repa.load_checkpoint(path)  # weights_only, memory-mapped; one line if unreadable
    try:
        fmt, reader = read_format(ckpt)
    except repa.UserError as e:
        raise repa.UserError(f"{path}: {e}") from None
    kwargs, state_dict, cfg = reader(ckpt, "ema" if use_ema else "model", overrides)
    with torch.device(device):  # initialised where it runs: XL/2's init takes a while on a CPU
        model = repa.SiT(**kwargs)
    repa.load_sit_weights(model, state_dict)  # strict; one clear line when it does not fit
    info = dict(path=path, format=fmt, path_type=cfg.get("path_type") or "linear",
                pixel_space=model.in_channels == 3, input_size=kwargs["input_size"],
                resolution=cfg.get("resolution") or 256, num_classes=model.num_classes,
                steps=ckpt.get("steps") if fmt != "plain" else None,
                class_names=ckpt.get("class_names"))
    return model.eval().requires_grad_(False), info


#################################################################################
#                    Images: decode, uint8, grid, FID folder                     #
#################################################################################

def to_uint8(x):
    """Images in [-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3) on the CPU, as the official
    generate.py: clamp(255 (x + 1) / 2, 0, 255), then a cast that truncates rather than rounds.
    The FID numbers were computed on these bytes, so we keep the truncation."""
    return torch.clamp(255.0 * ((x + 1) / 2), 0, 255).permute(0, 2, 3, 1).to("cpu", torch.uint8)


def decode(x, vae):
    """Solver output (float64) -> uint8 images. Latent models go through the SD-VAE: z / 0.18215
    undoes the scaling applied in training (bias 0). Pixel-space (demo) models have no VAE."""
    x = x.to(torch.float32)
    if vae is not None:
        # divide by a tensor, as the official code does: CUDA divides by a Python scalar as a
        # multiplication by its reciprocal, which can differ in the last bit
        x = vae.decode(x / torch.full((1,), repa.LATENT_SCALE, device=x.device)).sample
    return to_uint8(x)


def generate(model, vae, labels, generator, solver, input_size):
    """One batch: draw z from `generator`, solve, decode. Returns uint8 (B, H, W, 3). The SDE's
    noise comes from the same generator, so z and the noise are one stream."""
    z = torch.randn((len(labels), model.in_channels, input_size, input_size),
                    generator=generator, device=labels.device)
    return decode(solver(model, z, labels, generator), vae)


def save_grid(images, names, path):
    """uint8 (rows * cols, H, W, 3), one class per row -> a PNG with the class name (or id) left
    of each row. Small images (a 16 px demo) are enlarged without smoothing so a person can see
    them."""
    from PIL import Image, ImageDraw
    rows = len(names)
    cols, h, w = len(images) // rows, images.shape[1], images.shape[2]
    zoom = max(1, 64 // h)
    h, w, pad, margin = h * zoom, w * zoom, 2, 56
    grid = Image.new("RGB", (margin + cols * (w + pad), rows * (h + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for r, name in enumerate(names):
        draw.text((4, r * (h + pad) + h // 2 - 6), str(name), fill="black")
        for j in range(cols):
            tile = Image.fromarray(images[r * cols + j].numpy()).resize((w, h), Image.NEAREST)
            grid.paste(tile, (margin + j * (w + pad), r * (h + pad)))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    repa.atomic_write(path, lambda f: grid.save(f, format="PNG"))


def save_png(image, path):
    """Written atomically, so that a killed run never leaves a truncated PNG that a restart would
    take as done."""
    from PIL import Image
    repa.atomic_write(path, lambda f: Image.fromarray(image.numpy()).save(f, format="PNG"))


def write_npz(folder, num):
    """The ADM evaluation suite's input: arr_0 = uint8 (N, H, W, 3), images 0 .. N-1 in order."""
    from PIL import Image
    from tqdm import tqdm
    missing = [i for i in range(num) if not os.path.isfile(f"{folder}/{i:06d}.png")]
    if missing:
        raise repa.UserError(f"{len(missing)} images are missing in {folder} (first "
                             f"{missing[0]:06d}.png); run the same command again to finish them")
    def read(i):
        try:
            return np.asarray(Image.open(f"{folder}/{i:06d}.png").convert("RGB"))
        except (OSError, ValueError) as e:  # written atomically by us: damaged since
            raise repa.UserError(f"{folder}/{i:06d}.png cannot be read ({e}): delete it, and "
                                 f"the same command samples it again") from None
    first = read(0)
    arr = np.empty((num, *first.shape), dtype=np.uint8)  # preallocated: 50K x 256^2 x 3 = 9.8 GB
    for i in tqdm(range(num), desc="building .npz"):
        arr[i] = read(i)
    repa.atomic_write(f"{folder}.npz", lambda f: np.savez(f, arr_0=arr))
    return f"{folder}.npz"


def sample_fid(model, vae, info, solver, num, batch, global_seed, folder):
    """Write {index:06d}.png for index < num into `folder` across ranks; rank 0 then writes the
    .npz, whose path every rank returns.

    Layout and seeds follow the official generate.py: batch k of rank r holds the indices
    k G + i W + r (G = n W, i < n), and the rank's RNG is seeded with global_seed * W + r. That
    seed draws one seed per batch, so a batch's images do not depend on the batches before it:
    a restart redoes only the batches with a missing PNG and gets the very same images.
    Classes are balanced (index i has class i mod num_classes), unlike the official random ones."""
    from tqdm import tqdm
    rank, world, device = repa.setup_distributed()
    stride = batch * world
    batches = math.ceil(num / stride)  # the last batch may run past N: those images are dropped
    if rank == 0:
        os.makedirs(folder, exist_ok=True)
    repa.barrier()
    done = set(os.listdir(folder))  # one listing, not 50K stat calls on a network disk
    seeds = torch.randint(2 ** 62, (batches,), generator=torch.Generator().manual_seed(
        global_seed * world + rank)).tolist()
    todo = []  # whole batches are redone (deterministic), but only missing PNGs are written
    for k in range(batches):
        index = [k * stride + i * world + rank for i in range(batch)]
        if any(j < num and f"{j:06d}.png" not in done for j in index):
            todo.append((k, index))
    count = torch.tensor([len(todo)], device=device)  # on the GPU for NCCL, the CPU for gloo
    if dist.is_initialized():
        dist.all_reduce(count)  # only for the message: each rank works through its own list
    repa.print0(f"{folder}: {sum(f.endswith('.png') for f in done)} of {num} images on disk, "
                f"sampling {count.item()} batches of {world} x {batch}")
    for k, index in tqdm(todo, desc=f"rank 0 of {world}", unit="batch", disable=rank != 0):
        generator = torch.Generator(device).manual_seed(seeds[k])
        labels = torch.tensor([j % model.num_classes for j in index], device=device)
        images = generate(model, vae, labels, generator, solver, info["input_size"])
        for j, image in zip(index, images):
            if j < num and f"{j:06d}.png" not in done:
                save_png(image, f"{folder}/{j:06d}.png")
    repa.barrier()  # every rank has written its PNGs; no barrier after: the .npz can take minutes
    if rank == 0:
        path = write_npz(folder, num)
        print(f"wrote {path} ({num} images)")
    return f"{folder}.npz"


#################################################################################
#            Evaluation: FID, sFID, IS, precision/recall (ADM's suite)          #
#################################################################################
# The paper's numbers come from ADM's evaluator (guided-diffusion, evaluations/evaluator.py) run
# over the .npz above, with TensorFlow's InceptionV3 graph of 2015-12-05. We run that network in
# PyTorch as torch-fidelity ports it: the same weights, and a resize to 299 x 299 that is TF1's
# ResizeBilinear bit for bit (pytorch-fid's F.interpolate is off by up to 32.7 / 255; README).
# The features, TF graph name -> torch-fidelity module:
#   pool_3:0                 the final average pool, (N, 2048): FID, precision/recall
#   softmax logits           pool_3 @ W without the bias ("logits_unbiased"), (N, 1008): IS
#   mixed_6/conv:0[..., :7]  Mixed_6d.branch1x1 (conv, BN, ReLU), its first 7 of 192 channels,
#                            flattened in TF's (H, W, C) order, (N, 17 * 17 * 7 = 2023): sFID
# TF's mixed, mixed_1, ..., mixed_10 are Mixed_5b, 5c, 5d, 6a, ..., 7c in order, so mixed_6 is
# Mixed_6d, and its first conv ("conv", not "tower/conv") is the 1 x 1 branch.
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
# looked up in torch.hub's cache, where torch-fidelity downloads it; pytorch-fid's conversion of
# the same graph (the same sha256 prefix, 6726825d) is taken under its own name too
INCEPTION_FILES = ("weights-inception-2015-12-05-6726825d.pth",
                   "pt_inception-2015-12-05-6726825d.pth")
SPATIAL_CHANNELS = 7  # sFID keeps mixed_6/conv[..., :7] (ADM)
FEATURE_DIMS = (2048, 17 * 17 * SPATIAL_CHANNELS, 1008)  # pool_3, spatial, logits
IS_CHUNK = 5_000      # the Inception Score is a mean over consecutive chunks of 5,000 samples (ADM)
PR_K = 3              # k of the k-NN balls of precision/recall (ADM's nhood_sizes)
PR_BLOCK = 10_000     # rows and columns of one block of distances (ADM's row/col batch size)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64, as ADM's:

        FD = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).

    sigma1 sigma2 has the eigenvalues of the PSD sigma1^(1/2) sigma2 sigma1^(1/2): real, >= 0.
    With fewer samples than dimensions the product is (near-)singular, and scipy's sqrtm returns
    tiny imaginary parts, which ADM drops if those on the diagonal are below 1e-3; if the root is
    not finite at all, ADM retries with eps added to both diagonals. So do we."""
    import scipy.linalg  # called through the module, so a test can stand in for a 10 s sqrtm
    mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise repa.UserError(f"the statistics do not match: means of {mu1.shape} and "
                             f"{mu2.shape}, covariances of {sigma1.shape} and {sigma2.shape}")
    with warnings.catch_warnings():  # "matrix is singular": the expected case just described
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = eps * np.eye(len(sigma1))
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"(sigma1 sigma2)^(1/2) is complex: imaginary parts up to "
                             f"{np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def gaussian_statistics(features):
    """(mu, sigma) of features (N, D) in float64: the mean and the unbiased covariance (ADM's)."""
    features = np.asarray(features, np.float64)
    return features.mean(0), np.cov(features, rowvar=False)


def inception_score(logits, chunk=IS_CHUNK):
    """IS = exp(E_x KL(p(y|x) || p(y))) of Salimans et al. 2016, with p(y|x) = softmax(logits) and
    p(y) the mean prediction of each consecutive chunk of `chunk` samples (the last may be
    shorter); the score is the chunks' mean, as ADM's (split_size 5,000: 10 chunks for 50,000
    samples, 2 for 10,000). Smaller chunks give a lower score, so IS compares only at equal N.
    In float64 from log-softmax (ADM: float32 softmax, then log), so a p of 0 is no NaN."""
    logp = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1)
    scores = []
    for part in logp.split(chunk):
        log_py = torch.logsumexp(part, 0) - math.log(len(part))  # log of the chunk's p(y)
        scores.append((part.exp() * (part - log_py)).sum(1).mean().exp())
    return torch.stack(scores).mean().item()


def _squared_distances(u, v):
    """max(|u|^2 - 2 u.v + |v|^2, 0) for all pairs (len(u), len(v)), as ADM's DistanceBlock: in
    float16 (ADM casts the features, so every op rounds to float16), or in float32 when that is
    not finite. Pool_3 features have |x|^2 of a few hundred, far below float16's 65504, so ADM's
    precision/recall run on float16 distances. We round where each TF op does, with products
    summed in float32 (as half-precision matmuls and sums accumulate on GPUs)."""
    half = lambda x: x.half().float()
    u16, v16 = half(u), half(v)
    nu, nv = half(half(u16 * u16).sum(1)), half(half(v16 * v16).sum(1))
    d = half(half(nu[:, None] - half(2 * half(u16 @ v16.T))) + nv).clamp_min(0)
    if torch.isfinite(d).all():
        return d
    return ((u * u).sum(1)[:, None] - 2 * u @ v.T + (v * v).sum(1)).clamp_min(0)


def manifold_radii(features, k=PR_K, block=PR_BLOCK):
    """Each point's squared distance to its k-th nearest neighbour in its own set: index k of its
    sorted distances, which start with the point itself (ADM). Streamed over blocks of columns,
    keeping the k + 1 smallest so far: memory of a block x block, not ADM's block x N."""
    radii = []
    for rows in features.split(block):
        nearest = rows.new_empty(len(rows), 0)
        for cols in features.split(block):
            nearest = torch.cat([nearest, _squared_distances(rows, cols)], 1)
            nearest = nearest.topk(min(k + 1, nearest.shape[1]), dim=1, largest=False).values
        radii.append(nearest[:, k])
    return torch.cat(radii)


def precision_recall(real, fake, k=PR_K, block=PR_BLOCK):
    """Improved precision and recall (Kynkäänniemi et al. 2019), as ADM's compute_prec_recall:
    precision = the share of fake points inside the ball of at least one real point, recall = the
    share of real points inside the ball of at least one fake point, where x is inside y's ball
    when |x - y|^2 <= (y's radius)^2 (manifold_radii; squared and `<=`, as ADM). Features are
    (N, D) float32 tensors on any device; 50K x 50K distances are never held at once."""
    radii_real, radii_fake = manifold_radii(real, k, block), manifold_radii(fake, k, block)
    real_in = torch.zeros(len(real), dtype=torch.bool, device=real.device)
    fake_in = torch.zeros(len(fake), dtype=torch.bool, device=fake.device)
    for i in range(0, len(real), block):
        for j in range(0, len(fake), block):
            d = _squared_distances(real[i:i + block], fake[j:j + block])
            real_in[i:i + block] |= (d <= radii_fake[j:j + block]).any(1)
            fake_in[j:j + block] |= (d <= radii_real[i:i + block, None]).any(0)
    return fake_in.double().mean().item(), real_in.double().mean().item()


def inception_weights(path=""):
    """The FID Inception weights: `path` if given, else the file in torch.hub's cache; None when
    there is none (the caller says how to get it)."""
    if path:
        if not os.path.isfile(path):
            raise repa.UserError(f"--inception {path}: file not found")
        return path
    cache = os.path.join(torch.hub.get_dir(), "checkpoints")
    return next((os.path.join(cache, f) for f in INCEPTION_FILES
                 if os.path.isfile(os.path.join(cache, f))), None)


def missing_inception():
    """The one line that says where the weights go and how to get them."""
    cache = os.path.join(torch.hub.get_dir(), "checkpoints")
    return (f"the FID Inception weights are not in {cache}: download them there with python -c "
            f"\"import torch; torch.hub.load_state_dict_from_url('{INCEPTION_URL}', "
            f"check_hash=True)\", or give a copy with --inception PATH")


class InceptionFeatures(torch.nn.Module):
    """ADM's three features of uint8 images (B, 3, H, W), in float32: pool_3 (B, 2048), the spatial
    mixed_6/conv (B, 2023) and the unbiased logits (B, 1008). The network is torch-fidelity's
    (resize, scaling and all); a hook keeps the one inner layer that sFID reads."""

    def __init__(self, weights):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        try:  # torch-fidelity reads the file unrestricted; a weights_only read first makes it safe
            torch.load(weights, map_location="cpu", weights_only=True)
            self.net = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048", "logits_unbiased"],
                feature_extractor_weights_path=weights)
        except Exception as e:
            raise repa.UserError(f"{weights} is not the FID Inception's weights: "
                                 f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
        self.kept = {}
        self.net.Mixed_6d.branch1x1.register_forward_hook(
            lambda module, inputs, out: self.kept.update(spatial=out))

    @torch.no_grad()
    def forward(self, images):
        pool, logits = self.net(images)
        spatial = self.kept.pop("spatial")[:, :SPATIAL_CHANNELS]
        return pool, spatial.permute(0, 2, 3, 1).flatten(1), logits  # NHWC, as TF flattens it


@contextlib.contextmanager
def exact_fp32():
    """Plain float32 inside: PyTorch lets cuDNN convolutions use TF32 by default (10-bit mantissa),
    and --tf32 does so for matmuls. The features feed a covariance and 50K x 50K comparisons."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _npy_header(f):
    """(shape, dtype) from the header of the .npy stream `f`, which is left at row 0."""
    version = np.lib.format.read_magic(f)
    read = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
            np.lib.format.read_array_header_2_0)
    shape, fortran, dtype = read(f)
    if fortran:
        raise ValueError("an array is stored in Fortran order")
    return shape, dtype


def npz_arrays(path):
    """{name: (shape, dtype)} of an .npz from its headers alone (50K images are 9.8 GB)."""
    arrays = {}
    try:
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                with z.open(name) as f:
                    arrays[name.removesuffix(".npy")] = _npy_header(f)
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        raise repa.UserError(f"cannot read {path} as an .npz: {e}") from None
    return arrays


def npz_images(path, start, stop, batch):
    """Rows start..stop of arr_0 (uint8 N x H x W x 3) in batches of uint8 (B, 3, H, W), streamed
    from the file like ADM's reader: a rank reads its share only, one batch at a time."""
    with zipfile.ZipFile(path) as z, z.open("arr_0.npy") as f:
        shape = _npy_header(f)[0]
        row = math.prod(shape[1:])
        f.seek(f.tell() + start * row)
        for i in range(start, stop, batch):
            n = min(batch, stop - i)
            chunk = np.frombuffer(f.read(n * row), np.uint8).reshape(n, *shape[1:])
            yield torch.from_numpy(chunk.copy()).permute(0, 3, 1, 2)


def folder_images(paths, size, batch):
    """ADM centre crops (repa.center_crop_adm) of image files, in batches of uint8 (B, 3, S, S);
    unreadable files are skipped and named."""
    from tqdm import tqdm
    with tqdm(total=len(paths), disable=True) as bar:  # the progress is counted in batches
        for i in range(0, len(paths), batch):
            images, _, failed = repa.read_images(paths[i:i + batch], size, bar)
            for line in failed:
                print(f"skipped unreadable {line}", file=sys.stderr)
            yield torch.from_numpy(images)


def image_paths(folder):
    """The images of a folder: ImageNet-style (one sub-folder per class) or flat, sorted."""
    from PIL import Image
    entries = list(os.scandir(folder))
    if any(entry.is_dir() for entry in entries):
        return repa.list_image_folder(folder)[0]
    extensions = {e for e, f in Image.registered_extensions().items() if f in Image.OPEN}
    return sorted(e.path for e in entries
                  if e.is_file() and os.path.splitext(e.name)[1].lower() in extensions)


def image_source(path, size=None):
    """(count, batches) of the images of an .npz (arr_0) or of a folder, where
    batches(start, stop, batch) yields uint8 (B, 3, H, W); a folder is cropped to `size`."""
    if os.path.isdir(path):
        paths = image_paths(path)
        return len(paths), lambda start, stop, batch: folder_images(paths[start:stop], size, batch)
    shape = npz_arrays(path)["arr_0"][0]
    return shape[0], lambda start, stop, batch: npz_images(path, start, stop, batch)


def gather_rows(x):
    """Every rank's rows, in rank order (the file's order), on every rank. all_gather wants equal
    shapes, so each rank pads to the longest share and the padding is cut off again."""
    if not dist.is_initialized():
        return x
    count = torch.tensor([len(x)], device=x.device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    padded = x.new_zeros((max(counts).item(), *x.shape[1:]))
    padded[:len(x)] = x
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


@torch.no_grad()
def inception_features(net, source, batch, device, desc):
    """(pool, spatial, logits) of all images of `source` (image_source); each rank computes a
    contiguous share and all gather them, so the rows keep the source's order (IS chunks)."""
    from tqdm import tqdm
    rank, world, _ = repa.setup_distributed()
    count, batches = source
    start, stop = count * rank // world, count * (rank + 1) // world
    parts = [net(images.to(device)) for images in tqdm(
        batches(start, stop, batch), total=math.ceil((stop - start) / batch), unit="batch",
        desc=f"Inception features of the {desc}", disable=rank != 0)]
    return [gather_rows(torch.cat([p[i] for p in parts]) if parts else
                        torch.zeros(0, dim, device=device)) for i, dim in enumerate(FEATURE_DIMS)]


def check_evaluation(samples, reference, size=None):
    """One line for inputs that cannot work, before any sampling or feature: `samples` an .npz of
    more than PR_K uint8 (N, H, W, 3) images (None: still to be sampled, at `size` px);
    `reference` a folder of images, or an .npz with images (arr_0) or statistics (mu, sigma, and
    mu_s, sigma_s for sFID). Returns the reference's stored statistics, {name: array}."""
    if samples is not None:
        shape, dtype = npz_arrays(samples).get("arr_0", (None, None))
        if shape is None or len(shape) != 4 or shape[3] != 3 or dtype != np.uint8:
            raise repa.UserError(f"{samples} has no images: --evaluate needs arr_0, uint8 "
                                 f"(N, H, W, 3), as sample.py writes it")
        if shape[0] <= PR_K:
            raise repa.UserError(f"{samples} holds {shape[0]} images; evaluate at least {PR_K + 1}")
        size = shape[1]
    if os.path.isdir(reference):
        if not image_paths(reference):
            raise repa.UserError(f"--fid-ref {reference}: no images in this folder")
        return {}
    if not os.path.isfile(reference):
        raise repa.UserError(f"--fid-ref {reference}: no such file or folder")
    arrays = npz_arrays(reference)
    if "arr_0" not in arrays and not {"mu", "sigma"} <= set(arrays):
        raise repa.UserError(f"{reference} holds neither images (arr_0) nor statistics (mu, "
                             f"sigma); it has {', '.join(sorted(arrays)) or 'nothing'}")
    if "arr_0" in arrays:
        shape, dtype = arrays["arr_0"]
        if dtype != np.uint8 or tuple(shape[1:]) != (size, size, 3):
            raise repa.UserError(f"the reference images in {reference} are {dtype} {shape[1:]}, "
                                 f"the samples uint8 ({size}, {size}, 3)")
        if shape[0] <= PR_K:
            raise repa.UserError(f"{reference} holds {shape[0]} images; use at least {PR_K + 1}")
    for (mu, sigma), dim in zip((("mu", "sigma"), ("mu_s", "sigma_s")), FEATURE_DIMS):
        for key, want in ((mu, (dim,)), (sigma, (dim, dim))):  # pool_3's and the spatial ones
            if key in arrays and tuple(arrays[key][0]) != want:
                raise repa.UserError(f"{reference}: {key} is {tuple(arrays[key][0])}, not {want} "
                                     f"(statistics of the FID Inception's {dim} features)")
    with np.load(reference) as stored:
        return {k: stored[k] for k in ("mu", "sigma", "mu_s", "sigma_s") if k in arrays}


def adm_metrics(fake, real, stored):
    """The five numbers (None where the reference cannot give one). fake, real: (pool, spatial,
    logits) of the samples and of the reference images (real None: statistics only); the
    reference's stored statistics win over its images' (ADM's read_statistics)."""
    metrics = {"fid": None, "sfid": None, "inception_score": inception_score(fake[2].cpu())}
    for name, i, mu, sigma in (("fid", 0, "mu", "sigma"), ("sfid", 1, "mu_s", "sigma_s")):
        if mu in stored and sigma in stored:
            ref = stored[mu], stored[sigma]
        elif real is not None:
            ref = gaussian_statistics(real[i].cpu())
        else:
            continue
        metrics[name] = frechet_distance(*gaussian_statistics(fake[i].cpu()), *ref)
    metrics["precision"], metrics["recall"] = (None, None) if real is None else \
        precision_recall(real[0], fake[0])
    return metrics


def evaluate(samples, reference, inception="", batch=32):
    """FID, sFID, IS, precision and recall of the .npz `samples` against `reference`
    (check_evaluation) with the FID Inception (`inception`: a weights file, default the cache),
    all ranks extracting features; rank 0 prints them on one line, writes them to
    <samples>-vs-<reference>.json and returns them."""
    rank, _, device = repa.setup_distributed()
    stored = check_evaluation(samples, reference)
    weights = inception_weights(inception)
    if weights is None:
        raise repa.UserError(missing_inception())
    net = InceptionFeatures(weights).to(device)
    num, size = npz_arrays(samples)["arr_0"][0][:2]
    has_images = os.path.isdir(reference) or "arr_0" in npz_arrays(reference)
    with exact_fp32():
        fake = inception_features(net, image_source(samples), batch, device, "samples")
        real = inception_features(net, image_source(reference, size), batch, device,
                                  "reference") if has_images else None
        if rank != 0:
            return None
        if real is not None and len(real[0]) <= PR_K:
            raise repa.UserError(f"{reference} gave {len(real[0])} images; use more than {PR_K}")
        metrics = adm_metrics(fake, real, stored)
    name = os.path.splitext(os.path.basename(os.path.normpath(reference)))[0]
    path = f"{os.path.splitext(samples)[0]}-vs-{name}.json"
    record = dict(metrics, samples=samples, num_samples=num, reference=reference,
                  num_reference_images=None if real is None else len(real[0]),
                  stored_statistics=sorted(stored), inception=weights)
    repa.atomic_write(path, lambda f: json.dump(record, f, indent=1), mode="w")
    show = lambda key, spec: "n/a" if metrics[key] is None else format(metrics[key], spec)
    print(f"FID {show('fid', '.4f')}  sFID {show('sfid', '.4f')}  IS "
          f"{show('inception_score', '.2f')}  precision {show('precision', '.4f')}  recall "
          f"{show('recall', '.4f')}  ({num} samples vs {reference}; {path})", flush=True)
    return metrics


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
    # the solver; the defaults are the paper's FID 1.42 recipe (SiT), DiT's sampler for a DiT
    mode: str = ""              # SiT: sde (default) | ode (Euler, or Heun); DiT: ddpm (its own)
    num_steps: int = 0          # 0: 250 for FID (the paper's), 50 for a grid (a quick look)
    heun: bool = False          # Heun's corrector on the ODE (2N - 1 model calls)
    cfg_scale: float = 1.8      # classifier-free guidance scale; 1 turns guidance off
    guidance_low: float = 0.0   # guide only while guidance_low <= t <= guidance_high (t = 0 data)
    guidance_high: float = -1.0  # -1: 0.7 for SiT (the paper's), 1 for DiT (t = timestep / 1000)
    # the output
    vae: str = "ema"            # ema | mse (stabilityai/sd-vae-ft-*), a HF name or a local folder
    global_seed: int = 0        # rank r of W is seeded with global_seed * W + r (official)
    per_proc_batch_size: int = 32  # images per model call on each process
    num_fid_samples: int = 0    # 0: a grid; N: N PNGs and an .npz for FID (torchrun: many GPUs)
    classes: str = ""           # grid rows, e.g. 207,360 (default: 8 showcase ImageNet classes)
    per_class: int = 4          # grid columns: images per class
    sample_dir: str = ""        # default: results/<run>/samples next to the checkpoint, else ./samples
    tf32: bool = True           # TF32 matmuls on GPUs (official default): faster, ~1e-3 relative
    # the evaluation, ADM's suite in-process: FID, sFID, IS, precision/recall
    fid_ref: str = ""           # ADM's reference .npz (arr_0; mu, sigma, mu_s, sigma_s) or images
    evaluate: str = ""          # evaluate this .npz (arr_0) against --fid-ref, instead of sampling
    inception: str = ""         # FID Inception weights ('': torch.hub's cache, as torch-fidelity)


GUIDANCE_RULE = "the guidance interval must satisfy 0 <= --guidance-low <= --guidance-high <= 1"


def check_args(args):
    """Values that would otherwise fail late or quietly: one line each, before any loading."""
    rules = [(bool(args.ckpt) != bool(args.evaluate),
              "give --ckpt CKPT to sample or --evaluate SAMPLES.npz to evaluate (one of them)"),
             (args.fid_ref or not args.evaluate, "--evaluate needs --fid-ref REF"),
             (not args.fid_ref or args.evaluate or args.num_fid_samples,
              "--fid-ref evaluates the samples of --num-fid-samples N (or of --evaluate)"),
             (re.fullmatch(r"(\d+,)*\d+", args.classes) or not args.classes,
              f"--classes must be class numbers separated by commas, got {args.classes!r}"),
             (args.mode in ("", "sde", "ode", "ddpm"),
              f"--mode must be sde, ode or ddpm, got {args.mode!r}"),
             (args.path_type in ("",) + repa.PATH_TYPES,
              f"--path-type must be one of {', '.join(repa.PATH_TYPES)}"),
             (not args.heun or args.mode == "ode", "--heun applies to the ODE only: add --mode ode"),
             (args.num_steps >= 0 and args.num_fid_samples >= 0 and args.resolution >= 0 and
              args.encoder_depth >= 0, "--num-steps, --num-fid-samples, --resolution and "
              "--encoder-depth must be at least 0"),
             (args.per_class >= 1 and args.per_proc_batch_size >= 1,
              "--per-class and --per-proc-batch-size must be at least 1"),
             (args.cfg_scale >= 0, "--cfg-scale must be at least 0"),
             (0 <= args.guidance_low <= 1 and (args.guidance_high == -1 or
                                               args.guidance_low <= args.guidance_high <= 1),
              GUIDANCE_RULE)]
    for ok, message in rules:
        if not ok:
            raise repa.UserError(message)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    repa.add_flags(p, SampleConfig)
    args = SampleConfig(**vars(p.parse_args(argv)))
    try:
        check_args(args)
    except repa.UserError as e:  # one line, without argparse's usage block
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return args


def default_sample_dir(ckpt):
    """results/<run>/samples for a checkpoint in results/<run>/checkpoints/, else ./samples."""
    parent = os.path.dirname(os.path.abspath(ckpt))
    if os.path.basename(parent) == "checkpoints":
        return os.path.join(os.path.dirname(parent), "samples")
    return "samples"


def run_name(args, solver, info, world):
    """Everything that changes the images is in the name, so a restart with other settings starts
    a new folder instead of mixing two recipes (the world size and batch fix the seeds)."""
    stem = os.path.splitext(os.path.basename(info["path"]))[0]
    steps = f"-s{info['steps']}" if info["steps"] is not None else ""
    vae = "" if info["pixel_space"] else f"-vae-{os.path.basename(os.path.normpath(args.vae))}"
    heun = "-heun" if solver.heun else ""
    return (f"{stem}{steps}-{'ema' if args.ema else 'raw'}{vae}-{solver.mode}{solver.num_steps}"
            f"{heun}-cfg{solver.cfg_scale}-{solver.guidance_low}-{solver.guidance_high}-"
            f"{solver.path_type}-seed{args.global_seed}-{world}x{args.per_proc_batch_size}")


def class_names(info, classes):
    """The names the checkpoint stores for its classes (a data set that names them), else the
    ids."""
    names = info["class_names"]
    return [names[c] for c in classes] if names else classes


def make_solver(args, model, path_type):
    """The Solver of the flags, with the defaults that depend on the model: the mode (SiT: sde;
    DiT: ddpm, its only sampler), the steps (250 for FID; a grid is a preview: 50, 5x cheaper, and
    the demo's takes seconds) and the end of the guidance interval (SiT: 0.7, the paper's; DiT:
    1, guidance on every step as in DiT)."""
    dit = model.learn_sigma
    mode = args.mode or ("ddpm" if dit else "sde")
    if (mode == "ddpm") != dit:
        raise repa.UserError("this is a DiT (eps and a learned variance): it samples with --mode "
                             "ddpm" if dit else "--mode ddpm is DiT's sampler; this is a SiT: use "
                             "--mode sde or ode")
    high = args.guidance_high if args.guidance_high >= 0 else 1.0 if dit else 0.7
    if args.guidance_low > high:
        raise repa.UserError(GUIDANCE_RULE)
    steps = args.num_steps or (250 if args.num_fid_samples else 50)
    return Solver(mode, steps, args.heun, args.cfg_scale, args.guidance_low, high, path_type)


@torch.no_grad()  # a context, not set_grad_enabled: tests call main() in their own process
def run(args):
    torch.backends.cuda.matmul.allow_tf32 = args.tf32  # as the official generate.py (CUDA only)
    rank, world, device = repa.setup_distributed()  # NCCL on GPUs, gloo on CPUs, or none
    if args.evaluate:  # an .npz from anywhere (ours, the official code's, a peer's): no model
        evaluate(args.evaluate, args.fid_ref, args.inception, args.per_proc_batch_size)
        return
    model, info = load_checkpoint(
        args.ckpt, device, use_ema=args.ema, model=args.model or None,
        resolution=args.resolution or None, encoder_depth=args.encoder_depth or None,
        path_type=args.path_type or None)
    if args.fid_ref:  # a bad reference fails now, not after hours of sampling; missing weights
        check_evaluation(None, args.fid_ref, info["resolution"])  # can still be fetched meanwhile
        if inception_weights(args.inception) is None:
            repa.print0(f"warning: {missing_inception()}; sampling goes on, and the evaluation "
                        "at its end needs them")
    if args.cfg_scale != 1 and model.y_embedder.embedding_table.num_embeddings == model.num_classes:
        raise repa.UserError("this model was trained without label dropout (cfg_prob 0), so it "
                             "has no null label to guide with: use --cfg-scale 1")
    solver = make_solver(args, model, info["path_type"])
    # samples are decoded with ft-ema (official), although the latents were made with ft-mse
    vae = None if info["pixel_space"] else repa.load_vae(VAES.get(args.vae, args.vae), device)
    sample_dir = args.sample_dir or default_sample_dir(info["path"])
    name = run_name(args, solver, info, world)
    if args.num_fid_samples:
        npz = sample_fid(model, vae, info, solver, args.num_fid_samples,
                         args.per_proc_batch_size, args.global_seed, os.path.join(sample_dir, name))
        if args.fid_ref:
            repa.barrier()  # rank 0 has written the .npz
            try:
                evaluate(npz, args.fid_ref, args.inception, args.per_proc_batch_size)
            except repa.UserError as e:  # exit 2: no numbers; but the samples are safe
                raise repa.UserError(f"{e}; the samples are kept, evaluate them with: python "
                                     f"sample.py --evaluate {npz} --fid-ref {args.fid_ref}")
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
        path = os.path.join(sample_dir, f"{name}{shown}-x{args.per_class}-grid.png")
        save_grid(images, class_names(info, classes), path)
        print(f"wrote {path} ({len(classes)} classes x {args.per_class})")


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except (repa.UserError, FileExistsError, NotADirectoryError) as e:  # the input: one line
        print(f"error: {repa.in_words(e)}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
