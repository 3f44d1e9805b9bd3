"""
REPA: REPresentation Alignment for diffusion transformers, in one file.
Yu et al., "Representation Alignment for Generation: Training Diffusion Transformers Is Easier
Than You Think", ICLR 2025 (arXiv 2410.06940). Numbers match the official code, sihyun-yu/REPA.

The method, with the paper's equation numbers (t = 0 is data, t = 1 noise, as the official code)
  (1) interpolant   x_t = alpha_t x_* + sigma_t eps, eps ~ N(0, I); linear: alpha_t = 1 - t,
                    sigma_t = t; cosine: alpha_t = cos(pi t / 2), sigma_t = sin(pi t / 2)
  (2) velocity      v = alpha'_t x_* + sigma'_t eps                        (the regression target)
  (3) v-loss        L_velocity = E ||v_theta(x_t, t, y) - v||^2
  (8) alignment     L_REPA = -E [1/N sum_n sim(y_*^[n], h_phi(h_t^[n]))]: y_* = f(x_*), N patch
                    features of the clean image from a frozen encoder f; h_t the hidden state
                    after block `encoder_depth`; h_phi a small MLP; sim the cosine similarity
  (9) total         L = L_velocity + lambda L_REPA, lambda = 0.5 (`proj_coeff`)
DiT + REPA (Table 3) keeps (8) and (9) and trains DiT's improved DDPM in place of (1)-(3).
The REPA family, each a flag: iREPA's conv projector and z-scored target (--projector conv,
--spatial-norm), HASTE's early stop (--align-until), REG's class token as token 0 (--reg).

Commands
  pip install -r requirements.txt && python -m pytest -q test_repa.py tools       # set up, test
  torchrun --nproc_per_node=8 tools/prepare.py IMAGENET/train --data-dir data/imagenet256
  torchrun --nproc_per_node=8 repa.py --model XL/2 --data-dir data/imagenet256   # the paper
  torchrun --nproc_per_node=8 repa.py --model DiT-XL/2 --data-dir data/imagenet256   # DiT + REPA
  python repa.py --bench 30 --model XL/2 --batch-size 64 --compile   # img/s and MFU, no data
  python sample.py --ckpt results/repa                                # a grid of samples

Map: PART I, the method (torch, numpy and timm only: paste it): the interpolant and t; DiT's DDPM;
SiT and DiT; the losses of REPA and its family; the frozen encoders. PART II, training: processes;
the shard reader; the config; one step; checkpoints; logs and grids; CKNNA and probes; the loop.
"""
import argparse
import contextlib
import copy
import datetime
import functools
import hashlib
import inspect
import itertools
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Mlp, PatchEmbed

LATENT_SCALE = 0.18215  # SD-VAE latents are scaled to roughly unit variance (LDM paper, sec. 4.3)
VAE_DOWNSAMPLE = 8      # the SD-VAE maps 256 x 256 x 3 pixels to 32 x 32 x 4 latents
NUM_CLASSES = 1000      # ImageNet; the null (unconditional) label is index `num_classes`
CLASS_DROPOUT = 0.1     # labels dropped to the null label in training, for guidance (CFG)
PROJECTOR_DIM = 2048    # width of the projector h_phi's hidden layers (official)
PATH_TYPES = ("linear", "cosine")


class UserError(Exception):
    """A problem with the user's input. The command line prints it as one line, no traceback."""


######## PART I. THE METHOD: interpolant, SiT and DiT, the REPA family's losses, the encoders ####

####################### The stochastic interpolant (eqs. 1-2) and the choice of t ###############

def interpolant(t, path_type="linear"):
    """(alpha_t, sigma_t, alpha'_t, sigma'_t), data at t = 0, noise at t = 1, for the loss and the
    samplers alike. Linear is rectified flow; cosine keeps alpha^2 + sigma^2 = 1."""
    if path_type == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    if path_type == "cosine":
        angle = t * (math.pi / 2)
        return (torch.cos(angle), torch.sin(angle),
                -(math.pi / 2) * torch.sin(angle), (math.pi / 2) * torch.cos(angle))
    raise UserError(f"unknown path type {path_type!r}: choose one of {', '.join(PATH_TYPES)}")


def sample_t(batch, weighting="uniform", path_type="linear", device=None):
    """Training times (batch,): uniform, the paper's, or lognormal, EDM's noise levels sigma /
    alpha = r = exp(N(0, 1)): t = r / (1 + r) (linear), tan(pi t / 2) = r (cosine)."""
    if weighting == "uniform":
        return torch.rand(batch, device=device)
    if weighting != "lognormal":
        raise UserError(f"unknown weighting {weighting!r}: choose uniform or lognormal")
    ratio = torch.randn(batch, device=device).exp()
    return ratio / (1 + ratio) if path_type == "linear" else (2 / math.pi) * torch.atan(ratio)


####################### DiT's improved DDPM: schedule, posterior, learned variance ##############
# Nichol & Dhariwal 2021, as DiT's code: integer steps k = 0 .. 999 (0 the least noisy), DDPM's
# linear betas, abar_k = prod_{j <= k} (1 - beta_j).
#   forward    q(x_k | x_0) = N(sqrt(abar_k) x_0, (1 - abar_k) I)
#   posterior  q(x_{k-1} | x_k, x_0) = N(c1 x_0 + c2 x_k, beta~ I), beta~ = beta (1 - abar_prev) /
#              (1 - abar), c1 = beta sqrt(abar_prev) / (1 - abar), c2 = beta~ sqrt(1 - beta) / beta
#   model      the posterior at x_0 = (x_k - sqrt(1 - abar_k) eps_theta) / sqrt(abar_k), with
#              log-variance f log beta + (1 - f) log beta~, f = (v_theta + 1) / 2 (v_theta: the
#              network's second C channels). A shorter chain keeps some k, its betas from abar.
DDPM_STEPS = 1000  # T


def space_timesteps(num_steps, total=DDPM_STEPS):
    """The `num_steps` original timesteps a respaced chain keeps: evenly strided over 0 .. total-1,
    accumulated step by step and rounded half to even, as the official `space_timesteps`."""
    if not 2 <= num_steps <= total:
        raise UserError(f"DDPM sampling takes 2 to {total} steps, got {num_steps}")
    stride = (total - 1) / (num_steps - 1)
    return [round(k) for k in itertools.accumulate([stride] * (num_steps - 1), initial=0.0)]


@functools.lru_cache(maxsize=None)
def ddpm_schedule(num_steps=DDPM_STEPS, device="cpu"):
    """The chain's float64 tables under the official names (numpy, bit-equal), once per device,
    indexed by the respaced step i; "timesteps"[i] is the k the model sees."""
    linear = np.linspace(1e-4, 0.02, DDPM_STEPS)  # DDPM's betas for T = 1000
    kept = space_timesteps(num_steps)
    abar_kept = np.cumprod(1.0 - linear)[kept]
    betas = 1.0 - abar_kept / np.append(1.0, abar_kept[:-1])  # the shorter chain, same marginals
    abar = np.cumprod(1.0 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    tables = dict(
        betas=betas, alphas_cumprod=abar, log_betas=np.log(betas), posterior_variance=post_var,
        sqrt_alphas_cumprod=np.sqrt(abar), sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - abar),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / abar), sqrt_recipm1_alphas_cumprod=np.sqrt(
            1.0 / abar - 1),
        # beta~_0 = 0 (x_0 is known there): its log is clipped to log beta~_1, not -inf
        posterior_log_variance_clipped=np.log(np.append(post_var[1], post_var[1:])),
        posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
        posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar))
    out = {k: torch.from_numpy(v).to(device) for k, v in tables.items()}
    return dict(out, timesteps=torch.tensor(kept, device=device))


def schedule_at(table, t):
    return table[t].float().view(-1, 1, 1, 1)  # (B, 1, 1, 1), float32 as the official


def ddpm_noised(sched, x0, t, noise):  # x_t ~ q(x_t | x_0) with the given noise
    return (schedule_at(sched["sqrt_alphas_cumprod"], t) * x0 +
            schedule_at(sched["sqrt_one_minus_alphas_cumprod"], t) * noise)


def ddpm_posterior(sched, x0, x_t, t):
    """(mean, clipped log-variance) of q(x_{t-1} | x_t, x_0), t the step index of `sched`."""
    mean = (schedule_at(sched["posterior_mean_coef1"], t) * x0 +
            schedule_at(sched["posterior_mean_coef2"], t) * x_t)
    return mean, schedule_at(sched["posterior_log_variance_clipped"], t)


def ddpm_model_gaussian(sched, x_t, t, eps, v):
    """(mean, log-variance, x_0) of p(x_{t-1} | x_t) from eps and v, neither clamped (official)."""
    frac = (v + 1) / 2
    log_var = (frac * schedule_at(sched["log_betas"], t) +
               (1 - frac) * schedule_at(sched["posterior_log_variance_clipped"], t))
    x0 = (schedule_at(sched["sqrt_recip_alphas_cumprod"], t) * x_t -
          schedule_at(sched["sqrt_recipm1_alphas_cumprod"], t) * eps)
    return ddpm_posterior(sched, x0, x_t, t)[0], log_var, x0


####################### Embedding layers for timesteps and class labels #########################

def modulate(x, shift, scale):  # adaLN: the LayerNorm's affine map, predicted from (t, y)
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """t -> a 256-dim sinusoidal code (cos first, as GLIDE/DiT) -> MLP. SiT's t in [0, 1] is not
    scaled by 1000: the official feeds the raw float, and its weights depend on it."""

    def __init__(self, hidden_size, frequency_size=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t, max_period=10000):
        half = self.mlp[0].in_features // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        code = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        # SiT's code takes t's dtype (as the official); DiT's integer timesteps keep float32
        return self.mlp(code.to(t.dtype) if t.is_floating_point() else code)


class LabelEmbedder(nn.Module):
    """Label -> vector; row `num_classes`, the null label, replaces a label with probability
    `dropout_prob` in training: one network learns v(x, t, y) and v(x, t, null) for guidance."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + (dropout_prob > 0), hidden_size)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def forward(self, y):
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
            y = torch.where(drop, self.num_classes, y)
        return self.embedding_table(y)


def sincos_pos_embed(dim, grid):
    """MAE's fixed 2-D positions (grid^2, dim): column then row (the official meshgrids (w, h)),
    each [sin(p w_k), cos(p w_k)], w_k = 10000^(-k / (dim/4))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(*[torch.arange(grid, dtype=torch.float64)] * 2, indexing="ij")
    out = [p.reshape(-1, 1) * omega[None] for p in (cols, rows)]
    return torch.cat([f(p) for p in out for f in (torch.sin, torch.cos)], dim=1).float()


####################### SiT and DiT, with REPA's projector ######################################

class SiTBlock(nn.Module):
    """adaLN-Zero (DiT, sec. 3.2): c = t_emb + y_emb gives both LayerNorms' shift and scale and
    both residual branches' gates, zero at first: every block starts as the identity."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, qk_norm=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)  # adaLN's
        # timm's Attention calls F.scaled_dot_product_attention (flash / memory-efficient kernels)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm,
                              norm_layer=nn.LayerNorm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio),
                       act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN, then a linear map from each token back to a p x p x C patch of the output; with
    cls_dim (REG), token 0 is the class token and `linear_cls` gives its velocity."""

    def __init__(self, hidden_size, patch_size, out_channels, cls_dim=0):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        if cls_dim:
            self.linear_cls = nn.Linear(hidden_size, cls_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):  # -> (patches, the class token's velocity or None)
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        x = modulate(self.norm_final(x), shift, scale)
        if not hasattr(self, "linear_cls"):
            return self.linear(x), None
        return self.linear(x[:, 1:]), self.linear_cls(x[:, 0])


def mlp_projector(hidden_size, projector_dim, z_dim):
    """h_phi of eq. (8): a 3-layer MLP per token, from the SiT width to the encoder's (8M
    parameters that only the loss uses)."""
    return nn.Sequential(nn.Linear(hidden_size, projector_dim), nn.SiLU(),
                         nn.Linear(projector_dim, projector_dim), nn.SiLU(),
                         nn.Linear(projector_dim, z_dim))


class ConvProjector(nn.Module):
    """iREPA's h_phi (arXiv 2512.10794): one k x k convolution over the token grid, no activation:
    a projected token sees its neighbours. `projection_layer` is the official key."""

    def __init__(self, hidden_size, z_dim, kernel, grid):
        super().__init__()
        if grid[0] != grid[1]:
            raise UserError(f"a conv projector needs a square grid of tokens, got {grid[0]} x "
                            f"{grid[1]} = {grid[0] * grid[1]} tokens")
        self.projection_layer = nn.Conv2d(hidden_size, z_dim, kernel, padding=kernel // 2)

    def forward(self, x):  # (B, T, D) -> (B, D, sqrt T, sqrt T) -> conv -> (B, T, z_dim)
        side = math.isqrt(x.shape[1])
        return self.projection_layer(x.mT.unflatten(2, (side, side))).flatten(2).mT


class SiT(nn.Module):
    """SiT (Ma et al. 2024), DiT's network on eq. (1), with REPA's projectors reading block
    `encoder_depth` (1-based); defaults: SiT-XL/2 with one DINOv2-B target. With learn_sigma it is
    DiT (the paper's Table 3): eps and the variance value v (2C outputs) for `ddpm_loss`, integer
    timesteps unscaled; SiT(learn_sigma=True, z_dims=()) takes the official DiT's keywords.
    projector="conv" is iREPA's h_phi, a projector_kernel x projector_kernel convolution. reg: REG's
    class token (arXiv 2507.01467): cls (B, z_dims[0]), the encoder's noised, enters as token 0.
    forward(x, t, y[, cls]) -> (out, zs[k] (B, tokens, z_dims[k])[, cls's velocity]), and with
    return_hidden the state after every block (fig. 2)."""

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
                 num_heads=16, mlp_ratio=4.0, class_dropout_prob=CLASS_DROPOUT,
                 num_classes=NUM_CLASSES, encoder_depth=8, z_dims=(768,),
                 projector_dim=PROJECTOR_DIM, qk_norm=False, learn_sigma=False,
                 projector="mlp", projector_kernel=3, reg=False):
        super().__init__()
        if z_dims and not 1 <= encoder_depth <= depth:  # without projectors it reads nothing
            raise UserError(f"encoder_depth must be in [1, {depth}], got {encoder_depth}")
        self.in_channels, self.patch_size, self.learn_sigma = in_channels, patch_size, learn_sigma
        self.num_classes, self.encoder_depth, self.reg = num_classes, encoder_depth, reg
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # a frozen Parameter, not a buffer, so that official checkpoints (which hold it) load
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches + reg,
                                                  hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(SiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm)
                                    for _ in range(depth))
        self.projectors = nn.ModuleList(  # the conv keeps PyTorch's init, as the official
            ConvProjector(hidden_size, z, projector_kernel, self.x_embedder.grid_size)
            if projector == "conv" else mlp_projector(hidden_size, projector_dim, z)
            for z in z_dims)
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels * (1 + learn_sigma),
                                      z_dims[0] if reg else 0)
        if reg:  # the class token in: a linear map to the width, then an affine LayerNorm
            self.cls_projectors2 = nn.Linear(z_dims[0], hidden_size)
            self.wg_norm = nn.LayerNorm(hidden_size, eps=1e-6)
        self.initialize_weights()

    def initialize_weights(self):  # DiT's: zeroed adaLN and output layers make out = 0 at init
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        grid, dim = self.x_embedder.grid_size[0], self.pos_embed.shape[-1]
        self.pos_embed.data[0, self.reg:] = sincos_pos_embed(dim, grid)  # REG's row 0: zero
        w = self.x_embedder.proj.weight.data  # the patch conv is a Linear on flattened patches
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zeroed = [b.adaLN_modulation[-1] for b in self.blocks] + [
            self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for layer in zeroed + ([self.final_layer.linear_cls] if self.reg else []):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, t, y, cls=None, return_hidden=False):
        x = self.x_embedder(x)  # (B, T, D), T = (H / p) * (W / p)
        if cls is not None:     # REG: the class token leads
            x = torch.cat([self.wg_norm(self.cls_projectors2(cls))[:, None], x], dim=1)
        x = x + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)  # (B, D), the condition of every block
        zs, hidden = [], []  # zs stays empty without projectors (a plain DiT)
        for i, block in enumerate(self.blocks, start=1):
            x = block(x, c)
            hidden += [x] if return_hidden else []
            if i == self.encoder_depth:  # h_t of eq. (8): read it mid-network
                zs = [proj(x) for proj in self.projectors]
        x, v_cls = self.final_layer(x, c)  # (B, h*w, p*p*C) tokens -> (B, C, h*p, w*p)
        p, h = self.patch_size, int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, h, p, p, -1)
        out = torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], -1, h * p, h * p), zs
        return out + (v_cls,) * (cls is not None) + (hidden,) * return_hidden


# SiT's sizes (its table 1), aligned at block 8 for L and XL, 4 for B (official issue #5) and S;
# T (in no paper) trains on a CPU in minutes. "DiT-XL/2" etc. learn DiT's variance.
_WIDTHS = {"T": (6, 128, 4, 2), "S": (12, 384, 6, 4), "B": (12, 768, 12, 4),
           "L": (24, 1024, 16, 8), "XL": (28, 1152, 16, 8)}
SIZES = {f"{name}/{p}": dict(depth=d, hidden_size=h, num_heads=n, patch_size=p, encoder_depth=e)
         for name, (d, h, n, e) in _WIDTHS.items() for p in (2, 4, 8)}
SIZES |= {f"DiT-{name}": dict(size, learn_sigma=True) for name, size in SIZES.items()}


def size_config(name):  # 'XL/2', the official 'SiT-XL/2', or 'DiT-XL/2'
    key = name.removeprefix("SiT-")
    if key not in SIZES:
        raise UserError(f"unknown model size {name!r}: choose one of {', '.join(SIZES)}")
    return dict(SIZES[key])


def build_model(name, **overrides):  # e.g. build_model('XL/2', input_size=32, z_dims=[768])
    return SiT(**{**size_config(name), **overrides})


####################### The REPA loss (eqs. 3, 8, 9), and DiT's hybrid loss ####################

def alignment_loss(zs_pred, zs):
    """Eq. (8): -cos(y_*^[n], h_phi(h_t^[n])) averaged over patches n, samples and encoders, token
    n paired with patch n, so zs_pred[k] and zs[k] must both be (B, N, D_k). In fp32: normalising
    in fp16 underflows to NaN (an official user report). zs None: no term (HASTE's early stop)."""
    if zs is None or not zs_pred:  # or no encoders: a plain SiT or DiT
        return torch.zeros((), device=zs_pred[0].device if zs_pred else None)
    terms = []
    for k, (zp, z) in enumerate(zip(zs_pred, zs, strict=True)):
        if zp.shape != z.shape:
            raise UserError(f"projector {k} gives {tuple(zp.shape)} but encoder {k} gives "
                            f"{tuple(z.shape)}: REPA needs one SiT token per encoder patch "
                            f"(e.g. patch size 2 for a 16 x 16 DINOv2 grid) and equal widths")
        cos = (F.normalize(zp.float(), dim=-1) * F.normalize(z.float(), dim=-1)).sum(-1)
        terms.append(-cos.mean())
    return torch.stack(terms).mean()


def spatial_norm(z, alpha):
    """iREPA's target: y_* (B, N, D) -> (y - alpha mean_n y) / (std_n y + 1e-6), per image and
    channel over the N patches (alpha 0.6; std unbiased as the official `spatial_zscore`; float32):
    what all patches share goes, their spatial contrast is the target."""
    z = z.float()
    return (z - alpha * z.mean(dim=1, keepdim=True)) / (z.std(dim=1, keepdim=True) + 1e-6)


def repa_loss(model, x, y, zs, path_type="linear", weighting="uniform", t=None, noise=None,
              cls=None, reg_coeff=0.03):
    """(v-loss (B,), alignment loss) for clean latents x, labels y and encoder targets zs. t and
    noise, unless given, are drawn in the official order (t, noise, label dropout): from the same
    RNG state on a CPU, the numbers are the official SILoss's. REG: cls (B, D), the encoder's class
    token, follows (1)-(3) at the same t with its own noise; reg_coeff weighs its v-loss."""
    t = sample_t(x.shape[0], weighting, path_type, x.device) if t is None else t
    noise = torch.randn_like(x) if noise is None else noise

    def path(data, eps):  # eqs. (1) and (2): (x_t, v) at the batch's t
        alpha, sigma, d_alpha, d_sigma = interpolant(
            t.to(x.dtype).view(-1, *[1] * (data.dim() - 1)), path_type)
        return alpha * data + sigma * eps, d_alpha * data + d_sigma * eps

    x_t, v_target = path(x, noise)
    if cls is None:
        v_pred, zs_pred = model(x_t, t.to(x.dtype), y)
    else:
        cls_t, cls_target = path(cls, torch.randn_like(cls))
        v_pred, zs_pred, v_cls = model(x_t, t.to(x.dtype), y, cls=cls_t)
    denoising = (v_pred.float() - v_target.float()).square().mean(dim=(1, 2, 3))  # eq. (3)
    if cls is not None:
        denoising = denoising + reg_coeff * (v_cls.float() - cls_target.float()).square().mean(1)
    return denoising, alignment_loss(zs_pred, zs)


def discretized_gaussian_nll(x, mean, log_scale):
    """-log P(x) per element, x on 8-bit data's 256 levels in [-1, 1]: the Gaussian's mass on
    x +- 1/255, the end bins stretched to +-inf; the tanh CDF, floored at 1e-12, as the official."""
    cdf = lambda u: 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (u + 0.044715 * u ** 3)))
    centered, inv_std = x - mean, torch.exp(-log_scale)
    cdf_plus, cdf_min = (cdf(inv_std * (centered + d)) for d in (1.0 / 255.0, -1.0 / 255.0))
    mass = torch.where(x < -0.999, cdf_plus, torch.where(x > 0.999, 1.0 - cdf_min,
                                                         cdf_plus - cdf_min))
    return -torch.log(mass.clamp(min=1e-12))


def ddpm_vb(sched, x0, x_t, t, eps, v):
    """The variational-bound term L_{t-1} per sample (B,), in bits per dimension: KL(q(x_{t-1} |
    x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, and the decoder's -log p(x_0 | x_1) at t = 0."""
    mean1, log_var1 = ddpm_posterior(sched, x0, x_t, t)
    mean, log_var, _ = ddpm_model_gaussian(sched, x_t, t, eps, v)
    kl = 0.5 * (-1.0 + log_var - log_var1 + torch.exp(log_var1 - log_var) +
                (mean1 - mean) ** 2 * torch.exp(-log_var))  # of two Gaussians, per element
    nll = discretized_gaussian_nll(x0, mean, 0.5 * log_var)
    return torch.where(t == 0, nll.mean(dim=(1, 2, 3)), kl.mean(dim=(1, 2, 3))) / math.log(2.0)


def ddpm_loss(model, x, y, zs, t=None, noise=None):
    """DiT's eq. (3): (hybrid loss (B,), alignment loss), as `repa_loss`. ||eps - eps_theta||^2
    trains the mean, the bound the variance value v through a stop-gradient on eps; k ~ U{0..999}
    is drawn before the noise, as DiT's train.py."""
    sched = ddpm_schedule(DDPM_STEPS, x.device)
    t = torch.randint(0, DDPM_STEPS, (x.shape[0],), device=x.device) if t is None else t
    noise = torch.randn_like(x) if noise is None else noise
    x_t = ddpm_noised(sched, x, t, noise)
    out, zs_pred = model(x_t, t, y)
    eps, v = out.float().chunk(2, dim=1)
    mse = (noise - eps).square().mean(dim=(1, 2, 3))
    return mse + ddpm_vb(sched, x, x_t, t, eps.detach(), v), alignment_loss(zs_pred, zs)


def total_loss(denoising, align, proj_coeff=0.5):
    """Eq. (9); lambda = 0.5 is the paper's (its ablation, XL/2 at 400K steps: 0.25 / 0.5 / 0.75 /
    1.0 give FID 8.6 / 7.9 / 7.8 / 7.8); lambda = 0 is the vanilla SiT (or DiT)."""
    return denoising.mean() + proj_coeff * align


####################### Frozen encoders: the targets y_* = f(x_*) of eq. (8) ####################
# An entry is "family-vit-size" as the official --enc-type, or "...=/path/to/weights": a timm
# ViT holding the very tensors the official code loads, from the Hugging Face cache or a file.
IMAGENET = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
_VIT = {"s": "small", "b": "base", "l": "large", "g": "giant", "h": "huge"}


def mocov3_state_dict(ckpt):
    """The official MoCo v3 file -> timm keys, as REPA's fix_mocov3_state_dict: the base encoder,
    blocks 13 and 14's misnamed norms and MLPs (ViT-L) fixed, no heads."""
    prefix, fixes = "module.base_encoder.", {
        "blocks.13.norm13": "blocks.13.norm1", "blocks.13.mlp.fc13": "blocks.13.mlp.fc1",
        "blocks.14.norm14": "blocks.14.norm2", "blocks.14.mlp.fc14": "blocks.14.mlp.fc2"}
    out = {}
    for key, value in ckpt["state_dict"].items():
        if key.startswith(prefix):
            key = key[len(prefix):]
            for wrong, right in fixes.items():
                key = key.replace(wrong, right)
            if "head" not in key and key.split(".")[0] != "fc":
                out[key] = value
    return out


@dataclass(frozen=True)
class EncoderFamily:
    """How the official code builds one --enc-type family, as a timm model."""
    timm: str               # timm name; "{}" becomes the size word (small, base, large, ...)
    sizes: str              # size letters of --enc-type: s b l g h
    pixels: int             # input side for 256 px images (x2 at 512 px): a 16 x 16 patch grid
    norm: tuple             # (mean, std) per channel, after x / 255
    final_norm: bool = True  # the patch tokens after the final norm; False: the last block's
    local: bool = False     # timm has no weights: the official reads a file, NAME=PATH
    convert: object = None  # that file's layout -> timm keys, where timm cannot read it itself
    kwargs: tuple = ()      # (size letter, timm kwargs) where one size differs from timm's model


ENCODER_FAMILIES = {
    # the default: 224 px, 16 x 16 patches of 14; x_norm_patchtokens (no CLS, no registers)
    "dinov2": EncoderFamily("vit_{}_patch14_dinov2.lvd142m", "sblg", 224, IMAGENET),
    "dinov2reg": EncoderFamily("vit_{}_patch14_reg4_dinov2.lvd142m", "sblg", 224, IMAGENET),
    # DINOv3 (not in the paper): patch 16 and rotary positions, so 256 px with no resize
    "dinov3": EncoderFamily("vit_{}_patch16_dinov3.lvd1689m", "sbl", 256, IMAGENET),
    # before ln_post, with the original QuickGELU (timm's plain CLIP-L, GELU, is another network)
    "clip": EncoderFamily("vit_large_patch14_clip_quickgelu_224.openai", "l", 224, CLIP,
                          final_norm=False),
    # MAE: the official forward stops after the last block, with no final norm
    "mae": EncoderFamily("vit_large_patch16_224.mae", "l", 256, IMAGENET, final_norm=False),
    # DINOv1: the official models/dinov1.py is missing from its repository; the normed tokens
    "dinov1": EncoderFamily("vit_base_patch16_224.dino", "b", 256, IMAGENET),
    # MoCo v3: the official file; its ViT-S has 12 heads (timm's 6)
    "mocov3": EncoderFamily("vit_{}_patch16_224", "sbl", 256, IMAGENET, local=True,
                            convert=mocov3_state_dict, kwargs=(("s", {"num_heads": 12}),)),
    # I-JEPA ViT-H/14, no CLS token: timm reads the official file as it is
    "jepa": EncoderFamily("vit_huge_patch14_gap_224.in1k_ijepa", "h", 224, IMAGENET, local=True),
}


@dataclass
class Encoder:
    name: str           # e.g. "dinov2-vit-b"
    model: nn.Module    # frozen, in eval mode
    size: int           # input pixels: images are resized to size x size
    tokens: int         # patch tokens per image (CLS, registers aside): 256 for a 16 x 16 grid
    mean: torch.Tensor  # (1, 3, 1, 1) on the encoder's device: no host-to-device copy per step
    std: torch.Tensor
    dim: int            # feature width D_k
    prefix: int         # leading tokens to drop (CLS, registers)
    final_norm: bool = True  # features after the final norm (forward_features) or before it
    cls: str = ""       # REG's class token: token 0 ("token"), the patches' mean ("mean"), none


def parse_encoder(entry):
    """'dinov2-vit-b[=/path]' -> (name, family, size letter, path), loading nothing."""
    name, _, path = entry.strip().partition("=")
    family, arch, size = (name.lower().split("-") + ["", "", ""])[:3]
    if arch != "vit" or not size or size not in getattr(ENCODER_FAMILIES.get(family), "sizes", ""):
        names = [f"{f}-vit-{s}" for f, spec in ENCODER_FAMILIES.items() for s in spec.sizes]
        raise UserError(f"unknown encoder {name!r}: choose from {', '.join(names)}")
    return name, family, size, path


def hub_folder(repo_id, patterns):
    """A Hugging Face model's folder from the cache, or downloaded where the hub answers (looked
    up first: offline, the hub client retries for 20 s); None when neither."""
    import socket
    from urllib.parse import urlparse
    from huggingface_hub import constants, snapshot_download
    for local in (True, False):
        try:
            if not local:
                socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname, 443)
            return snapshot_download(repo_id, allow_patterns=patterns, local_files_only=local)
        except Exception:
            continue


def load_encoders(spec="dinov2-vit-b", resolution=256, device="cpu", **timm_kwargs):
    """Frozen encoders for a comma-separated spec such as "dinov2-vit-b,clip-vit-l=PATH";
    `timm_kwargs` go to timm.create_model (the tests build the same classes tiny and random)."""
    import timm
    encoders = []
    for entry in spec.split(","):
        name, family, size, path = parse_encoder(entry)
        fam = ENCODER_FAMILIES[family]
        timm_name, pixels = fam.timm.format(_VIT[size]), fam.pixels * (resolution // 256)
        kwargs = {"pretrained": True, "img_size": pixels, "num_classes": 0,
                  **dict(fam.kwargs).get(size, {}), **timm_kwargs}
        if kwargs["pretrained"] and fam.local and not path:
            raise UserError(f"encoder {name} has no timm weights: the official code reads its "
                            f"original checkpoint file; pass that file as {name}=PATH")
        if kwargs["pretrained"] and not path:
            folder = hub_folder(timm.models.get_pretrained_cfg(timm_name).hf_hub_id,
                                ["model.safetensors"])
            path = os.path.join(folder, "model.safetensors") if folder else ""
            if not os.path.isfile(path):
                raise UserError(f"cannot load encoder {name}: its weights ({timm_name}) are not "
                                f"in the Hugging Face cache and cannot be downloaded here: copy "
                                f"~/.cache/huggingface from a machine online, or pass {name}=PATH")
        if path and not os.path.isfile(path):
            raise UserError(f"cannot load encoder {name}: weight file {path} not found")
        try:  # timm resamples the stored positions to the grid (bicubic), as the official does
            if kwargs["pretrained"]:
                kwargs["pretrained_cfg_overlay"] = dict(file=path) if not fam.convert else dict(
                    state_dict=fam.convert(torch.load(path, "cpu", weights_only=True)))
            model = timm.create_model(timm_name, **kwargs).to(device).eval().requires_grad_(False)
        except Exception as e:  # no such file, a corrupt one, or another architecture's weights
            raise UserError(f"cannot load encoder {name} from {path or 'the cache'}: "
                            f"{type(e).__name__} {' '.join(str(e).split())[:200]}") from None
        mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in fam.norm)
        encoders.append(Encoder(name, model, pixels, model.patch_embed.num_patches, mean, std,
                                model.embed_dim, model.num_prefix_tokens, fam.final_norm,
                                "token" if getattr(model, "cls_token", None) is not None else ""))
    return encoders


@torch.no_grad()
def encode(encoders, images, cls=False):
    """uint8 images (B, 3, H, W) -> one (B, N, D_k) per encoder, as the official: x / 255,
    normalise, bicubic resize (CLIP's official resizes first: the same, bicubic weights sum to 1),
    the patch tokens after the final norm or, without it (MAE, CLIP), the last block's. With cls
    (REG) the class token leads, (B, 1 + N, D_k): REG's [x_norm_clstoken, x_norm_patchtokens]."""
    out = []
    for enc in encoders:
        x = (images.float() / 255 - enc.mean) / enc.std
        if x.shape[-1] != enc.size:
            x = F.interpolate(x, size=(enc.size, enc.size), mode="bicubic")
        if enc.final_norm:
            tokens = enc.model.forward_features(x)
            z, first = tokens[:, enc.prefix:], tokens[:, :1]
        else:
            z, first = enc.model.forward_intermediates(
                x, indices=1, norm=False, output_fmt="NLC", intermediates_only=True,
                return_prefix_tokens=True)[-1]
        if cls:
            z = torch.cat([z.mean(1, keepdim=True) if enc.cls == "mean" else first[:, :1], z], 1)
        out.append(z)
    return out


######## PART II. TRAINING: processes, reader, config, step, checkpoints, grids, measures, loop ##

####################### Processes and files #####################################################
# torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without it we are rank 0 of 1, with no process
# group. NCCL on GPUs, gloo on CPUs: the rest of the code does not care which.

def setup_distributed():
    """(rank, world, device), initialising the process group once when run under torchrun."""
    world, cuda = int(os.environ.get("WORLD_SIZE", 1)), torch.cuda.is_available()
    if world > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        # an hour, not NCCL's 10 minutes: ranks of tools/prepare.py may wait that long for another
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=1))
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return int(os.environ.get("RANK", 0)), world, device


def barrier():
    if dist.is_initialized():
        dist.barrier()


def print0(*args, **kwargs):  # logs come from rank 0: 8 or 64 copies of a line help nobody
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def atomic_write(path, write, mode="wb"):
    """write(f) into a temporary file, fsync, then rename over `path`: a crash (even SIGKILL)
    mid-write leaves the previous file intact, and no reader sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_vae(name="stabilityai/sd-vae-ft-mse", device="cpu"):
    """The SD-VAE (diffusers) from a local folder or the Hugging Face cache: latents are made with
    ft-mse (as the official preprocessing), samples decoded with ft-ema (sample.py)."""
    from diffusers.models import AutoencoderKL
    local = os.path.isdir(name) or name.startswith(("/", ".", "~"))
    path = name if local else hub_folder(name, ["config.json", "*.safetensors"])
    try:
        if path is None:
            raise FileNotFoundError(name)
        return AutoencoderKL.from_pretrained(path, low_cpu_mem_usage=False).to(
            device).eval().requires_grad_(False)
    except Exception as e:
        hint = (f"the folder {name} is not a diffusers AutoencoderKL" if os.path.isdir(name) else
                f"there is no folder {name}" if local else
                "it is not in the Hugging Face cache and cannot be downloaded here: load it once "
                "where there is internet and copy ~/.cache/huggingface, or pass a local folder")
        raise UserError(f"cannot load the VAE {name}: {hint} ({type(e).__name__})") from None


####################### The reader: memory-mapped shards in a seeded, resumable order ##########
# tools/prepare.py writes a folder of shards, each three .npy arrays that training memory-maps:
# images (N, 3, R, R) uint8, moments (N, 8, R/8, R/8) float32 (the VAE posterior's mean and std),
# labels (N,) int64. Every data set returns whole batches of these from __getitems__, with
# `latent_scale`, `resolution` and `num_classes`.

class ShardDataset(torch.utils.data.Dataset):
    """The prepared shards: no decoding at training time, only copies from the page cache."""
    latent_scale = LATENT_SCALE

    def __init__(self, data_dir):
        path = os.path.join(data_dir, "manifest.json")
        if not os.path.isfile(path):
            raise UserError(f"no prepared dataset at {data_dir} (manifest.json missing): run "
                            f"python tools/prepare.py IMAGENET_TRAIN_FOLDER --data-dir {data_dir}")
        manifest = json.load(open(path))
        self.resolution, self.num_classes = manifest["resolution"], len(manifest["classes"])
        dirs = [os.path.join(data_dir, s["name"]) for s in manifest["shards"] if s["count"]]
        self.images = [np.load(os.path.join(d, "images.npy"), mmap_mode="r") for d in dirs]
        self.moments = [np.load(os.path.join(d, "moments.npy"), mmap_mode="r") for d in dirs]
        self.labels = np.concatenate([np.load(os.path.join(d, "labels.npy")) for d in dirs])
        self.starts = np.cumsum([0] + [len(a) for a in self.images])

    def __len__(self):
        return len(self.labels)

    def __getitems__(self, indices):
        indices = np.asarray(indices)
        shard = np.searchsorted(self.starts, indices, side="right") - 1
        images = np.empty((len(indices),) + self.images[0].shape[1:], np.uint8)
        moments = np.empty((len(indices),) + self.moments[0].shape[1:], np.float32)
        for n, (s, i) in enumerate(zip(shard, indices - self.starts[shard])):
            images[n], moments[n] = self.images[s][i], self.moments[s][i]
        return (torch.from_numpy(images), torch.from_numpy(moments),
                torch.from_numpy(self.labels[indices]))


class RandomData(torch.utils.data.Dataset):
    """--bench: random images and latent moments of the real shapes, made on the fly."""
    latent_scale, num_classes = LATENT_SCALE, NUM_CLASSES

    def __init__(self, resolution):
        self.resolution = resolution

    def __len__(self):
        return 1 << 20

    def __getitems__(self, indices):
        b, r = len(indices), self.resolution
        return (torch.randint(0, 256, (b, 3, r, r), dtype=torch.uint8),
                torch.randn(b, 8, r // VAE_DOWNSAMPLE, r // VAE_DOWNSAMPLE).abs_(),
                torch.randint(0, self.num_classes, (b,)))


class ResumableBatches(torch.utils.data.Sampler):
    """An endless, seeded stream of this rank's micro-batches that can start anywhere. Epoch e is
    a permutation drawn from seed + e, cut into global batches (one per optimiser step) of world x
    accum slots of `batch` samples; rank r's micro-batch m takes slot r * accum + m. So 2 ranks x 1
    micro-batch and 1 rank x 2 see the same samples in the same slots, and the number of global
    batches consumed (`start`) is all a checkpoint needs to continue the stream exactly."""

    def __init__(self, n, batch, rank=0, world=1, accum=1, seed=0, start=0):
        self.batch, self.slots, self.first = batch, world * accum, rank * accum
        self.n, self.accum, self.seed, self.start = n, accum, seed, start
        self.per_epoch = n // (self.slots * batch)
        if self.per_epoch == 0:
            raise UserError(f"{n} samples are too few for a global batch of {self.slots * batch}")

    def __iter__(self):
        epoch, position = divmod(self.start, self.per_epoch)
        while True:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.n, generator=g)
            for step in range(position, self.per_epoch):
                for slot in range(self.first, self.first + self.accum):
                    begin = (step * self.slots + slot) * self.batch
                    yield order[begin:begin + self.batch].tolist()
            epoch, position = epoch + 1, 0


def ignore_signals(worker_id):
    """Workers ignore SIGTERM/SIGINT: a scheduler signals the whole process group, and a worker
    that died of it would crash the main process before it can save."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def loader(dataset, sampler, workers=4):
    """Batches stacked by __getitems__ (collate_fn=tuple keeps them); workers copy from the memory
    map in parallel and pin the memory so that the copy to the GPU overlaps compute."""
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=tuple, num_workers=workers,
        pin_memory=torch.cuda.is_available(), worker_init_fn=ignore_signals,
        prefetch_factor=4 if workers else None)


####################### The config and the command line #########################################

@dataclass
class Config:
    """Every default, the paper's and the official train.py's; a flag per field (`add_flags`)."""
    bench: int = 0              # time this many steps on random data (no dataset, random encoders)
    # model and method
    model: str = "XL/2"         # T|S|B|L|XL / 2|4|8, or SiT-XL/2; DiT-XL/2 etc.: DiT (DDPM)
    encoder_depth: int = 0      # block whose output is aligned (eq. 8); 0 = the size table's
    enc_type: str = "dinov2-vit-b"  # frozen encoder(s), comma-separated; NAME=PATH for a file
    proj_coeff: float = 0.5     # lambda of eq. (9); 0 trains the vanilla SiT
    projector_dim: int = PROJECTOR_DIM  # hidden width of the projector h_phi
    projector: str = "mlp"      # h_phi: REPA's MLP, or iREPA's convolution over the token grid
    projector_kernel: int = 3   # the conv projector's k (iREPA's paper; its latent config: 1)
    spatial_norm: float = 0.0   # iREPA: the target's patches z-scored, alpha (0.6) x mean; 0 = off
    align_until: int = 0        # HASTE: no alignment term, no encoder, from this step; 0 = never
    reg: bool = False           # REG: the encoder's class token, noised, trained as token 0
    reg_coeff: float = 0.03     # REG: the weight of the class token's v-loss
    path_type: str = "linear"   # the interpolant of eq. (1) (SiT)
    weighting: str = "uniform"  # how t is drawn (SiT)
    cfg_prob: float = CLASS_DROPOUT  # label dropout, for classifier-free guidance
    qk_norm: bool = False       # LayerNorm on queries and keys
    # data
    data_dir: str = "data/imagenet256"  # prepared shards (written by tools/prepare.py)
    resolution: int = 256       # for --bench (training reads the shards')
    num_workers: int = 4        # data loader processes per GPU
    # optimisation (on resume the command line's, not the checkpoint's)
    batch_size: int = 256       # global, over all GPUs and accumulation steps
    grad_accum: int = 1         # micro-batches per step, when the batch does not fit
    lr: float = 1e-4            # AdamW, constant, no warm-up
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # gradients are clipped to this global norm
    max_steps: int = 400_000
    ema_decay: float = 0.9999   # updated every step
    seed: int = 0
    # system
    precision: str = "auto"     # auto: bf16 on GPU, fp32 on CPU
    compile: bool = False       # torch.compile the SiT
    sync_debug: bool = False    # GPU: fail on any host-device sync inside a step (after the first)
    results_dir: str = "results"
    exp_name: str = "repa"      # the run folder is results_dir/exp_name
    resume: str = "auto"        # auto (this run's newest) | none (a new run) | a file or run folder
    log_every: int = 100        # steps between log lines (one host sync each)
    ckpt_every: int = 50_000    # numbered checkpoints, kept
    latest_every: int = 2_000   # latest.pt, overwritten: what a crash loses at most
    sample_every: int = 10_000  # a grid from the EMA with fixed noise (and at step 1); 0 = never
    wandb: str = ""             # also log to this Weights & Biases project (metrics.jsonl stays)
    align_every: int = 10_000   # steps between CKNNA logs of the EMA on a fixed batch; 0 = never
    align_images: int = 1024    # images in that fixed batch
    knn: int = 10               # k, the nearest neighbours of CKNNA (the paper's 10)
    CHOICES = dict(path_type=PATH_TYPES, weighting=("uniform", "lognormal"),  # not fields
                   projector=("mlp", "conv"),
                   precision=("auto", "bf16", "fp32"), resolution=(256, 512))


# What each numeric flag may be, checked before any slow work
LIMITS = {**{k: (lambda v: v >= 1, "at least 1") for k in (
    "batch_size", "grad_accum", "max_steps", "log_every", "ckpt_every", "latest_every",
    "projector_dim")},
    **{k: (lambda v: v >= 0, "at least 0") for k in (
        "bench", "encoder_depth", "num_workers", "seed", "sample_every", "weight_decay",
        "proj_coeff", "align_every", "align_until", "reg_coeff")},
    **{k: (lambda v: v > 0, "positive") for k in ("lr", "adam_eps", "max_grad_norm")},
    **{k: (lambda v: 0 <= v < 1, "in [0, 1)") for k in ("adam_beta1", "adam_beta2", "cfg_prob")},
    **{k: (lambda v: 0 <= v <= 1, "in [0, 1]") for k in ("ema_decay", "spatial_norm")},
    "knn": (lambda v: v >= 2, "at least 2"),
    "projector_kernel": (lambda v: v >= 1 and v % 2, "odd (the grid keeps its size), at least 1")}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, without the usage block
        self.exit(2, f"error: {message}\n")


def add_flags(parser, config_class, defaults=None, skip=()):
    """A flag per dataclass field but `skip` (--batch-size for batch_size, --no-compile for a
    bool), its help the comment after the field, its choices the class's CHOICES; `defaults`
    replaces the class's (a tool's)."""
    choices = getattr(config_class, "CHOICES", {})
    helps = {line.strip().partition(":")[0]: line.partition("#")[2].strip()
             for line in inspect.getsource(config_class).splitlines()}
    for f in fields(config_class):
        if f.name in skip:
            continue
        default = (defaults or {}).get(f.name, f.default)
        kind = dict(action=argparse.BooleanOptionalAction) if isinstance(f.default, bool) else \
            dict(type=type(f.default), choices=choices.get(f.name))
        parser.add_argument("--" + f.name.replace("_", "-"), default=default, **kind,
                            help=f"{helps[f.name]} (default {default!r})".lstrip())


def check_values(cfg, limits, images=None):
    """Each value within its rule ({field: (ok, rule)}): one line naming the first that is not.
    `images` counts CKNNA's images, which rank k neighbours besides each, and HSIC needs N > 3."""
    for name, (ok, rule) in limits.items():
        value = getattr(cfg, name)
        if not (math.isfinite(value) and ok(value)):
            raise UserError(f"--{name.replace('_', '-')} must be {rule}, got {value}")
    if images and getattr(cfg, images) <= cfg.knn + 3:
        raise UserError(f"--{images.replace('_', '-')} must be more than --knn + 3 = "
                        f"{cfg.knn + 3}, got {getattr(cfg, images)}")


def check_config(cfg, world=1, named_encoders=True):
    """Every name and value, before anything is read or built: one line that names the bad one.
    named_encoders False: a tool supplies the encoders (train's `encoders`), not --enc-type."""
    check_values(cfg, LIMITS, "align_images" if cfg.align_every else None)
    size = size_config(cfg.model)
    if size.get("learn_sigma") and (cfg.path_type, cfg.weighting) != ("linear", "uniform"):
        raise UserError(f"--path-type and --weighting are SiT's: {cfg.model} trains on its DDPM "
                        f"chain; drop them")
    if cfg.align_until and not cfg.proj_coeff:
        raise UserError(f"--align-until {cfg.align_until} stops the alignment term, but "
                        f"--proj-coeff is 0: there is none to stop")
    clash = [flag for flag, on in [(cfg.model, size.get("learn_sigma")),
                                   ("--align-until", cfg.align_until),
                                   ("--spatial-norm", cfg.spatial_norm),
                                   ("--projector conv", cfg.projector == "conv")] if on]
    if cfg.reg and clash:  # REG's token 0 breaks the square grid and needs the encoder each step
        raise UserError(f"--reg does not combine with {clash[0]}: REG trains a SiT with REPA's "
                        f"MLP projectors and the encoder's class token in every step")
    if cfg.encoder_depth > size["depth"]:
        raise UserError(f"--encoder-depth must be at most {size['depth']} for {cfg.model}, "
                        f"got {cfg.encoder_depth}")
    if named_encoders:  # every family gives a 16 x 16 grid at 256 px (ENCODER_FAMILIES' pixels)
        for entry in cfg.enc_type.split(","):
            name, family, *_ = parse_encoder(entry)
            if cfg.reg and family == "jepa":  # I-JEPA has no CLS token
                raise UserError(f"--reg needs an encoder with a class token, and {name} has none")
        if size["patch_size"] != 2:  # SiT's tokens are (R / 8 / p)^2
            raise UserError(f"REPA pairs each SiT token with an encoder patch, but {cfg.model} "
                            f"has {(cfg.resolution // 8 // size['patch_size']) ** 2} tokens and "
                            f"the encoder {(cfg.resolution // 16) ** 2} patches: use patch size 2")
    if cfg.batch_size % (world * cfg.grad_accum):
        raise UserError(f"--batch-size {cfg.batch_size} is not divisible by {world} processes x "
                        f"{cfg.grad_accum} accumulation steps")


####################### A run: its model, optimiser, data and one step ##########################

def train_flops_per_image(model, encoders):
    """FLOPs to train on one image, for MFU: a Linear on T tokens costs 2 params T forward and
    twice that backward, attention 4 T^2 D per block forward (QK^T, AV); the per-sample adaLN
    and embedders are negligible. The frozen encoders run forward only."""
    T, D = model.x_embedder.num_patches, model.pos_embed.shape[-1]
    per_token = sum(p.numel() for n, p in model.named_parameters()
                    if "adaLN" not in n and not n.startswith(("t_embedder", "y_embedder", "pos")))
    flops = 3 * (2 * per_token * T + 4 * len(model.blocks) * T * T * D)
    for enc in encoders:
        tokens, depth = enc.tokens + enc.prefix, len(getattr(enc.model, "blocks", []))
        flops += (2 * sum(p.numel() for p in enc.model.parameters()) * tokens +
                  4 * depth * tokens * tokens * enc.dim)
    return flops


# Dense bf16 tensor-core peaks, for MFU
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12,
              "4090": 165e12, "B200": 2250e12}


@dataclass
class Run:
    """What one training run holds; the step, the checkpoints and the loop read and advance it."""
    cfg: Config
    rank: int
    world: int
    device: torch.device
    precision: str              # bf16 | fp32, resolved
    dataset: torch.utils.data.Dataset
    encoders: list
    model_kwargs: dict          # the exact SiT(...) call, stored in every checkpoint
    model: SiT                  # the online weights
    net: nn.Module              # the model as the step calls it: compiled and/or DDP-wrapped
    ema: SiT
    opt: torch.optim.Optimizer
    sampler: ResumableBatches
    dir: str                    # results_dir/exp_name
    ckpt_dir: str
    finite: torch.Tensor        # on the device: no NaN/inf loss since this process started
    step: int = 0               # optimiser steps done
    first_step: int = 0         # the step this process started (or resumed) at


def start_run(cfg, data=None, encoders=None):
    """Processes, precision, data, encoders, the model, its EMA and the optimiser. The data and
    encoders: a tool's own (train's `data` and `encoders`), random data and random-weight
    encoders for --bench, or the shards with the pretrained encoders."""
    rank, world, device = setup_distributed()
    check_config(cfg, world, named_encoders=encoders is None)
    cuda = device.type == "cuda"
    precision = ("bf16" if cuda else "fp32") if cfg.precision == "auto" else cfg.precision
    # TF32 for the fp32 matmuls autocast leaves (and the optimiser's); off when fp32 is asked for
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision != "fp32"
    dataset = data() if data else RandomData(cfg.resolution) if cfg.bench else \
        ShardDataset(cfg.data_dir)
    encoders = encoders(device) if encoders else load_encoders(
        cfg.enc_type, dataset.resolution, device, **({"pretrained": False} if cfg.bench else {}))
    if cfg.reg and not all(e.cls for e in encoders):  # a tool's encoder may have none
        raise UserError(f"--reg needs encoders with a class token, and "
                        f"{next(e.name for e in encoders if not e.cls)} has none")
    pixels = dataset.latent_scale == 1  # scale 1: the 'moments' are pixels in [-1, 1], no VAE
    model_kwargs = dict(size_config(cfg.model), in_channels=3 if pixels else 4,
                        input_size=dataset.resolution // (1 if pixels else VAE_DOWNSAMPLE),
                        num_classes=dataset.num_classes, projector_dim=cfg.projector_dim,
                        class_dropout_prob=cfg.cfg_prob, qk_norm=cfg.qk_norm,
                        z_dims=[e.dim for e in encoders], projector=cfg.projector,
                        projector_kernel=cfg.projector_kernel, reg=cfg.reg)
    model_kwargs |= {"encoder_depth": cfg.encoder_depth} if cfg.encoder_depth else {}
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and in every run
    model = SiT(**model_kwargs).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()  # starts equal to the model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                            eps=cfg.adam_eps, weight_decay=cfg.weight_decay, fused=cuda)
    net = torch.compile(model) if cfg.compile else model
    if world > 1:
        # past --align-until the projectors get no gradient (HASTE: find_unused_parameters too)
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device] if cuda else None, find_unused_parameters=cfg.align_until > 0)
    micro = cfg.batch_size // (world * cfg.grad_accum)
    sampler = ResumableBatches(len(dataset), micro, rank, world, cfg.grad_accum, cfg.seed)
    folder = os.path.join(cfg.results_dir, cfg.exp_name)
    return Run(cfg, rank, world, device, precision, dataset, encoders, model_kwargs, model, net,
               ema, opt, sampler, folder, os.path.join(folder, "checkpoints"),
               torch.ones((), dtype=torch.bool, device=device))


def step_seed(seed, step, slot):
    """A micro-batch's RNG seed, a function of (seed, step, slot) only: a resume and DDP need no
    saved RNG state, and as the slot is the data's (rank * accum + micro-batch), 2 ranks x 1
    micro-batch draw exactly what 1 rank x 2 micro-batches draw."""
    return seed * 1_000_003 + step * 4_096 + slot


def train_step(run, micro_batches):
    """One optimisation step over `grad_accum` micro-batches: encode, sample the latents, eq. (9),
    backward; clip; AdamW; EMA. Returns (loss, alignment, grad-norm) on the device, unsynced."""
    cfg, accum = run.cfg, len(micro_batches)
    aligning = not cfg.align_until or run.step < cfg.align_until  # HASTE stops at align_until
    autocast = torch.autocast(run.device.type, torch.bfloat16, enabled=run.precision == "bf16")
    stats = torch.zeros(3, device=run.device)
    for m, batch in enumerate(micro_batches):
        torch.manual_seed(step_seed(cfg.seed, run.step, run.rank * accum + m))
        images, moments, labels = (t.to(run.device, non_blocking=True) for t in batch)
        with autocast:  # y_* of eq. (8), frozen, no grad
            zs = encode(run.encoders, images, cls=cfg.reg) if aligning else None
        if zs and cfg.spatial_norm:  # iREPA's target
            zs = [spatial_norm(z, cfg.spatial_norm) for z in zs]
        mean, std = moments.chunk(2, dim=1)  # sample the VAE posterior, then scale
        x = (mean + std * torch.randn_like(mean)) * run.dataset.latent_scale
        sync = m == accum - 1 or run.world == 1  # DDP all-reduces on the last micro-batch only
        with contextlib.nullcontext() if sync else run.net.no_sync(), autocast:
            if run.model.learn_sigma:  # DiT: the improved DDPM's hybrid loss
                denoising, align = ddpm_loss(run.net, x, labels, zs)
            else:
                denoising, align = repa_loss(run.net, x, labels, zs, cfg.path_type, cfg.weighting,
                                             cls=zs[0][:, 0] if cfg.reg else None,
                                             reg_coeff=cfg.reg_coeff)
            loss = total_loss(denoising, align, cfg.proj_coeff)
        (loss / accum).backward()
        stats[:2] += torch.stack([denoising.mean(), align]).detach() / accum
        run.finite &= torch.isfinite(loss.detach())
    stats[2] = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.max_grad_norm)
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    with torch.no_grad():  # EMA <- decay EMA + (1 - decay) model, one fused op
        torch._foreach_lerp_(list(run.ema.parameters()), list(run.model.parameters()),
                             1 - cfg.ema_decay)
    run.step += 1
    return stats


####################### Checkpoints: one schema, written and read here and by sample.py ########
# {"model", "ema", "opt", "args", "steps"} as the official checkpoints (`args` a plain dict of the
# Config, so torch.load(weights_only=True) needs no allow-list), plus "model_kwargs" (the exact
# SiT(...) call), "data" (where the data order continues) and the data set's "class_names".
METHOD_FIELDS = ("model", "enc_type", "encoder_depth", "projector_dim", "proj_coeff", "projector",
                 "projector_kernel", "spatial_norm", "align_until", "reg", "reg_coeff",
                 "path_type", "weighting",
                 "cfg_prob", "qk_norm", "batch_size", "seed")


def load_sit_weights(model, state_dict):
    """Load ours or an official state dict strictly, or say in one line that it is another
    model's. The released XL/2 `last.pt` calls `blocks.(N + encoder_depth)` `decoder_blocks.N`."""
    renamed = {}
    for k, v in state_dict.items():
        k = k.removeprefix("module.").removeprefix("_orig_mod.")  # DDP / torch.compile wrappers
        if k.startswith("decoder_blocks."):
            _, n, rest = k.split(".", 2)
            k = f"blocks.{int(n) + model.encoder_depth}.{rest}"
        renamed[k] = v
    ours = model.state_dict()
    wrong = sorted(ours.keys() ^ renamed.keys()) + [
        k for k in ours.keys() & renamed.keys() if ours[k].shape != renamed[k].shape]
    if wrong:
        raise UserError(f"checkpoint does not fit this model ({len(wrong)} keys missing, "
                        f"unexpected or of another shape, e.g. {wrong[0]}): is it for another "
                        f"size or encoder set?")
    bad = next((k for k, v in renamed.items() if v.is_floating_point() and
                not torch.isfinite(v).all()), None)
    if bad:  # a bit flipped on disk, or weights saved from a run that had diverged
        raise UserError(f"checkpoint has non-finite values in {bad}: it is corrupt")
    model.load_state_dict(renamed, strict=True)
    return model


def write_checkpoint(path, state):  # never left half-written
    atomic_write(path, lambda f: torch.save(state, f))


def save_checkpoint(run, name):
    """Write run.ckpt_dir/name (rank 0), once all ranks agree that no loss has been non-finite:
    weights that have seen a NaN are never saved (one sync, only when saving)."""
    ok = run.finite.float()
    if run.world > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if not ok.item():
        raise UserError(f"non-finite loss before step {run.step}; stopping without saving, the "
                        f"last checkpoint is kept")
    if run.rank == 0:
        consumed = run.sampler.start + run.step - run.first_step
        state = {"model": run.model.state_dict(), "ema": run.ema.state_dict(),
                 "opt": run.opt.state_dict(), "args": asdict(run.cfg), "steps": run.step,
                 "model_kwargs": run.model_kwargs, "data": dict(zip(("epoch", "position"), divmod(
                     consumed, run.sampler.per_epoch)))}
        if getattr(run.dataset, "class_names", None):  # sample.py labels its grids with them
            state["class_names"] = list(run.dataset.class_names)
        write_checkpoint(os.path.join(run.ckpt_dir, name), state)
    barrier()


def load_checkpoint(path):
    """A checkpoint file (ours, an official one, whose `args` is an argparse.Namespace, or a state
    dict), read with weights_only=True so that it cannot run code, and memory-mapped: 8 ranks
    resuming XL/2 do not each read 11 GB of optimiser state at once."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} not found")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:  # a class weights_only refuses: name it, never build it
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        raise UserError(f"checkpoint {path} holds objects that only running code could rebuild "
                        f"({', '.join(n for n in names if n != 'argparse.Namespace')}), which "
                        f"weights_only=True refuses: save plain state dicts") from None
    except Exception as e:
        raise UserError(f"checkpoint {path} is not a whole torch.save file (cut short while "
                        f"written or copied, or another kind: {type(e).__name__})") from None


def newest_checkpoint(ckpt_dir):
    """The checkpoint of a folder with the most steps, or None: NNNNNNN.pt by its name, latest.pt
    by its content (memory-mapped: no weights read); not by file times, which a copy may lose.
    Of equal steps, the numbered one."""
    names = sorted(os.listdir(ckpt_dir)) if os.path.isdir(ckpt_dir) else []
    steps = {os.path.join(ckpt_dir, n): int(n[:-3]) if n[:-3].isdigit() else load_checkpoint(
        os.path.join(ckpt_dir, n)).get("steps", -1) for n in names if n.endswith(".pt")}
    return max(steps, key=steps.get, default=None)


def checkpoint_in(path):
    """A checkpoint given as its file, or as a run folder or its checkpoints/ (the newest)."""
    if not os.path.isdir(path):
        return path
    sub = os.path.join(path, "checkpoints")
    found = newest_checkpoint(sub if os.path.isdir(sub) else path)
    if found is None:
        raise UserError(f"no checkpoint in {path} (a .pt file, a run folder or its checkpoints/)")
    return found


def resume_run(run):
    """Continue from the run folder's newest checkpoint (or --resume PATH): weights, EMA,
    optimiser state, step and data position; the command line sets the optimiser's settings.
    Rank 0 chooses the file and tells the others, whose disks may show otherwise."""
    cfg = run.cfg
    box = [None, None]  # the checkpoint to resume; the newest in the run folder
    if run.rank == 0 and not cfg.bench:
        if cfg.resume in ("auto", "none"):
            box[1] = newest_checkpoint(run.ckpt_dir)
        box[0] = box[1] if cfg.resume == "auto" else None if cfg.resume == "none" else \
            checkpoint_in(cfg.resume)
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    path, newest = box
    if cfg.resume == "none" and newest:  # a new run must not write over a saved one
        raise UserError(f"{run.dir} holds a run already ({newest}): start a new one with another "
                        f"--exp-name, or resume this one without --resume none")
    if path:
        ckpt = load_checkpoint(path)
        missing = [k for k in ("model", "ema", "opt", "steps") if k not in ckpt]
        if missing:
            raise UserError(f"{path} is not a training checkpoint (no {', '.join(missing)}): "
                            f"--resume needs one saved by repa.py or the official train.py")
        stored = ckpt.get("args")  # ours a dict; official checkpoints hold a Namespace
        changed = [f"{k} {stored[k]} -> {getattr(cfg, k)}" for k in METHOD_FIELDS
                   if isinstance(stored, dict) and k in stored and stored[k] != getattr(cfg, k)]
        if changed:
            raise UserError(f"{path} is another experiment ({', '.join(changed)}): " + (
                "use another --exp-name" if cfg.resume == "auto" else
                "resume it with the flags it trained with"))
        load_sit_weights(run.model, ckpt["model"])
        load_sit_weights(run.ema, ckpt["ema"])
        run.opt.load_state_dict(ckpt["opt"])
        for group in run.opt.param_groups:
            group.update(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                         weight_decay=cfg.weight_decay)
        run.step, data = ckpt["steps"], ckpt.get("data", {})  # official ones: restart at `steps`
        run.sampler.start = data.get("epoch", 0) * run.sampler.per_epoch + data.get(
            "position", run.step)
    run.first_step = run.step
    return path


####################### Watching a run: log lines, metrics.jsonl, W&B ###########################

class Logger:
    """Sums the step statistics on the device and makes, every log_every steps, the interval's one
    host sync: a line with an ETA and a metrics.jsonl row (the source of truth), optionally to W&B,
    and between lines a progress bar on a terminal (rank 0)."""

    def __init__(self, run):
        from tqdm import tqdm
        cfg, self.run, self.count, self.wandb = run.cfg, run, 0, None
        self.sums = torch.zeros(3, device=run.device)
        self.flops = train_flops_per_image(run.model, run.encoders)
        name = torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else ""
        self.peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
        writes = run.rank == 0 and not cfg.bench
        self.file = open(os.path.join(run.dir, "metrics.jsonl"), "a") if writes else None
        if self.file and run.step:
            self.file.write(json.dumps({"resumed_at": run.step}) + "\n")
        if writes and cfg.wandb:
            import wandb  # only when asked for
            self.wandb = wandb.init(project=cfg.wandb, name=cfg.exp_name, dir=run.dir,
                                    config=asdict(cfg), resume="allow", id=hashlib.sha1(
                                        os.path.abspath(run.dir).encode()).hexdigest()[:16])
        self.bar = tqdm(total=cfg.max_steps, initial=run.step, unit="step", dynamic_ncols=True,
                        disable=True if run.rank else None)  # None: only on a terminal
        self.timer = time.perf_counter()

    def add(self, stats):
        self.sums += stats
        self.count += 1
        self.bar.update(1)

    def flush(self):
        run, cfg = self.run, self.run.cfg
        if run.world > 1:
            dist.all_reduce(self.sums)
            self.sums /= run.world
        loss, align, gnorm = (self.sums / self.count).tolist()  # the one sync of the interval
        if not all(math.isfinite(v) for v in (loss, align, gnorm)):
            raise UserError(f"non-finite loss at step {run.step} (loss {loss}, alignment "
                            f"{align}); stopping, the last checkpoint is kept")
        seconds = time.perf_counter() - self.timer
        per_device = self.count * cfg.batch_size / run.world / seconds
        stats = dict(loss=round(loss, 5), align=round(align, 5), grad_norm=round(gnorm, 4),
                     img_s=round(per_device * run.world, 1), img_s_per_device=round(per_device, 1))
        if self.peak:
            stats["mfu"] = round(per_device * self.flops / self.peak, 4)
        if run.device.type == "cuda":
            stats["mem_gb"] = round(torch.cuda.max_memory_allocated(run.device) / 2**30, 2)
        eta = datetime.timedelta(seconds=round((cfg.max_steps - run.step) * seconds / self.count))
        self.bar.set_postfix(loss=f"{loss:.4f}", align=f"{align:.3f}", img_s=stats["img_s"])
        self.record(stats, f" eta {eta}")
        self.sums.zero_()
        self.count, self.timer = 0, time.perf_counter()

    def record(self, row, tail=""):
        """This step's `row`: a line, a metrics.jsonl row, a W&B log."""
        row = {"step": self.run.step, **row}
        if self.run.rank == 0:
            self.bar.write(" ".join(f"{k} {v}" for k, v in row.items()) + tail)
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        if self.wandb:
            self.wandb.log(row, step=self.run.step)

    def image(self, path):
        if self.wandb:
            import wandb
            self.wandb.log({"samples": wandb.Image(path)}, step=self.run.step)

    def close(self):
        self.bar.close()
        if self.file:
            self.file.close()
        if self.wandb:
            self.wandb.finish()


####################### Grids: guidance, the preview samplers, the PNG ##########################
# DiT's and REPA's showcase ImageNet classes (golden retriever, otter, red panda, geyser, macaw,
# valley, balloon, arctic fox); a model with fewer classes shows its first 10.
GRID_CLASSES = [207, 360, 387, 974, 88, 979, 417, 279]
GRID_CFG = 4.0  # the grids' guidance scale, the official trainer's


def guidance_scale(cfg_scale, t, guidance_low, guidance_high):
    """cfg_scale inside [guidance_low, guidance_high], else 1. Inclusive, in float64: with 5 ODE
    steps t = 0.2 exactly, so an interval from 0.2 guides the last step, as the official."""
    return cfg_scale if guidance_low <= t <= guidance_high else 1.0


class JointClassToken(nn.Module):
    """REG's sampling state: each image's latents (C, H, W) and class token (D) in one row, so
    that every solver integrates both; the class token starts as N(0, I) as the latents do, and
    no encoder runs. `guided` mixes its columns by cls_cfg_scale (0: unguided, as the official)."""

    def __init__(self, model, shape, cls_cfg_scale):
        super().__init__()
        self.model, self.shape, self.cls_cfg_scale = model, tuple(shape), cls_cfg_scale
        # reg False: to a solver this is a plain velocity model, so it is not wrapped again
        self.columns, self.num_classes, self.reg = math.prod(shape), model.num_classes, False

    def join(self, z, cls):
        return torch.cat([z.flatten(1), cls], 1)

    def split(self, x):  # -> (latents, class token)
        return x[:, :self.columns].view(-1, *self.shape), x[:, self.columns:]

    def forward(self, x, t, y):
        latents, cls = self.split(x)
        v, _, v_cls = self.model(latents, t, y, cls=cls)
        return (self.join(v, v_cls),)


def guided(model, x, t, y, cfg_scale, dtype, mixed_channels=None):
    """model(x, t, y)[0] as `dtype`, with cfg_scale > 1 classifier-free guided: uncond +
    cfg_scale (cond - uncond) on the first `mixed_channels` (all; DiT's eps), the rest (DiT's
    variance value) the conditional half's; REG's class token by its own scale. The only place
    guidance happens: one batched call, the conditional half first, then the null label."""
    if cfg_scale <= 1:
        return model(x, t, y)[0].to(dtype)
    null = torch.full_like(y, model.num_classes)  # the official hard-codes 1000, the same
    cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))[0].to(
        dtype).chunk(2)
    k, rest = ((model.columns, model.cls_cfg_scale) if isinstance(model, JointClassToken) else
               (mixed_channels or cond.shape[1], 0))
    mix = lambda c, u, scale: u + scale * (c - u)
    return torch.cat([mix(cond[:, :k], uncond[:, :k], cfg_scale),
                      mix(cond[:, k:], uncond[:, k:], rest) if rest else cond[:, k:]], 1)


@torch.no_grad()
def sample_euler(model, z, y, num_steps=50, cfg_scale=1.0):
    """The official trainer's preview: Euler steps of dx = v dt from noise z (t = 1) to data on
    linspace(1, 0, N + 1), guided on every step, float64 state, the model in z's dtype."""
    ts = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64).tolist()
    x = z.to(torch.float64)
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        t = torch.full((x.shape[0],), t_cur, dtype=z.dtype, device=x.device)
        x = x + (t_next - t_cur) * guided(model, x.to(z.dtype), t, y, cfg_scale, torch.float64)
    return x


@torch.no_grad()
def sample_ddpm(model, z, y, num_steps=250, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0,
                generator=None):
    """DiT's sampler (its sample_ddp.py): ancestral steps x <- mean + sigma noise of p(x_{k-1} |
    x_k) down the chain respaced to `num_steps`, in z's dtype (float32 as the official). The model
    sees the ORIGINAL k; then the step's noise is drawn (randn_like, or `generator`), masked at
    the last step. Guidance is on while k / 1000 is in [guidance_low, guidance_high]."""
    sched, x = ddpm_schedule(num_steps, z.device), z
    for i, k in reversed(list(enumerate(space_timesteps(num_steps)))):
        t = torch.full((x.shape[0],), i, device=x.device)  # the step of the respaced tables
        scale = guidance_scale(cfg_scale, k / DDPM_STEPS, guidance_low, guidance_high)
        out = guided(model, x, torch.full_like(t, k), y, scale, x.dtype, x.shape[1])
        mean, log_var, _ = ddpm_model_gaussian(sched, x, t, *out.chunk(2, dim=1))
        noise = torch.randn_like(x) if generator is None else torch.randn(
            x.shape, generator=generator, dtype=x.dtype, device=x.device)
        x = mean + float(i > 0) * torch.exp(0.5 * log_var) * noise  # no noise into x_0
    return x


def to_uint8(x):
    """[-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3) on the CPU as the official generate.py: the cast
    truncates rather than rounds, and the FID numbers were computed on these bytes."""
    return torch.clamp(255.0 * ((x + 1) / 2), 0, 255).permute(0, 2, 3, 1).to("cpu", torch.uint8)


def decode(x, vae):
    """Solver output -> uint8 images, through the SD-VAE for latents (z / 0.18215 undoes the
    training scale; divided by a tensor as the official: CUDA divides by a Python scalar as a
    multiplication by its reciprocal, which can differ in the last bit)."""
    x = x.to(torch.float32)
    if vae is not None:
        x = vae.decode(x / torch.full((1,), LATENT_SCALE, device=x.device)).sample
    return to_uint8(x)


def save_grid(images, names, path):
    """uint8 (rows * cols, H, W, 3), a class per row -> a PNG with each row's class name; small
    images are enlarged without smoothing so a person can see them."""
    from PIL import Image, ImageDraw
    rows, cols, zoom = len(names), len(images) // len(names), max(1, 64 // images.shape[1])
    h, w, pad, margin = images.shape[1] * zoom, images.shape[2] * zoom, 2, 56
    grid = Image.new("RGB", (margin + cols * (w + pad), rows * (h + pad)), "white")
    for r, name in enumerate(names):
        ImageDraw.Draw(grid).text((4, r * (h + pad) + h // 2 - 6), str(name), fill="black")
        for j in range(cols):
            tile = Image.fromarray(images[r * cols + j].numpy()).resize((w, h), Image.NEAREST)
            grid.paste(tile, (margin + j * (w + pad), r * (h + pad)))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: grid.save(f, format="PNG"))


def grid_writer(run, per_class=4, num_steps=50):
    """A function that samples the EMA with the same noise and labels all run long (resumes too),
    as the paper's fig. 4, into samples/NNNNNNN.png: 50 Euler steps with CFG 4 as the official
    trainer, or DiT's 50 DDPM steps with seeded noise; decoded by the data's VAE."""
    model, names = run.model, getattr(run.dataset, "class_names", None)
    classes = GRID_CLASSES if model.num_classes == NUM_CLASSES else list(range(
        min(10, model.num_classes)))
    labels = torch.tensor(classes).repeat_interleave(per_class).to(run.device)
    size, g = run.model_kwargs["input_size"], torch.Generator().manual_seed(run.cfg.seed)
    noise = torch.randn(len(labels), model.in_channels, size, size, generator=g).to(run.device)
    cfg_scale = GRID_CFG if model.y_embedder.dropout_prob > 0 else 1.0  # with a null label
    vae = None if model.in_channels == 3 else load_vae(
        json.load(open(os.path.join(run.cfg.data_dir, "manifest.json")))["vae"], run.device)

    joint = JointClassToken(run.ema, noise.shape[1:], cfg_scale) if model.reg else None
    if joint:  # REG: the class token's noise, after the latents'
        noise = joint.join(noise, torch.randn(len(labels), model.cls_projectors2.in_features,
                                              generator=g).to(run.device))

    @torch.no_grad()
    def write():
        if model.learn_sigma:
            g = torch.Generator(run.device).manual_seed(run.cfg.seed)
            x = sample_ddpm(run.ema, noise, labels, num_steps, cfg_scale, generator=g)
        else:
            x = sample_euler(joint or run.ema, noise, labels, num_steps, cfg_scale)
            x = joint.split(x)[0] if joint else x
        path = os.path.join(run.dir, "samples", f"{run.step:07d}.png")
        save_grid(decode(x, vae), [names[c] for c in classes] if names else classes, path)
        return path
    return write


####################### Measuring alignment: CKNNA and linear probes (fig. 2) ###################
# Sec. 3 measures how far a SiT's hidden states are from an encoder's by CKNNA (Huh et al. 2024,
# "The Platonic Representation Hypothesis": kernel alignment kept to nearest neighbours) and by
# linear probes: the PRH code's definitions (minyoungg/platonic-rep, metrics.py) and numbers, the
# features L2-normalised by the caller as there.

def knn_mask(kernel, topk):
    """(N, N) 0/1 mask of each row's `topk` largest similarities, self excluded (not symmetric)."""
    ranked = kernel.clone().fill_diagonal_(float("-inf"))
    return torch.zeros_like(kernel).scatter_(1, ranked.topk(topk, dim=1).indices, 1)


def hsic_unbiased(K, L):
    """Unbiased HSIC (Song et al. 2012, eq. 5), K~, L~ with zeroed diagonals: [tr(K~ L~) + (1'K~1)
    (1'L~1) / ((N-1)(N-2)) - 2/(N-2) 1'K~L~1] / (N(N-3)); tr(K~ L~) = sum(K~ * L~^T)."""
    n = K.shape[0]
    K, L = K.clone().fill_diagonal_(0), L.clone().fill_diagonal_(0)
    return ((K * L.T).sum() + K.sum() * L.sum() / ((n - 1) * (n - 2))
            - 2 * (K.sum(0) @ L.sum(1)) / (n - 2)) / (n * (n - 3))


def cknna(a, b, topk=10):
    """CKNNA of features a (N, D_a) and b (N, D_b) of N samples: CKA of K = a a^T and L = b b^T
    on the pairs that are k-NN in BOTH spaces (M = M_a M_b), near 0 for unrelated features:
        HSIC(M K, M L) / (sqrt(HSIC(M_a K, M_a K) HSIC(M_b L, M_b L)) + 1e-6), 400 MB at N = 10K"""
    if not 2 <= topk < a.shape[0]:
        raise UserError(f"CKNNA needs 2 <= topk < N, got topk {topk} for N = {a.shape[0]}")
    K, L = a @ a.T, b @ b.T
    mask_a, mask_b = knn_mask(K, topk), knn_mask(L, topk)
    kl = hsic_unbiased(mask_a * mask_b * K, mask_a * mask_b * L)
    kk, ll = hsic_unbiased(mask_a * K, mask_a * K), hsic_unbiased(mask_b * L, mask_b * L)
    return (kl / (torch.sqrt(kk * ll) + 1e-6)).item()


def fit(params, loss, steps, lr, weight_decay=0.05, betas=(0.9, 0.999), warmup=0):
    """Minimise loss(step) by AdamW: lr warmed up linearly, then a half cosine to 0."""
    opt = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / max(warmup, 1))
                                                 * 0.5 * (1 + math.cos(math.pi * s / steps)))
    with torch.enable_grad():
        for step in range(steps):
            value = loss(step)
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            schedule.step()


def linear_probe(train_x, train_y, test_x, test_y, num_classes, epochs=90, batch_size=16384,
                 lr=1e-3, seed=0):
    """Top-1 test accuracy of the DAE / MAE linear probe on frozen features (N, D): affine-free
    BatchNorm (exact batch statistics), a Linear from N(0, 0.01^2), cross-entropy, a half cosine,
    batches of at most N; Adam, not LARS, which 90 iterations (90 epochs of 8K features) defeat."""
    g = torch.Generator().manual_seed(seed)
    n, dim = train_x.shape
    batch = min(batch_size, n)
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6, momentum=None),
                         nn.Linear(dim, num_classes)).to(train_x.device)
    with torch.no_grad():
        head[1].weight.copy_(torch.randn(num_classes, dim, generator=g) * 0.01)
        head[1].bias.zero_()
    rows = torch.cat([torch.randperm(n, generator=g)[:n // batch * batch].view(-1, batch)
                      for _ in range(epochs)]).to(train_x.device)  # rows[i]: iteration i's
    fit(head.parameters(), lambda i: F.cross_entropy(head(train_x[rows[i]].float()),
                                                     train_y[rows[i]]), len(rows), lr, 0)
    head.eval()
    with torch.no_grad():
        return (head(test_x.float()).argmax(1) == test_y).float().mean().item()


@torch.no_grad()
def block_features(model, x, t, noise, path_type="linear", cls=()):
    """Every block's output averaged over patch tokens (the paper's appendix): (B, depth, D)
    float32 for latents x noised to t (B,) in [0, 1] (DiT: step min(int(1000 t), 999)). No class
    label (official issue #32): the null label, or 0 for all where the model has none. REG: cls =
    (the encoder's class token, its noise), noised to t as x is."""
    if model.learn_sigma:
        t = (t * DDPM_STEPS).long().clamp(max=DDPM_STEPS - 1)
        x_t = ddpm_noised(ddpm_schedule(DDPM_STEPS, x.device), x, t, noise)
    else:
        alpha, sigma, _, _ = interpolant(t.to(x.dtype).view(-1, 1, 1, 1), path_type)
        x_t, t = alpha * x + sigma * noise, t.to(x.dtype)
        cls = [alpha.flatten(1) * cls[0] + sigma.flatten(1) * cls[1]] if cls else []
    has_null = model.y_embedder.dropout_prob > 0  # the null label's row exists
    y = torch.full((len(x),), model.num_classes if has_null else 0, device=x.device)
    hidden = model(x_t, t, y, *cls, return_hidden=True)[-1]
    return torch.stack([h[:, model.reg:].float().mean(1) for h in hidden], dim=1)


def clean_latents(moments, dataset):
    """x_* for measuring: the VAE posterior's mean, scaled, not a sample as training draws, so that
    a measurement depends on the image only."""
    return moments.chunk(2, dim=1)[0] * dataset.latent_scale


def alignment_log(run, data=None):
    """--align-every: a function measuring the EMA on one fixed set of images (`data`, else the
    training set; the same images and noise all run, t = 0.5, mid-path): CKNNA (k = --knn) to each
    encoder at block encoder_depth and at the last block, and a linear probe at the aligned block
    (trained on the first half, tested on the second). One pass of the EMA, on rank 0."""
    cfg, data, aligned = run.cfg, run.dataset if data is None else data, run.model.encoder_depth
    g = torch.Generator().manual_seed(cfg.seed)
    rows = torch.randperm(len(data), generator=g)[:cfg.align_images].sort().values.numpy()
    images, moments, labels = data.__getitems__(rows)
    x = clean_latents(moments, data).to(run.device)
    noise, chunk = torch.randn(x.shape, generator=g).to(run.device), max(1, cfg.batch_size //
                                                                         run.world)
    autocast = torch.autocast(run.device.type, torch.bfloat16, enabled=run.precision == "bf16")
    with autocast:  # the encoders' side once
        feats = [encode(run.encoders, im.to(run.device), cfg.reg) for im in images.split(chunk)]
    feats = [torch.cat(f).float() for f in zip(*feats)]  # REG: the class token leads
    targets = [F.normalize(f[:, cfg.reg:].mean(1), dim=-1) for f in feats]
    cls = [feats[0][:, 0], torch.randn(feats[0][:, 0].shape, generator=g).to(x)] if cfg.reg else []
    batches = list(zip(x.split(chunk), noise.split(chunk), *[c.split(chunk) for c in cls]))

    @torch.no_grad()
    def measure():
        with autocast:  # each batch: latents, noise[, class token, its noise]
            feats = torch.cat([block_features(run.ema, b[0], torch.full((len(b[0]),), 0.5,
                                                                         device=x.device), b[1],
                                              cfg.path_type, b[2:]) for b in batches])
        half, y = len(feats) // 2, labels.to(feats.device)
        probe = linear_probe(feats[:half, aligned - 1], y[:half], feats[half:, aligned - 1],
                             y[half:], run.model.num_classes, epochs=100, lr=1e-2)
        feats = F.normalize(feats, dim=-1)
        return {**{f"cknna/{enc.name}/block{b}": round(cknna(feats[:, b - 1], z, cfg.knn), 4)
                   for enc, z in zip(run.encoders, targets)
                   for b in sorted({aligned, len(run.model.blocks)})},
                f"probe/block{aligned}": round(probe, 4)}
    return measure


####################### The loop ################################################################

def git_revision():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=os.path.dirname(os.path.abspath(__file__)),
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):  # no git, or it hangs
        return "unknown"


@contextlib.contextmanager
def stop_signal():
    """Yields stop(): True once SIGTERM (preemption) or SIGINT (Ctrl-C) has come to any rank; the
    loop then saves and exits after the step. A second signal acts as usual (a hung run can still
    be killed). Ranks agree through a CPU (gloo) all-reduce: no host-device sync."""
    flag = torch.zeros(1)
    group = dist.new_group(backend="gloo") if dist.is_initialized() else None

    def handler(sig, frame):
        flag.fill_(1)
        signal.signal(sig, previous[sig])
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}

    def stop():
        seen = flag.clone()
        if group is not None:
            dist.all_reduce(seen, op=dist.ReduceOp.MAX, group=group)
        return bool(seen.item())
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def start_log(run, path, own_data):
    """The run folder's config.json, and what runs (the data: a tool's says what it is)."""
    cfg, params = run.cfg, sum(p.numel() for p in run.model.parameters())
    info = dict(config=asdict(cfg), model_kwargs=run.model_kwargs, git=git_revision(),
                world=run.world)
    if run.rank == 0 and not cfg.bench:
        os.makedirs(run.ckpt_dir, exist_ok=True)
        atomic_write(os.path.join(run.dir, "config.json"), lambda f: json.dump(info, f, indent=1),
                     "w")
    data = (run.dataset.description if own_data else
            "random data and random-weight encoders (--bench)" if cfg.bench else
            f"{len(run.dataset):,} images at {run.dataset.resolution} px from {cfg.data_dir}")
    print0(f"config {json.dumps(info['config'])}\nmodel {json.dumps(run.model_kwargs)}\ndata "
           f"{data}\ngit {info['git']}, world {run.world}, device {run.device}, {run.precision};"
           f" {'DiT' if run.model.learn_sigma else 'SiT'} {params:,} parameters" +
           (f"\nresumed from {path} at step {run.step}" if path else ""))


def train(cfg, data=None, encoders=None, measure=None):
    """The training loop: one path for CPU, one GPU and torchrun over many GPUs and nodes.
    Tools train through three factories, called in the run's processes (so that under torchrun
    each builds its own, after the process group exists):
      data()           -> the training set in the reader's format, with a `description` for the
                          log and optionally `class_names`. Default: the shards at --data-dir.
      encoders(device) -> [Encoder]: the frozen targets of eq. (8). Default: --enc-type's.
      measure(run)     -> a function () -> dict, called on rank 0 every --align-every steps; its
                          dict is a row of metrics.jsonl. Default: alignment_log(run).
    The paper's runs need none of them; tools/demo.py trains through all three."""
    run = start_run(cfg, data, encoders)
    path, saves = resume_run(run), not cfg.bench
    if run.step >= cfg.max_steps:  # nothing to do, and nothing in the run folder changes
        print0(f"{run.dir} is already at step {run.step} (--max-steps {cfg.max_steps}): nothing "
               f"to train; train longer with a larger --max-steps, or start a new run with "
               f"another --exp-name")
        return run
    start_log(run, path, data is not None)
    batches = iter(loader(run.dataset, run.sampler, cfg.num_workers))
    watch = run.rank == 0 and saves
    grid = grid_writer(run) if watch and cfg.sample_every else None
    aligner = (measure or alignment_log)(run) if watch and cfg.align_every else None
    log, debug = Logger(run), cfg.sync_debug and run.device.type == "cuda"
    run.model.train()
    with stop_signal() as stop:
        while run.step < cfg.max_steps:
            # One optimisation step (--sync-debug: after the first, any host-device sync raises)
            if debug:
                torch.cuda.set_sync_debug_mode("error" if run.step > run.first_step else 0)
            log.add(train_step(run, [next(batches) for _ in range(cfg.grad_accum)]))
            if debug:
                torch.cuda.set_sync_debug_mode(0)
            if run.step % cfg.log_every == 0 or run.step == cfg.max_steps:
                log.flush()  # the one host sync of the interval
            if run.step == cfg.align_until:
                print0(f"step {run.step}: --align-until reached; from here no alignment term, and "
                       f"the encoders no longer run (HASTE)")
            # Grids, measurements, a signal, checkpoints: time not counted as training
            began = time.perf_counter()
            if grid and (run.step == 1 or run.step % cfg.sample_every == 0):
                log.image(grid())
            if aligner and run.step % cfg.align_every == 0:
                log.record(aligner())
            stopped = stop()
            if saves and (run.step % cfg.ckpt_every == 0 or run.step == cfg.max_steps):
                save_checkpoint(run, f"{run.step:07d}.pt")
            elif saves and (stopped or run.step % cfg.latest_every == 0):
                save_checkpoint(run, "latest.pt")
            if stopped:
                print0(f"stopped by signal at step {run.step}" +
                       ("; saved, resume with the same command" if saves else ""))
                break
            log.timer += time.perf_counter() - began
    log.close()
    if saves and run.step == cfg.max_steps:
        print0(f"done: {run.step} steps; checkpoints in {run.ckpt_dir}, metrics in "
               f"{os.path.join(run.dir, 'metrics.jsonl')}" +
               (f", grids in {os.path.join(run.dir, 'samples')}" if grid else "") +
               f". Sample with: python sample.py --ckpt {run.dir}")
    return run


def in_words(error):
    """The line for an error of the input: a UserError's own, or a file where a folder must be
    (--results-dir, --data-dir, --sample-dir naming a file, or a file on the way to them)."""
    return f"a file is where a folder must be: {error.filename}" if isinstance(error, OSError) \
        else error


def run_command(work, errors=()):
    """work() as a command (repa.py's, or a tool's): bad input (a UserError, or a tool's own
    `errors`) is one clear line and exit code 2; the process group ends either way."""
    try:
        work()
    except (UserError, FileExistsError, NotADirectoryError, *errors) as e:
        rank = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
        print(f"error: {rank}{in_words(e)}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def parse_args(argv=None):
    """Config from the command line; names and values are checked here, before anything slow."""
    parser = Parser(description="REPA training (see the docstring of repa.py).",
                    allow_abbrev=False)  # --max-step must not pass for --max-steps
    add_flags(parser, Config)
    cfg = Config(**vars(parser.parse_args(argv)))
    try:
        check_config(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    except UserError as e:
        parser.error(e)
    return cfg


def main(argv=None):
    cfg = parse_args(argv)
    run_command(lambda: train(replace(cfg, max_steps=cfg.bench, log_every=max(1, cfg.bench // 2))
                              if cfg.bench else cfg))


if __name__ == "__main__":
    main()
