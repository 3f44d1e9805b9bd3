"""
REPA: REPresentation Alignment for diffusion transformers, in one file.
Yu et al., "Representation Alignment for Generation: Training Diffusion Transformers Is Easier
Than You Think", ICLR 2025 (arXiv 2410.06940). Numbers match the official code, sihyun-yu/REPA.

The method, with the paper's equation numbers
---------------------------------------------
Convention: t = 0 is data, t = 1 is noise (the official convention, the reverse of the SiT paper).

  (1) interpolant   x_t = alpha_t x_* + sigma_t eps,     eps ~ N(0, I)
                    linear: alpha_t = 1 - t,          sigma_t = t
                    cosine: alpha_t = cos(pi t / 2),  sigma_t = sin(pi t / 2)
  (2) velocity      v(x_t, t) = alpha'_t x_* + sigma'_t eps                  (the regression target)
  (3) v-loss        L_velocity = E ||v_theta(x_t, t, y) - v||^2
  (8) alignment     L_REPA = -E [ 1/N sum_n sim(y_*^[n], h_phi(h_t^[n])) ]
                    y_* = f(x_*): N patch features of the clean image from a frozen encoder f
                    h_t: the SiT hidden state after block `encoder_depth`; h_phi: a small MLP
                    sim: cosine similarity
  (9) total         L = L_velocity + lambda L_REPA,        lambda = 0.5

DiT + REPA (the paper's Table 3) keeps (8) and (9) and replaces (1)-(3) by DiT's improved DDPM:
  x_k = sqrt(abar_k) x_* + sqrt(1 - abar_k) eps with integer k ~ U{0, .., 999} and linear betas;
  the network outputs eps_theta and a variance value v, and L_hybrid = ||eps_theta - eps||^2 +
  L_vb, the variational bound term that trains v through a stop-gradient on eps_theta.

Glossary: h_phi = projector (one per encoder); encoder_depth = the block whose output is aligned
(8 for L and XL, 4 for B); lambda = `proj_coeff`; z / z_dims = encoder features and their widths.

Commands
--------
  pip install -r requirements.txt && python -m pytest -q test_repa.py tools       # set up, test
  torchrun --nproc_per_node=8 tools/prepare.py IMAGENET/train --data-dir data/imagenet256
  torchrun --nproc_per_node=8 repa.py --model XL/2 --data-dir data/imagenet256   # the paper
  torchrun --nproc_per_node=8 repa.py --model DiT-XL/2 --data-dir data/imagenet256   # DiT + REPA
  python repa.py --bench 30 --model XL/2 --batch-size 64 --compile   # img/s and MFU, no data
  torchrun --nproc_per_node=8 tools/analyze.py last.pt --data-dir IMAGENET/val \
      --enc-type dinov2-vit-g                # fig. 2: CKNNA and linear probes per block and t
  python sample.py --ckpt results/repa                                # a grid of samples
  torchrun --nproc_per_node=8 sample.py --ckpt results/repa --num-fid-samples 50000  # FID .npz

Map of this file
----------------
  I   The method     interpolant and t; DiT's DDPM schedule; SiT and DiT (embeddings, block,
                     projector, size table, loading); the loss (eqs. 3, 8, 9, and DiT's hybrid
                     loss); the frozen encoders; measuring alignment (CKNNA, linear probes).
                     Depends on torch, numpy and timm only: a reader who stops here has the whole
                     method and can paste it.
  II  Data           processes and files; the SD-VAE; reading images (ADM's crop) and the
                     prepared shards (tools/prepare.py writes them) in a resumable order.
  III Training       the config and its checks; EMA, checkpoints, signals; one step; the loop
                     (and its seam, through which the programs in tools/ train on their own data
                     and targets); the command line. Only `main` looks forward.
"""
import argparse
import contextlib
import copy
import datetime
import functools
import hashlib
import itertools
import json
import math
import os
import re
import signal
import sys
import time
import zipfile
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
WEIGHTINGS = ("uniform", "lognormal")


class UserError(Exception):
    """A problem with the user's input (a name, a file, a checkpoint). The command line prints it as
    one line, without a traceback; library callers get it as an ordinary exception."""


#################################################################################################
#                                                                                               #
#   PART I. THE METHOD: interpolant, SiT, the REPA loss, the encoders, measuring alignment      #
#                                                                                               #
#################################################################################################

#################################################################################
#                     The stochastic interpolant (eqs. 1-2)                     #
#################################################################################

def interpolant(t, path_type="linear"):
    """(alpha_t, sigma_t, d alpha_t / dt, d sigma_t / dt) for x_t = alpha_t x + sigma_t eps.

    Both paths go from data (t = 0: alpha = 1, sigma = 0) to noise (t = 1: alpha = 0, sigma = 1).
    The linear path is rectified flow; the cosine path keeps alpha^2 + sigma^2 = 1 (variance
    preserving). The path's math lives here and in its inverse below: the loss and the samplers
    (sample.py) both call them."""
    if path_type == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    if path_type == "cosine":
        angle = t * (math.pi / 2)
        return (torch.cos(angle), torch.sin(angle),
                -(math.pi / 2) * torch.sin(angle), (math.pi / 2) * torch.cos(angle))
    raise UserError(f"unknown path type {path_type!r}: choose one of {', '.join(PATH_TYPES)}")


def noise_ratio_time(ratio, path_type="linear"):
    """The t at which the path's noise-to-signal ratio sigma_t / alpha_t equals `ratio`:
    t / (1 - t) = ratio on the linear path, tan(pi t / 2) = ratio on the cosine path."""
    if path_type == "linear":
        return ratio / (1 + ratio)
    if path_type == "cosine":
        return (2 / math.pi) * torch.atan(ratio)
    raise UserError(f"unknown path type {path_type!r}: choose one of {', '.join(PATH_TYPES)}")


def sample_t(batch, weighting="uniform", path_type="linear", device=None):
    """Training times t in [0, 1], shape (batch,).

    uniform:   t ~ U(0, 1), the SiT default and the paper's.
    lognormal: the EDM noise-level distribution, sigma = exp(n) with n ~ N(0, 1), at the t where
               the path's noise-to-signal ratio is sigma. It puts more training at middle noise."""
    if weighting == "uniform":
        return torch.rand(batch, device=device)
    if weighting == "lognormal":
        return noise_ratio_time(torch.randn(batch, device=device).exp(), path_type)
    raise UserError(f"unknown weighting {weighting!r}: choose one of {', '.join(WEIGHTINGS)}")


#################################################################################
#          The improved DDPM of DiT: schedule, posterior, learned variance      #
#################################################################################
# The paper also applies REPA to DiT, trained with the improved DDPM (Nichol & Dhariwal 2021) as
# in DiT's code. Timesteps are integers k = 0 .. T-1 (k = 0 the least noisy), T = 1000, and
# abar_k = prod_{j <= k} (1 - beta_j) with DDPM's linear betas:
#   forward    q(x_k | x_0) = N(sqrt(abar_k) x_0, (1 - abar_k) I)
#   posterior  q(x_{k-1} | x_k, x_0) = N(c1_k x_0 + c2_k x_k, beta~_k I)   (Bayes on the two)
#              c1 = beta sqrt(abar_prev) / (1 - abar),  c2 = (1 - abar_prev) sqrt(1 - beta) /
#              (1 - abar),  beta~ = beta (1 - abar_prev) / (1 - abar)
#   model      p(x_{k-1} | x_k): the posterior at x_0 = (x_k - sqrt(1 - abar_k) eps_theta) /
#              sqrt(abar_k), with log-variance frac log beta_k + (1 - frac) log beta~_k,
#              frac = (v_theta + 1) / 2: the network's second C channels v_theta pick it
# A sampler with fewer steps keeps a subset of the k (`space_timesteps`) and recomputes the betas
# of that shorter chain from abar, so the same formulas serve the training chain and every sampler.
DDPM_STEPS = 1000  # T


def space_timesteps(num_steps, total=DDPM_STEPS):
    """The `num_steps` original timesteps a respaced chain keeps: evenly strided over 0 .. total-1
    and rounded with Python's round, i.e. half to even (with 25 steps the stride is 41.625 and
    166.5 -> 166), accumulated step by step: the official `space_timesteps` with one section."""
    if not 2 <= num_steps <= total:
        raise UserError(f"DDPM sampling takes 2 to {total} steps, got {num_steps}")
    stride = (total - 1) / (num_steps - 1)
    return [round(k) for k in itertools.accumulate([stride] * (num_steps - 1), initial=0.0)]


@functools.lru_cache(maxsize=None)
def ddpm_schedule(num_steps=DDPM_STEPS, device="cpu"):
    """The tables of the chain through `space_timesteps(num_steps)` (all 1000 for training), each a
    float64 tensor indexed by the respaced step i; "timesteps"[i] is the original k the model
    sees. Computed in float64 numpy with the official expressions (so they agree to the bit), once
    per device: reading them costs no host-device copy in a training step."""
    scale = 1000 / DDPM_STEPS  # DDPM's linear betas from 1e-4 to 0.02, for T = 1000
    linear = np.linspace(scale * 1e-4, scale * 0.02, DDPM_STEPS)
    kept = space_timesteps(num_steps)
    abar_kept = np.cumprod(1.0 - linear)[kept]
    betas = 1.0 - abar_kept / np.append(1.0, abar_kept[:-1])  # the shorter chain, same marginals
    abar = np.cumprod(1.0 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    tables = dict(
        betas=betas, alphas_cumprod=abar, log_betas=np.log(betas),
        sqrt_alphas_cumprod=np.sqrt(abar), sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - abar),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / abar),             # x_0 from x_k and eps
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / abar - 1),
        posterior_variance=post_var,
        # beta~_0 = 0 (x_0 is known there): its log is clipped to log beta~_1, not -inf
        posterior_log_variance_clipped=np.log(np.append(post_var[1], post_var[1:])),
        posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
        posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar))
    out = {k: torch.from_numpy(v).to(device) for k, v in tables.items()}
    return dict(out, timesteps=torch.tensor(kept, device=device))


def schedule_at(table, t):
    """table[t] for a batch of steps t (B,), as float32 (B, 1, 1, 1): the float64 tables are read
    per sample and cast before use, as the official code does, so all arithmetic is float32."""
    return table[t].float().view(-1, 1, 1, 1)


def ddpm_noised(sched, x0, t, noise):
    """x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), with the given noise."""
    return (schedule_at(sched["sqrt_alphas_cumprod"], t) * x0 +
            schedule_at(sched["sqrt_one_minus_alphas_cumprod"], t) * noise)


def ddpm_posterior(sched, x0, x_t, t):
    """(mean, clipped log-variance) of q(x_{t-1} | x_t, x_0), t the step index of `sched`."""
    mean = (schedule_at(sched["posterior_mean_coef1"], t) * x0 +
            schedule_at(sched["posterior_mean_coef2"], t) * x_t)
    return mean, schedule_at(sched["posterior_log_variance_clipped"], t)


def ddpm_model_gaussian(sched, x_t, t, eps, v):
    """(mean, log-variance, x_0) of the model's p(x_{t-1} | x_t) from its outputs eps and v.

    v is meant to lie in [-1, 1] and interpolates the log-variance between the posterior's
    (v = -1) and beta_t (v = 1); as in the official code it is not clamped (outside, the
    interpolation extrapolates), and x_0 is not clipped."""
    frac = (v + 1) / 2
    log_var = (frac * schedule_at(sched["log_betas"], t) +
               (1 - frac) * schedule_at(sched["posterior_log_variance_clipped"], t))
    x0 = (schedule_at(sched["sqrt_recip_alphas_cumprod"], t) * x_t -
          schedule_at(sched["sqrt_recipm1_alphas_cumprod"], t) * eps)
    return ddpm_posterior(sched, x0, x_t, t)[0], log_var, x0


#################################################################################
#             Embedding layers for timesteps and class labels (SiT/DiT)         #
#################################################################################

def modulate(x, shift, scale):
    """adaLN: a LayerNorm whose affine parameters are predicted from the condition (t, y)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> a 256-dim sinusoidal code -> MLP. Note that t is *not* scaled by 1000 as in
    DDPM-style models: the official SiT feeds the raw float, so the lowest frequencies barely move
    over [0, 1]. We keep that, because official weights depend on it."""

    def __init__(self, hidden_size, frequency_size=256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t, max_period=10000):
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        code = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # cos first, as in GLIDE/DiT
        # SiT's t is in the latents' dtype (the official casts the code to it); integer DDPM
        # timesteps (DiT) keep the float32 code
        return self.mlp(code.to(t.dtype) if t.is_floating_point() else code)


class LabelEmbedder(nn.Module):
    """Class label -> vector. The extra row `num_classes` is the null label used by classifier-free
    guidance: in training, each label is replaced by it with probability `dropout_prob`, so that
    the same network learns both v(x, t, y) and v(x, t, null). As in the official code, a model
    trained without dropout has no null row (and so no guidance)."""

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
    """Fixed 2-D sin-cos positions (MAE): half the channels encode the row, half the column, each
    as [sin(pos * w_k), cos(pos * w_k)] with w_k = 10000^(-k / (dim/4)). Returns (grid^2, dim)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")

    def embed(p):
        out = p.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    # the official code meshgrids (w, h) and encodes grid[0] first, which is the column index
    return torch.cat([embed(cols), embed(rows)], dim=1).float()


#################################################################################
#                        The SiT model with REPA's projector                    #
#################################################################################

class SiTBlock(nn.Module):
    """A transformer block with adaLN-Zero conditioning (DiT, sec. 3.2). The condition c = t_emb +
    y_emb gives shift/scale for both LayerNorms and a gate for both residual branches. The gates
    start at zero, so every block starts as the identity and training is stable from step 0."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, qk_norm=False):
        super().__init__()
        # no affine parameters: adaLN provides them per sample
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        # timm's Attention calls F.scaled_dot_product_attention (flash / memory-efficient kernels)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm,
                              norm_layer=nn.LayerNorm)  # the norm of q and k when qk_norm is on
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio),
                       act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN, then a linear map from each token back to a p x p x C patch of velocity."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def projector(hidden_size, projector_dim, z_dim):
    """h_phi of eq. (8): a 3-layer MLP applied to each token, from the SiT width to the encoder's.
    It is only used for the loss; at sampling time it is dead weight (about 8M parameters)."""
    return nn.Sequential(nn.Linear(hidden_size, projector_dim), nn.SiLU(),
                         nn.Linear(projector_dim, projector_dim), nn.SiLU(),
                         nn.Linear(projector_dim, z_dim))


class SiT(nn.Module):
    """Scalable Interpolant Transformer (Ma et al. 2024): DiT's architecture trained on the
    interpolant of eq. (1), plus REPA's projectors reading block `encoder_depth` (1-based).
    The defaults are SiT-XL/2's with one DINOv2-B target. With learn_sigma it is DiT (see `DiT`).

    forward(x, t, y) -> (out, zs): out is v (x's shape), or for DiT eps and the variance value v
    (2C channels); zs[k] is (B, tokens, z_dims[k]). t is a float in [0, 1] for SiT, an integer
    timestep 0 .. 999 for DiT.
    forward(x, t, y, return_hidden=True) -> (out, zs, hidden): hidden[i] is the state after block
    i + 1, (B, tokens, hidden_size), for measuring alignment (fig. 2)."""

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
                 num_heads=16, mlp_ratio=4.0, class_dropout_prob=CLASS_DROPOUT,
                 num_classes=NUM_CLASSES, encoder_depth=8, z_dims=(768,),
                 projector_dim=PROJECTOR_DIM, qk_norm=False, learn_sigma=False):
        super().__init__()
        if z_dims and not 1 <= encoder_depth <= depth:  # without projectors it reads nothing
            raise UserError(f"encoder_depth must be in [1, {depth}], got {encoder_depth}")
        self.in_channels, self.patch_size, self.learn_sigma = in_channels, patch_size, learn_sigma
        self.num_classes, self.encoder_depth = num_classes, encoder_depth
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        tokens = self.x_embedder.num_patches
        # a Parameter (not a buffer) so that official checkpoints, which store it, load strictly
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(SiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm)
                                    for _ in range(depth))
        self.projectors = nn.ModuleList(projector(hidden_size, projector_dim, z) for z in z_dims)
        # DiT's learned variance doubles the output: eps, then v (the improved DDPM)
        self.final_layer = FinalLayer(hidden_size, patch_size,
                                      2 * in_channels if learn_sigma else in_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's initialisation. The zeroed adaLN and output layers make v = 0 exactly at init."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        grid = int(self.x_embedder.num_patches ** 0.5)
        self.pos_embed.data.copy_(sincos_pos_embed(self.pos_embed.shape[-1], grid)[None])
        w = self.x_embedder.proj.weight.data  # the patch conv is a Linear on flattened patches
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [
                self.final_layer.adaLN_modulation[-1], self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x):
        """(B, h*w, p*p*C) tokens -> (B, C, h*p, w*p) image."""
        p, c = self.patch_size, x.shape[-1] // self.patch_size ** 2
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y, return_hidden=False):
        x = self.x_embedder(x) + self.pos_embed     # (B, T, D), T = (H / p) * (W / p)
        c = self.t_embedder(t) + self.y_embedder(y)  # (B, D), the condition of every block
        zs, hidden = [], []  # zs stays empty without projectors (a plain DiT)
        for i, block in enumerate(self.blocks, start=1):
            x = block(x, c)
            hidden += [x] if return_hidden else []
            if i == self.encoder_depth:  # h_t of eq. (8): read it mid-network, token by token
                zs = [proj(x) for proj in self.projectors]
        out = self.unpatchify(self.final_layer(x, c)), zs
        return (*out, hidden) if return_hidden else out


def DiT(learn_sigma=True, z_dims=(), **kwargs):
    """DiT (Peebles & Xie 2023), the paper's other base model (Table 3): SiT's very network with
    learn_sigma (2C outputs: eps and the variance value v), trained with the improved DDPM
    (`ddpm_loss`) on integer timesteps fed unscaled to the same embedder. It takes the official
    DiT keywords (input_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio,
    class_dropout_prob, num_classes, learn_sigma). Without z_dims it is the official DiT, whose
    checkpoints load strictly; DiT + REPA passes z_dims (and encoder_depth) as SiT does."""
    return SiT(learn_sigma=learn_sigma, z_dims=z_dims, **kwargs)


# Sizes of the SiT paper (table 1), with REPA's alignment depth: 8 for L and XL and, from the
# official issue #5, 4 for B. S is not in the paper; it gets 4, like B (12 blocks too). T (tiny)
# is not in any paper either: a model that trains on a CPU in minutes. "DiT-XL/2" etc. are the same
# networks with DiT's learned variance, trained with the improved DDPM.
_WIDTHS = {"T": (6, 128, 4, 2), "S": (12, 384, 6, 4), "B": (12, 768, 12, 4),
           "L": (24, 1024, 16, 8), "XL": (28, 1152, 16, 8)}
SIZES = {f"{name}/{p}": dict(depth=d, hidden_size=h, num_heads=n, patch_size=p, encoder_depth=e)
         for name, (d, h, n, e) in _WIDTHS.items() for p in (2, 4, 8)}
SIZES |= {f"DiT-{name}": dict(size, learn_sigma=True) for name, size in SIZES.items()}


def size_config(name):
    """SIZES entry for 'XL/2', the official 'SiT-XL/2', or 'DiT-XL/2'."""
    key = name.removeprefix("SiT-")
    if key not in SIZES:
        raise UserError(f"unknown model size {name!r}: choose one of {', '.join(SIZES)}")
    return dict(SIZES[key])


def build_model(name, **overrides):
    """SiT (or DiT) of a named size, e.g. build_model('XL/2', input_size=32, z_dims=[768])."""
    return SiT(**{**size_config(name), **overrides})


def load_sit_weights(model, state_dict):
    """Load ours or an official SiT state dict strictly, with one clear error when it is for
    another model. The released XL/2 `last.pt` names the blocks after `encoder_depth`
    `decoder_blocks.N`; they are `blocks.(N + encoder_depth)` here."""
    renamed = {}
    for k, v in state_dict.items():
        k = k.removeprefix("module.").removeprefix("_orig_mod.")  # DDP / torch.compile wrappers
        if k.startswith("decoder_blocks."):
            _, n, rest = k.split(".", 2)
            k = f"blocks.{int(n) + model.encoder_depth}.{rest}"
        renamed[k] = v
    ours = model.state_dict()
    missing, unexpected = ours.keys() - renamed.keys(), renamed.keys() - ours.keys()
    wrong = [k for k in ours.keys() & renamed.keys() if ours[k].shape != renamed[k].shape]
    if missing or unexpected or wrong:
        example = ""
        if wrong:
            example = (f"; {wrong[0]} is {tuple(renamed[wrong[0]].shape)}, expected "
                       f"{tuple(ours[wrong[0]].shape)}")
        raise UserError(f"checkpoint does not fit this model ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected, {len(wrong)} wrong-shaped keys{example}): "
                        f"is it for another size or encoder set?")
    bad = next((k for k, v in renamed.items() if v.is_floating_point() and
                not torch.isfinite(v).all()), None)
    if bad:  # a bit flipped on disk, or weights saved from a run that had diverged
        raise UserError(f"checkpoint has non-finite values in {bad}: it is corrupt")
    model.load_state_dict(renamed, strict=True)
    return model


#################################################################################
#           The REPA loss (eqs. 3, 8, 9), and DiT's improved-DDPM loss          #
#################################################################################

def alignment_loss(zs_pred, zs):
    """Eq. (8): -cos(y_*^[n], h_phi(h_t^[n])) per patch n, averaged over patches, samples and
    encoders. zs_pred[k] and zs[k] are (B, N, D_k): projector outputs and encoder features.

    REPA pairs SiT token n with encoder patch n, so both lists must match one to one, and so must
    the token counts: anything else is an error here, not a silent broadcast. The cosine is in
    fp32: normalising in fp16 underflows to NaN (an official user report), at negligible cost."""
    if len(zs_pred) != len(zs):
        raise UserError(f"the model has {len(zs_pred)} projectors but {len(zs)} encoder targets")
    terms = []
    for k, (zp, z) in enumerate(zip(zs_pred, zs, strict=True)):
        if zp.shape != z.shape:
            raise UserError(f"projector {k} gives {tuple(zp.shape)} but encoder {k} gives "
                            f"{tuple(z.shape)}: REPA needs one SiT token per encoder patch "
                            f"(e.g. patch size 2 for a 16 x 16 DINOv2 grid) and equal widths")
        cos = (F.normalize(zp.float(), dim=-1) * F.normalize(z.float(), dim=-1)).sum(-1)
        terms.append(-cos.mean())
    return torch.stack(terms).mean() if terms else torch.zeros(())  # no encoders: plain SiT/DiT


def repa_loss(model, x, y, zs, path_type="linear", weighting="uniform", t=None, noise=None):
    """(denoising_loss (B,), alignment_loss scalar) for clean latents x (B, C, H, W), labels y and
    the encoder targets zs (a list of (B, N, D_k)). Combine them with `total_loss` (eq. 9).

    t (B,) and noise (x's shape) are drawn when not given, in the official order (t, then noise,
    then the label dropout inside the model): on a CPU, from the same global RNG state, the
    numbers equal the official SILoss's. Pass them to pin them."""
    t = sample_t(x.shape[0], weighting, path_type, x.device) if t is None else t
    noise = torch.randn_like(x) if noise is None else noise
    alpha, sigma, d_alpha, d_sigma = interpolant(t.to(x.dtype).view(-1, 1, 1, 1), path_type)
    x_t = alpha * x + sigma * noise                                  # eq. (1)
    v_target = d_alpha * x + d_sigma * noise                         # eq. (2)
    v_pred, zs_pred = model(x_t, t.to(x.dtype), y)
    denoising = (v_pred.float() - v_target.float()).square().mean(dim=(1, 2, 3))  # eq. (3)
    return denoising, alignment_loss(zs_pred, zs)


def normal_kl(mean1, log_var1, mean2, log_var2):
    """KL(N(mean1, e^log_var1) || N(mean2, e^log_var2)) per element, in nats."""
    return 0.5 * (-1.0 + log_var2 - log_var1 + torch.exp(log_var1 - log_var2) +
                  ((mean1 - mean2) ** 2) * torch.exp(-log_var2))


def discretized_gaussian_nll(x, mean, log_scale):
    """-log P(x) per element, in nats, for x on the 256 levels of 8-bit data in [-1, 1]: the
    Gaussian's mass on the bin x +- 1/255, with the outermost bins stretched to -inf and +inf, so
    the 256 probabilities sum to 1. The normal CDF is the tanh approximation (as GELU's) and
    probabilities are floored at 1e-12, as in the official code. DiT applies it to latents too."""
    cdf = lambda u: 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (u + 0.044715 * u ** 3)))
    centered, inv_std = x - mean, torch.exp(-log_scale)
    cdf_plus = cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = cdf(inv_std * (centered - 1.0 / 255.0))
    log_p = torch.where(x < -0.999, torch.log(cdf_plus.clamp(min=1e-12)),
                        torch.where(x > 0.999, torch.log((1.0 - cdf_min).clamp(min=1e-12)),
                                    torch.log((cdf_plus - cdf_min).clamp(min=1e-12))))
    return -log_p


def ddpm_vb(sched, x0, x_t, t, eps, v):
    """The variational-bound term L_{t-1} of each sample (B,), in bits per dimension:
    KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, and the decoder's -log p(x_0 | x_1)
    at t = 0."""
    true_mean, true_log_var = ddpm_posterior(sched, x0, x_t, t)
    mean, log_var, _ = ddpm_model_gaussian(sched, x_t, t, eps, v)
    kl = normal_kl(true_mean, true_log_var, mean, log_var).mean(dim=(1, 2, 3)) / math.log(2.0)
    nll = discretized_gaussian_nll(x0, mean, 0.5 * log_var).mean(dim=(1, 2, 3)) / math.log(2.0)
    return torch.where(t == 0, nll, kl)


def ddpm_loss(model, x, y, zs, t=None, noise=None):
    """DiT's objective in place of eq. (3): (hybrid loss (B,), alignment loss scalar), with the
    same arguments as `repa_loss`; combine them with `total_loss` (eq. 9).

    The improved DDPM's hybrid loss: mse = ||eps - eps_theta||^2 (mean over C, H, W) trains the
    mean, and the variational bound trains the variance value v through a stop-gradient on eps, so
    that the bound does not pull on the mean. t ~ U{0, .., 999} is drawn before the noise, as in
    DiT's train.py; pass t (int64) and noise to pin them."""
    sched = ddpm_schedule(DDPM_STEPS, x.device)
    t = torch.randint(0, DDPM_STEPS, (x.shape[0],), device=x.device) if t is None else t
    noise = torch.randn_like(x) if noise is None else noise
    x_t = ddpm_noised(sched, x, t, noise)
    out, zs_pred = model(x_t, t, y)
    eps, v = out.float().chunk(2, dim=1)
    mse = (noise - eps).square().mean(dim=(1, 2, 3))
    return mse + ddpm_vb(sched, x, x_t, t, eps.detach(), v), alignment_loss(zs_pred, zs)


def total_loss(denoising, align, proj_coeff=0.5):
    """Eq. (9): the batch mean of the denoising loss (SiT's v-loss or DiT's hybrid loss) plus
    lambda times the alignment loss. lambda = 0.5 is the paper's (its ablation: 0.25 / 0.5 / 0.75
    / 1.0 give FID 8.6 / 7.9 / 7.8 / 7.8 for XL/2 at 400K steps); lambda = 0 is the vanilla SiT
    (or DiT)."""
    return denoising.mean() + proj_coeff * align


#################################################################################
#             Frozen encoders: the targets y_* = f(x_*) of eq. (8)               #
#################################################################################
# An encoder entry is "family-vit-size", as in the official --enc-type, optionally with
# "=/path/to/weights" for a local file. Weights otherwise come from timm (the Hugging Face cache,
# downloaded on first use where there is internet). Every family below is a timm ViT whose
# weights are the very tensors the official code loads (checked against its classes).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
_VIT = {"s": "small", "b": "base", "l": "large", "g": "giant", "h": "huge"}


def mocov3_state_dict(ckpt):
    """The official MoCo v3 file (`ckpt['state_dict']`, keys `module.base_encoder.*`) -> timm ViT
    keys, as REPA's fix_mocov3_state_dict: keep the base encoder; fix the misnamed norms and MLPs
    of blocks 13 and 14 in the ViT-L file; drop the projection head. The 14 x 14 position
    embedding is resampled to the model's grid by timm's loader afterwards, as the official does."""
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
    mean: tuple             # per-channel normalisation after x / 255
    std: tuple
    final_norm: bool = True  # the patch tokens after the final norm; False: the last block's
    local: bool = False     # the official reads a local file and timm has no weights: NAME=PATH
    convert: object = None  # that file's layout -> timm keys, where timm cannot read it itself
    kwargs: tuple = ()      # (size letter, timm kwargs) where one size differs from timm's model


ENCODER_FAMILIES = {
    # the official default: 224 px, a 16 x 16 grid of patch-14 tokens for 256 SiT tokens; the
    # features are DINOv2's x_norm_patchtokens (final norm, CLS and registers dropped)
    "dinov2": EncoderFamily("vit_{}_patch14_dinov2.lvd142m", "sblg", 224, IMAGENET_MEAN,
                            IMAGENET_STD),
    "dinov2reg": EncoderFamily("vit_{}_patch14_reg4_dinov2.lvd142m", "sblg", 224, IMAGENET_MEAN,
                               IMAGENET_STD),
    # DINOv3 (not in the paper): patch 16 and rotary positions, so 256 px with no resize
    "dinov3": EncoderFamily("vit_{}_patch16_dinov3.lvd1689m", "sbl", 256, IMAGENET_MEAN,
                            IMAGENET_STD),
    # the official takes the transformer's output before ln_post and the projection, and the
    # original QuickGELU (timm's plain CLIP-L uses GELU: a different network on these weights)
    "clip": EncoderFamily("vit_large_patch14_clip_quickgelu_224.openai", "l", 224, CLIP_MEAN,
                          CLIP_STD, final_norm=False),
    # MAE at 256 px (16 x 16 patches of 16): the official forward stops after the last block
    # and never applies the final norm
    "mae": EncoderFamily("vit_large_patch16_224.mae", "l", 256, IMAGENET_MEAN, IMAGENET_STD,
                         final_norm=False),
    # DINOv1 at 256 px; the official file models/dinov1.py is missing from its repository, so
    # which tokens it returned cannot be read: we take the normed patch tokens, as for MoCo v3
    "dinov1": EncoderFamily("vit_base_patch16_224.dino", "b", 256, IMAGENET_MEAN, IMAGENET_STD),
    # MoCo v3: no timm weights; the official checkpoint file, whose ViT-S has 12 heads (timm's 6)
    "mocov3": EncoderFamily("vit_{}_patch16_224", "sbl", 256, IMAGENET_MEAN, IMAGENET_STD,
                            local=True, convert=mocov3_state_dict,
                            kwargs=(("s", {"num_heads": 12}),)),
    # I-JEPA ViT-H/14: no CLS token, all 256 tokens after the final norm; timm reads the
    # official file (its online `encoder`, `module.` prefixes) as it is
    "jepa": EncoderFamily("vit_huge_patch14_gap_224.in1k_ijepa", "h", 224, IMAGENET_MEAN,
                          IMAGENET_STD, local=True),
}


@dataclass
class Encoder:
    name: str           # e.g. "dinov2-vit-b"
    model: nn.Module    # frozen, in eval mode
    size: int           # input pixels: images are resized to size x size
    patch: int          # pixels per patch side
    mean: torch.Tensor  # (1, 3, 1, 1) on the encoder's device: no host-to-device copy per step
    std: torch.Tensor
    dim: int            # feature width D_k
    prefix: int         # leading tokens to drop (CLS, registers)
    final_norm: bool = True  # features after the final norm (forward_features) or before it

    @property
    def tokens(self):
        """Patch tokens per image (without CLS and registers): 256 for a 16 x 16 grid."""
        return (self.size // self.patch) ** 2


def parse_encoder(entry):
    """'dinov2-vit-b' or 'dinov2-vit-b=/path/weights' -> (name, family, size letter, path), with
    one clear error for a name we do not know. It loads nothing, so flags can be checked first."""
    name, _, path = entry.strip().partition("=")
    family, arch, size = (name.lower().split("-") + ["", "", ""])[:3]
    known = family in ENCODER_FAMILIES and size in ENCODER_FAMILIES[family].sizes
    if not known or arch != "vit":
        names = [f"{f}-vit-{s}" for f, spec in ENCODER_FAMILIES.items() for s in spec.sizes]
        raise UserError(f"unknown encoder {name!r}: choose from {', '.join(names)}")
    return name, family, size, path


def _hub_reachable():
    """False when offline (HF_HUB_OFFLINE, or no DNS): checked first, because the hub client
    would otherwise retry for a minute before failing."""
    import socket
    from urllib.parse import urlparse
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return False
    try:
        socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname, 443)
        return True
    except OSError:
        return False


def _hub_weights(repo_id, filename="model.safetensors"):
    """The weight file from the Hugging Face cache, or downloaded when the hub can be reached."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    cached = try_to_load_from_cache(repo_id, filename)
    if isinstance(cached, str):
        return cached
    return hf_hub_download(repo_id, filename) if _hub_reachable() else None


def _channels(mean, std, device):
    return [torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (mean, std)]


def _weights_source(name, family, timm_name, path):
    """timm's pretrained_cfg_overlay for an encoder's weights: the local file, its converted
    state dict, or the Hugging Face cache; one clear error when there are none."""
    import timm
    if not path and family.local:
        raise UserError(f"encoder {name} has no timm weights: the official code reads its "
                        f"original checkpoint file from disk; pass that file as {name}=PATH")
    if not path:
        path = _hub_weights(timm.models.get_pretrained_cfg(timm_name).hf_hub_id)
        if not path:
            raise UserError(
                f"cannot load encoder {name}: its weights ({timm_name}) are not in the Hugging "
                f"Face cache and cannot be downloaded here; on a machine with internet run "
                f"python -c \"import timm; timm.create_model('{timm_name}', pretrained=True)\" "
                f"and copy ~/.cache/huggingface, or pass a file: {name}=PATH")
    if not os.path.isfile(path):
        raise UserError(f"cannot load encoder {name}: weight file {path} not found")
    if family.convert is None:
        return dict(file=path)
    try:
        return dict(state_dict=family.convert(torch.load(path, map_location="cpu",
                                                         weights_only=True)))
    except Exception as e:
        raise UserError(f"cannot load encoder {name} from {path}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else 'not its layout'}") from None


def load_encoders(spec="dinov2-vit-b", resolution=256, device="cpu", **timm_kwargs):
    """Frozen encoders for a comma-separated spec such as "dinov2-vit-b,clip-vit-l".

    Each entry may end in "=PATH" to read the weights from a local file (timm's layout or the
    original one). `timm_kwargs` go to timm.create_model (the tests pass pretrained=False and tiny
    widths to build the same classes with random weights)."""
    import timm
    if resolution not in (256, 512):
        raise UserError(f"resolution must be 256 or 512, got {resolution}")
    encoders = []
    for entry in spec.split(","):
        name, family, size, path = parse_encoder(entry)
        fam = ENCODER_FAMILIES[family]
        timm_name = fam.timm.format(_VIT[size])
        pixels = fam.pixels * (resolution // 256)  # 512 px: a 32 x 32 grid (1024 tokens)
        kwargs = {"pretrained": True, "img_size": pixels, "num_classes": 0,
                  **dict(fam.kwargs).get(size, {}), **timm_kwargs}
        if kwargs["pretrained"]:
            kwargs["pretrained_cfg_overlay"] = _weights_source(name, fam, timm_name, path)
        try:
            # timm resamples the stored position embedding to the new grid (bicubic, antialiased),
            # exactly as the official code does after loading, and loads strictly
            model = timm.create_model(timm_name, **kwargs)
        except Exception as e:  # a corrupt file, or weights of another architecture
            raise UserError(f"cannot load encoder {name} from {path or 'the cache'}: "
                            f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
        model = model.to(device).eval().requires_grad_(False)
        encoders.append(Encoder(name, model, pixels, model.patch_embed.patch_size[0],
                                *_channels(fam.mean, fam.std, device), model.embed_dim,
                                model.num_prefix_tokens, fam.final_norm))
    return encoders


@torch.no_grad()
def encode(encoders, images):
    """uint8 images (B, 3, H, W) -> a list of patch features (B, N, D_k), one per encoder.

    Preprocessing as in the official code: x / 255, normalise, bicubic resize. (The official
    resizes CLIP's input before normalising; the order does not matter, since bicubic weights sum
    to 1 and the normalisation is affine per channel.) The features are the patch tokens, with
    the CLS and register tokens dropped: after the final norm (DINOv2's x_norm_patchtokens), or
    the last block's output where the official skips that norm (MAE, CLIP)."""
    out = []
    for enc in encoders:
        x = (images.float() / 255 - enc.mean) / enc.std
        if x.shape[-1] != enc.size:
            x = F.interpolate(x, size=(enc.size, enc.size), mode="bicubic")
        if enc.final_norm:
            out.append(enc.model.forward_features(x)[:, enc.prefix:])
        else:  # timm drops the prefix tokens of intermediates itself
            out.append(enc.model.forward_intermediates(x, indices=1, norm=False, output_fmt="NLC",
                                                       intermediates_only=True)[-1])
    return out


#################################################################################
#          Measuring alignment: CKNNA, mutual k-NN, linear probes (fig. 2)       #
#################################################################################
# The paper's sec. 3 measures the gap between a SiT's hidden states and a pretrained encoder's
# representation in two ways: CKNNA (Huh et al. 2024, "The Platonic Representation Hypothesis"),
# a kernel alignment restricted to each sample's nearest neighbours, and linear probing. The
# definitions are those of the PRH code (minyoungg/platonic-rep, metrics.py), whose numbers the
# tests reproduce. As in the PRH pipeline (measure_alignment.compute_score), the caller
# L2-normalises every feature vector first (F.normalize(x, dim=-1)); these functions do not, so
# that they give the PRH numbers for whatever they are given.
CKNNA_EPS = 1e-6  # the PRH code adds it to CKNNA's denominator


def knn_mask(kernel, topk):
    """(N, N) 0/1 mask of each row's `topk` largest entries of a similarity matrix, the diagonal
    excluded: row i marks i's k nearest neighbours. j may be i's neighbour without i being j's,
    so the mask is not symmetric. (The PRH mutual_knn sets the diagonal to -1e8 rather than
    -inf and ranks with argsort: the same, unless a similarity lies below -1e8 or two tie.)"""
    ranked = kernel.clone().fill_diagonal_(float("-inf"))
    return torch.zeros_like(kernel).scatter_(1, ranked.topk(topk, dim=1).indices, 1)


def hsic_unbiased(K, L):
    """The unbiased HSIC estimator (Song et al. 2012, eq. 5) of two (N, N) kernels. With K~, L~
    the kernels with zeroed diagonals:
        HSIC = [tr(K~ L~) + (1'K~1)(1'L~1) / ((N-1)(N-2)) - 2/(N-2) 1'K~L~1] / (N(N-3)).
    tr(K~ L~) = sum(K~ * L~^T) and 1'K~L~1 = (1'K~)(L~1): no N^3 matrix product. The masked
    kernels of CKNNA are not symmetric, so the transpose matters."""
    n = K.shape[0]
    K, L = K.clone().fill_diagonal_(0), L.clone().fill_diagonal_(0)
    return ((K * L.T).sum() + K.sum() * L.sum() / ((n - 1) * (n - 2))
            - 2 * (K.sum(0) @ L.sum(1)) / (n - 2)) / (n * (n - 3))


def cknna(a, b, topk=10):
    """CKNNA between features a (N, D_a) and b (N, D_b) of the same N samples (a float).

    CKA with linear kernels K = a a^T and L = b b^T, each kept only on the pairs (i, j) where j
    is among i's k nearest neighbours in BOTH spaces (M = M_a * M_b, self excluded):
        CKNNA = HSIC(M K, M L) / (sqrt(HSIC(M_a K, M_a K) HSIC(M_b L, M_b L)) + 1e-6),
    each self-term with its own space's neighbours, HSIC unbiased. It is near 0 for unrelated
    features, and HSIC / (HSIC + 1e-6) for a rotated copy: the 1e-6 of the PRH code is visible
    when HSIC is small (L2-normalised features, few samples). Memory: a few (N, N) matrices,
    400 MB each for N = 10,000 in float32."""
    if not 2 <= topk < a.shape[0]:
        raise UserError(f"CKNNA needs 2 <= topk < N, got topk {topk} for N = {a.shape[0]}")
    K, L = a @ a.T, b @ b.T
    mask_a, mask_b = knn_mask(K, topk), knn_mask(L, topk)
    both = mask_a * mask_b
    kl = hsic_unbiased(both * K, both * L)
    kk, ll = hsic_unbiased(mask_a * K, mask_a * K), hsic_unbiased(mask_b * L, mask_b * L)
    return (kl / (torch.sqrt(kk * ll) + CKNNA_EPS)).item()


def mutual_knn(a, b, topk=10):
    """Mutual k-NN between features a (N, D_a) and b (N, D_b): the mean over samples i of
    |kNN_a(i) & kNN_b(i)| / k, self excluded (the PRH metric that CKNNA refines)."""
    return ((knn_mask(a @ a.T, topk) * knn_mask(b @ b.T, topk)).sum(1) / topk).mean().item()


def fit(params, loss, steps, lr, weight_decay=0.05, betas=(0.9, 0.999), warmup=0):
    """Minimise loss(step) in `steps` steps of AdamW, the learning rate warmed up linearly over
    `warmup` steps and then decayed to 0 on a half cosine: the small training loops of the linear
    probe (and of networks that tools train for their own targets)."""
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
    """Top-1 accuracy on (test_x, test_y) of a linear classifier trained on frozen features
    (N, D) with labels (N,): the DAE / MAE linear probe that the paper cites. A BatchNorm without
    affine parameters (it standardises the features, so their scale does not matter), then a
    Linear layer from N(0, 0.01^2) with zero bias; cross-entropy; the learning rate decaying from
    `lr` to 0 on a half cosine, per iteration; large batches (at most N). Adam (AdamW without
    decay), not MAE's LARS: with a few thousand features 90 epochs are 90 iterations, too few for
    LARS to converge (README, Measuring alignment). BatchNorm keeps the exact average of its batch
    statistics (momentum None), not a running one, so that a short probe is evaluated with
    well-estimated statistics."""
    g = torch.Generator().manual_seed(seed)
    n, dim = train_x.shape
    batch = min(batch_size, n)
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6, momentum=None),
                         nn.Linear(dim, num_classes)).to(train_x.device)
    with torch.no_grad():
        head[1].weight.copy_(torch.randn(num_classes, dim, generator=g) * 0.01)
        head[1].bias.zero_()
    # each epoch a new order, its last partial batch dropped (as in MAE): rows[i], iteration i's
    rows = torch.cat([torch.randperm(n, generator=g)[:n // batch * batch].view(-1, batch)
                      for _ in range(epochs)]).to(train_x.device)
    fit(head.parameters(), lambda i: F.cross_entropy(head(train_x[rows[i]].float()),
                                                     train_y[rows[i]]), len(rows), lr, 0)
    head.eval()
    with torch.no_grad():
        return (head(test_x.float()).argmax(1) == test_y).float().mean().item()


def noised(model, x, t, noise, path_type="linear"):
    """(x_t, the model's time input) for clean latents x at times t (B,) in [0, 1], t = 0 data:
    the state the model sees at that noise level. SiT: eq. (1), and t itself. DiT: its DDPM
    chain at timestep k = min(int(1000 t), 999), and k."""
    if model.learn_sigma:
        k = (t * DDPM_STEPS).long().clamp(max=DDPM_STEPS - 1)
        return ddpm_noised(ddpm_schedule(DDPM_STEPS, x.device), x, k, noise), k
    alpha, sigma, _, _ = interpolant(t.to(x.dtype).view(-1, 1, 1, 1), path_type)
    return alpha * x + sigma * noise, t.to(x.dtype)


def null_labels(model, n, device):
    """Labels that say nothing about the image, so that probed features do not see its class
    (official issue #32): the null label where the model has one (trained with label dropout),
    else label 0 for every image, a constant shift of the condition."""
    has_null = model.y_embedder.embedding_table.num_embeddings > model.num_classes
    return torch.full((n,), model.num_classes if has_null else 0, device=device)


@torch.no_grad()
def block_features(model, x, t, noise, path_type="linear"):
    """The hidden state after every block, averaged over tokens (as the paper's appendix does for
    CKNNA): (B, depth, D) in float32, for clean latents x (B, C, H, W) noised to times t (B,),
    with no class label."""
    x_t, t_in = noised(model, x, t, noise, path_type)
    hidden = model(x_t, t_in, null_labels(model, len(x), x.device), return_hidden=True)[-1]
    return torch.stack([h.float().mean(1) for h in hidden], dim=1)


#################################################################################################
#                                                                                               #
#   PART II. DATA: the SD-VAE, images, and the shards of latents in a resumable order           #
#                                                                                               #
#################################################################################################

#################################################################################
#        Processes and files: what data preparation and training share          #
#################################################################################
# torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without it we are rank 0 of 1 and use no process
# group at all. NCCL on GPUs, gloo on CPUs: the rest of the code does not care which.

def setup_distributed():
    """(rank, world, device), initialising the process group once when run under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        # an hour, not NCCL's 10 minutes: ranks of tools/prepare.py may wait that long for another
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=1))
    rank = int(os.environ.get("RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return rank, world, device


def barrier():
    if dist.is_initialized():
        dist.barrier()


def print0(*args, **kwargs):
    """Logs come from rank 0: 8 or 64 copies of a line help nobody."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def atomic_write(path, write, mode="wb"):
    """write(f) into a temporary file, fsync, then rename over `path`: a crash (even SIGKILL)
    mid-write leaves the previous file of that name intact, and no reader sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


#################################################################################
#                  The SD-VAE, and reading ImageNet-style folders               #
#################################################################################

def _hub_folder(repo_id):
    """A model folder (config and weights) from the cache, or downloaded when reachable."""
    from huggingface_hub import snapshot_download
    patterns = ["config.json", "*.safetensors"]
    try:
        return snapshot_download(repo_id, local_files_only=True, allow_patterns=patterns)
    except Exception:
        return snapshot_download(repo_id, allow_patterns=patterns) if _hub_reachable() else None


def load_vae(name="stabilityai/sd-vae-ft-mse", device="cpu"):
    """The SD-VAE (diffusers AutoencoderKL) from a local folder or the Hugging Face cache.
    Latents are made with ft-mse (as in the official preprocessing); samples are decoded with
    ft-ema (sample.py). Missing weights are one clear line, not a minute of retries."""
    from diffusers.models import AutoencoderKL
    path = name if os.path.isdir(name) else _hub_folder(name)
    try:
        if path is None:
            raise FileNotFoundError(name)
        vae = AutoencoderKL.from_pretrained(path, low_cpu_mem_usage=False)
    except Exception as e:
        hint = (f"the folder {name} is not a diffusers AutoencoderKL" if os.path.isdir(name) else
                f"there is no folder {name}" if name.startswith(("/", ".", "~")) else
                f"it is not in the Hugging Face cache and cannot be downloaded here; on a machine "
                f"with internet run python -c \"from diffusers import AutoencoderKL; "
                f"AutoencoderKL.from_pretrained('{name}')\" and copy ~/.cache/huggingface, or "
                f"pass a local folder")
        raise UserError(f"cannot load the VAE {name}: {hint} ({type(e).__name__})") from None
    return vae.to(device).eval().requires_grad_(False)


# The prepared dataset (tools/prepare.py writes it; its docstring gives the layout) is a folder of
# shards, each a folder of three .npy arrays that training memory-maps: images (N, 3, R, R) uint8,
# moments (N, 8, R/8, R/8) float32 (the VAE posterior mean and std), labels (N,) int64.

def check_recipe(out, recipe):
    """A preparation resumes only as it began: shards made from another source or with another
    size, resolution or VAE (or by its --bench-data) are refused, never mixed with new ones."""
    path = os.path.join(out, "prepare.json")
    if os.path.isfile(path):
        stored = json.load(open(path))
        changed = [f"{k} {stored.get(k)} -> {v}" for k, v in recipe.items() if stored.get(k) != v]
        if changed:
            raise UserError(f"{out} was prepared otherwise ({'; '.join(changed)}): use another "
                            f"--data-dir, or the flags it was begun with")
    elif os.path.isdir(out) and any(n.startswith("shard-") or n == "manifest.json"
                                    for n in os.listdir(out)):
        raise UserError(f"{out} holds shards that no tools/prepare.py began (no prepare.json): "
                        f"use an empty --data-dir")


#################################################################################
#               Reading: memory-mapped shards in a seeded, resumable order       #
#################################################################################
# Every dataset returns whole batches (images uint8 (B, 3, R, R), moments float32 (B, 2C, r, r),
# labels int64 (B,)) from __getitems__, with `latent_scale`, `resolution` and `num_classes`.

class ShardDataset(torch.utils.data.Dataset):
    """The prepared shards, memory-mapped: no decoding at training time, only copies from the
    page cache."""
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
    """--bench: random uint8 images and latent moments of the real shapes, made on the fly."""
    latent_scale = LATENT_SCALE
    num_classes = NUM_CLASSES

    def __init__(self, resolution, n=1 << 20):
        self.resolution, self.n = resolution, n

    def __len__(self):
        return self.n

    def __getitems__(self, indices):
        b, r = len(indices), self.resolution
        latent = r // VAE_DOWNSAMPLE
        return (torch.randint(0, 256, (b, 3, r, r), dtype=torch.uint8),
                torch.randn(b, 8, latent, latent).abs_(), torch.randint(0, self.num_classes, (b,)))


class ResumableBatches(torch.utils.data.Sampler):
    """An endless, seeded stream of this rank's micro-batches that can start anywhere.

    Epoch e is a permutation drawn from seed + e, cut into global batches (one per optimiser
    step). A global batch has world x accum slots of `batch` samples; rank r's micro-batch m takes
    slot r * accum + m. So 2 ranks x 1 micro-batch and 1 rank x 2 micro-batches see the same
    samples in the same slots, and the number of global batches consumed (`start`) is all that a
    checkpoint needs to continue the stream exactly."""

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


def already_collated(batch):
    """collate_fn: __getitems__ already stacks the batch."""
    return batch


def ignore_signals(worker_id):
    """DataLoader workers ignore SIGTERM/SIGINT: a scheduler signals the whole process group, and
    a worker that died of it would crash the main process before it can save."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def loader(dataset, sampler, workers=4):
    """(images, moments, labels) batches; workers copy from the memory map in parallel and pin
    the memory so that the copy to the GPU overlaps compute."""
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=already_collated, num_workers=workers,
        pin_memory=torch.cuda.is_available(), worker_init_fn=ignore_signals,
        prefetch_factor=4 if workers else None)


#################################################################################################
#                                                                                               #
#   PART III. TRAINING: the config, one step, checkpoints, the loop, the command line           #
#                                                                                               #
#################################################################################################

@dataclass
class Config:
    """Every default lives here; the command-line flags are generated from these fields (see
    `parse_args`). Defaults are the paper's / the official train.py's."""
    # what to run (the default is training)
    bench: int = 0              # time this many steps on random data (no dataset, random encoders)
    # model and method
    model: str = "XL/2"         # T|S|B|L|XL / 2|4|8, or SiT-XL/2; DiT-XL/2 etc.: DiT (DDPM)
    encoder_depth: int = 0      # block whose output is aligned (eq. 8); 0 = the size table's
    enc_type: str = "dinov2-vit-b"  # frozen encoder(s), comma-separated; NAME=PATH for a file
    proj_coeff: float = 0.5     # lambda of eq. (9); 0 trains the vanilla SiT
    projector_dim: int = PROJECTOR_DIM  # hidden width of the projector h_phi
    path_type: str = "linear"   # linear | cosine (SiT)
    weighting: str = "uniform"  # uniform | lognormal (SiT)
    cfg_prob: float = CLASS_DROPOUT  # label dropout, for classifier-free guidance
    qk_norm: bool = False       # LayerNorm on queries and keys
    # data
    data_dir: str = "data/imagenet256"  # prepared shards (written by tools/prepare.py)
    resolution: int = 256       # 256 | 512, for --bench (training reads the shards')
    num_workers: int = 4        # data loader processes per GPU
    # optimisation
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
    precision: str = "auto"     # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
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


# What each numeric flag may be: checked before any slow or I/O work, one line per problem
LIMITS = {
    **{k: (lambda v: v >= 1, "at least 1") for k in (
        "batch_size", "grad_accum", "max_steps", "log_every", "ckpt_every", "latest_every",
        "projector_dim")},
    **{k: (lambda v: v >= 0, "at least 0") for k in (
        "bench", "encoder_depth", "num_workers", "seed", "sample_every",
        "weight_decay", "proj_coeff", "align_every")},
    **{k: (lambda v: v > 0, "positive") for k in ("lr", "adam_eps", "max_grad_norm")},
    **{k: (lambda v: 0 <= v < 1, "in [0, 1)") for k in ("adam_beta1", "adam_beta2", "cfg_prob")},
    "ema_decay": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "knn": (lambda v: v >= 2, "at least 2"),
}
CHOICES = dict(path_type=PATH_TYPES, weighting=WEIGHTINGS, precision=("auto", "bf16", "fp32"))


def check_values(cfg, limits, choices=(), images=None):
    """Each value within its rule ({field: (ok, rule)}) and its choices ({field: allowed}): one
    line that names the first that is not. `images`: the field that counts the images of CKNNA,
    which ranks k neighbours besides the image itself, and whose unbiased HSIC needs N > 3."""
    for name, (ok, rule) in limits.items():
        value = getattr(cfg, name)
        if not (math.isfinite(value) and ok(value)):
            raise UserError(f"--{name.replace('_', '-')} must be {rule}, got {value}")
    for name, allowed in dict(choices).items():
        if getattr(cfg, name) not in allowed:
            raise UserError(f"--{name.replace('_', '-')} must be one of "
                            f"{', '.join(map(str, allowed))}, got {getattr(cfg, name)!r}")
    if images and getattr(cfg, images) <= cfg.knn + 3:
        raise UserError(f"--{images.replace('_', '-')} must be more than --knn + 3 = "
                        f"{cfg.knn + 3}, got {getattr(cfg, images)}")


def check_config(cfg, world=1, named_encoders=True):
    """Every name and value, before anything is read or built: one line that names the bad one.
    named_encoders False: a tool supplies the encoders (train's `encoders`), not --enc-type."""
    check_values(cfg, LIMITS, CHOICES, "align_images" if cfg.align_every else None)
    if cfg.resolution not in (256, 512):  # the encoders' grids are set for these two
        raise UserError(f"--resolution must be 256 or 512, got {cfg.resolution}")
    size = size_config(cfg.model)
    if size.get("learn_sigma") and (cfg.path_type, cfg.weighting) != ("linear", "uniform"):
        raise UserError(f"--path-type and --weighting are SiT's: {cfg.model} trains on its DDPM "
                        f"chain; drop them")
    if cfg.encoder_depth > size["depth"]:
        raise UserError(f"--encoder-depth must be at most {size['depth']} for {cfg.model}, "
                        f"got {cfg.encoder_depth}")
    if named_encoders:
        for entry in cfg.enc_type.split(","):
            parse_encoder(entry)
        # 224 px DINOv2/CLIP (patch 14) and 256 px DINOv3 (patch 16) give a (R/16)^2 grid
        tokens = (cfg.resolution // VAE_DOWNSAMPLE // size["patch_size"]) ** 2
        if tokens != (cfg.resolution // 16) ** 2:
            raise UserError(f"REPA pairs each SiT token with an encoder patch, but {cfg.model} "
                            f"has {tokens} tokens and the encoder {(cfg.resolution // 16) ** 2} "
                            f"patches: use patch size 2")
    if cfg.batch_size % (world * cfg.grad_accum):
        raise UserError(f"--batch-size {cfg.batch_size} is not divisible by {world} processes x "
                        f"{cfg.grad_accum} accumulation steps")


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, as one fused op per parameter group."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


def train_flops_per_image(model, encoders):
    """FLOPs to train on one image, for MFU. A Linear applied to T tokens costs 2 * params * T
    FLOPs forward and twice that backward; attention adds 4 * T^2 * D per block forward (QK^T and
    AV). So the SiT costs 3 * (2 * P_token * T + 4 * depth * T^2 * D), where P_token counts the
    weights applied per token (everything but the per-sample adaLN and embedders, whose cost is
    negligible). The frozen encoders run forward only."""
    T, D = model.x_embedder.num_patches, model.pos_embed.shape[-1]
    per_token = sum(p.numel() for n, p in model.named_parameters()
                    if "adaLN" not in n and not n.startswith(("t_embedder", "y_embedder", "pos")))
    flops = 3 * (2 * per_token * T + 4 * len(model.blocks) * T * T * D)
    for enc in encoders:
        tokens = enc.tokens + enc.prefix
        params = sum(p.numel() for p in enc.model.parameters())
        depth = len(getattr(enc.model, "blocks", []))
        flops += 2 * params * tokens + 4 * depth * tokens * tokens * enc.dim
    return flops


def peak_flops(device):
    """Dense bf16 tensor-core peak of the GPU, or None where we do not know it."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    for key, peak in [("H100", 989e12), ("H200", 989e12), ("H800", 989e12), ("A100", 312e12),
                      ("L40S", 362e12), ("4090", 165e12), ("B200", 2250e12)]:
        if key in name:
            return peak
    return None


class StopSignal:
    """SIGTERM (preemption) and SIGINT (Ctrl-C) set a flag; the loop saves and exits cleanly at
    the end of the step. A second signal acts as usual (a hung run can still be killed). Ranks
    agree through a CPU (gloo) all-reduce, which does not wait for the GPU, so checking every step
    costs no host-device sync."""

    def __enter__(self):
        self.flag = False
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self.previous = {sig: signal.signal(sig, self.set) for sig in (signal.SIGTERM,
                                                                         signal.SIGINT)}
        return self

    def set(self, sig, frame):
        self.flag = True
        signal.signal(sig, self.previous[sig])

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def __bool__(self):
        if self.group is None:
            return self.flag
        flag = torch.tensor([float(self.flag)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())


def git_revision():
    try:
        import subprocess
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=os.path.dirname(os.path.abspath(__file__)),
                              timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


#################################################################################
#                   A run: its model, optimiser, data and one step              #
#################################################################################

@dataclass
class Run:
    """What one training run holds. The loop and the functions below read and advance it."""
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
    step: int = 0               # optimiser steps done
    first_step: int = 0         # the step this process started (or resumed) at
    finite: torch.Tensor = None  # on the device: no NaN/inf loss since this process started

    @property
    def ckpt_dir(self):
        return os.path.join(self.dir, "checkpoints")


def build(cfg, device, data=None, encoders=None):
    """(dataset, encoders, model_kwargs) for a run: a tool's own (train's `data` and `encoders`),
    random data for --bench, or the prepared shards with the pretrained encoders."""
    if data:
        dataset = data()
    else:
        dataset = RandomData(cfg.resolution) if cfg.bench else ShardDataset(cfg.data_dir)
    if encoders:
        encoders = encoders(device)
    else:  # --bench: the same encoder classes with random weights (the cost is the same)
        encoders = load_encoders(cfg.enc_type, dataset.resolution, device,
                                 **({"pretrained": False} if cfg.bench else {}))
    pixels = dataset.latent_scale == 1  # scale 1: the 'moments' are pixels in [-1, 1], no VAE
    model_kwargs = dict(size_config(cfg.model), in_channels=3 if pixels else 4,
                        input_size=dataset.resolution // (1 if pixels else VAE_DOWNSAMPLE),
                        num_classes=dataset.num_classes, projector_dim=cfg.projector_dim,
                        class_dropout_prob=cfg.cfg_prob, qk_norm=cfg.qk_norm,
                        z_dims=[e.dim for e in encoders])
    if cfg.encoder_depth:
        model_kwargs["encoder_depth"] = cfg.encoder_depth
    tokens = (model_kwargs["input_size"] // model_kwargs["patch_size"]) ** 2
    for enc in encoders:  # named encoders were checked by check_config; a tool's are checked here
        if enc.tokens != tokens:
            raise UserError(f"REPA pairs each SiT token with an encoder patch, but {cfg.model} "
                            f"has {tokens} tokens and {enc.name} {enc.tokens} patches")
    return dataset, encoders, model_kwargs


def start_run(cfg, data=None, encoders=None):
    """Processes, precision, data, encoders, the model, its EMA and the optimiser (`data` and
    `encoders` as in train)."""
    rank, world, device = setup_distributed()
    check_config(cfg, world, named_encoders=encoders is None)
    cuda = device.type == "cuda"
    precision = ("bf16" if cuda else "fp32") if cfg.precision == "auto" else cfg.precision
    # TF32 for the fp32 matmuls autocast leaves (and the optimiser's); off when fp32 is asked for
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision != "fp32"
    dataset, encoders, model_kwargs = build(cfg, device, data, encoders)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and in every run
    model = SiT(**model_kwargs).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()  # starts equal to the model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                            eps=cfg.adam_eps, weight_decay=cfg.weight_decay, fused=cuda)
    net = torch.compile(model) if cfg.compile else model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if cuda else None)
    micro = cfg.batch_size // (world * cfg.grad_accum)
    sampler = ResumableBatches(len(dataset), micro, rank, world, cfg.grad_accum, cfg.seed)
    return Run(cfg, rank, world, device, precision, dataset, encoders, model_kwargs, model, net,
               ema, opt, sampler, os.path.join(cfg.results_dir, cfg.exp_name),
               finite=torch.ones((), dtype=torch.bool, device=device))


def step_seed(seed, step, slot):
    """The RNG seed of one micro-batch: a function of (seed, step, slot) only, so a resume and
    DDP need no saved RNG state, and since the slot is the data's (rank * accum + micro-batch),
    2 ranks x 1 micro-batch draw exactly what 1 rank x 2 micro-batches draw."""
    return seed * 1_000_003 + step * 4_096 + slot


def train_step(run, micro_batches):
    """One optimisation step over `grad_accum` micro-batches: encode, sample the latents, the
    loss of eq. (9), backward; clip; AdamW; EMA. Returns (loss, alignment, grad-norm) as one
    device tensor, without waiting for the GPU."""
    cfg, accum = run.cfg, len(micro_batches)
    autocast = torch.autocast(run.device.type, dtype=torch.bfloat16,
                              enabled=run.precision == "bf16")
    stats = torch.zeros(3, device=run.device)
    for m, batch in enumerate(micro_batches):
        torch.manual_seed(step_seed(cfg.seed, run.step, run.rank * accum + m))
        images, moments, labels = (t.to(run.device, non_blocking=True) for t in batch)
        with autocast:
            zs = encode(run.encoders, images)  # y_* of eq. (8), frozen, no grad
        mean, std = moments.chunk(2, dim=1)  # sample the VAE posterior, then scale
        x = (mean + std * torch.randn_like(mean)) * run.dataset.latent_scale
        # DDP all-reduces the gradients on the last micro-batch only
        sync = m == accum - 1 or run.world == 1
        with contextlib.nullcontext() if sync else run.net.no_sync(), autocast:
            if run.model.learn_sigma:  # DiT: the improved DDPM's hybrid loss
                denoising, align = ddpm_loss(run.net, x, labels, zs)
            else:
                denoising, align = repa_loss(run.net, x, labels, zs, cfg.path_type, cfg.weighting)
            loss = total_loss(denoising, align, cfg.proj_coeff)
        (loss / accum).backward()
        stats[:2] += torch.stack([denoising.mean(), align]).detach() / accum
        run.finite &= torch.isfinite(loss.detach())
    # the norm before clipping is what is logged
    stats[2] = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.max_grad_norm)
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    update_ema(run.ema, run.model, cfg.ema_decay)
    run.step += 1
    return stats


#################################################################################
#            Checkpoints: one schema, written here, read here and by sample.py   #
#################################################################################
# {"model", "ema", "opt", "args", "steps"} as the official checkpoints (`args` a plain dict of the
# Config, so that torch.load(weights_only=True) needs no allow-list), plus "model_kwargs" (the
# exact SiT(...) call), "data" (where the data order continues) and, where the data set names its
# classes, "class_names".
METHOD_FIELDS = ("model", "enc_type", "encoder_depth", "projector_dim", "proj_coeff",
                 "path_type", "weighting", "cfg_prob", "qk_norm", "batch_size", "seed")


def write_checkpoint(path, state):
    """torch.save through atomic_write: a checkpoint is never left half-written."""
    atomic_write(path, lambda f: torch.save(state, f))


def save_checkpoint(run, name):
    """Write run.ckpt_dir/name atomically (rank 0), after checking on all ranks that no loss was
    ever non-finite: weights that have seen a NaN are never saved (one sync, only when saving)."""
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
                 "model_kwargs": run.model_kwargs,
                 "data": {"epoch": consumed // run.sampler.per_epoch,
                          "position": consumed % run.sampler.per_epoch}}
        if getattr(run.dataset, "class_names", None):  # sample.py labels its grids with them
            state["class_names"] = list(run.dataset.class_names)
        write_checkpoint(os.path.join(run.ckpt_dir, name), state)
    barrier()


def load_checkpoint(path):
    """Read a checkpoint file: ours, an official one (whose `args` is an argparse.Namespace, the
    one class we allow) or a plain state dict, with weights_only=True, so a checkpoint cannot run
    code. Memory-mapped: 8 ranks resuming XL/2 do not each read 11 GB of optimiser state at once.
    A file that is missing, cut short or not a checkpoint at all is one sentence that says so."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} not found")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive since torch 1.6
        if head.startswith(b"PK"):
            raise UserError(f"checkpoint {path} is truncated ({size:,} bytes, the end of the "
                            f"archive is missing): it was cut off while being written or copied")
        if not head.startswith(b"\x80"):  # the legacy format is a pickle
            raise UserError(f"{path} is not a PyTorch checkpoint (its {size:,} bytes are neither "
                            f"a torch.save archive nor a pickle)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True,
                              mmap=zipfile.is_zipfile(path))
    except Exception as e:  # of torch's long weights_only message, only the reason
        found = re.search(r"WeightsUnpickler error:\s*(.+?)(?: was not an allowed|\n|$)", str(e))
        reason = (found.group(1) if found else str(e).strip().splitlines()[0]).rstrip(". ")
        kind = ("holds objects that only running code could rebuild, which weights_only=True "
                "refuses: save plain state dicts" if reason.startswith("Unsupported global")
                else "is corrupt")
        raise UserError(f"checkpoint {path} {kind} ({type(e).__name__}: {reason})") from None


def newest_checkpoint(ckpt_dir):
    """The checkpoint of a folder with the most training steps (None if it has none): NNNNNNN.pt
    by its name, any other (latest.pt) by its content. Not by the files' times, which a copy may
    not keep; of equal steps, the numbered one."""
    steps = {}
    for name in sorted(os.listdir(ckpt_dir)) if os.path.isdir(ckpt_dir) else []:
        path = os.path.join(ckpt_dir, name)
        if name.endswith(".pt"):  # memory-mapped: reading `steps` does not read the weights
            steps[path] = int(name[:-3]) if name[:-3].isdigit() else \
                load_checkpoint(path).get("steps", -1)
    return max(steps, key=steps.get, default=None)


def checkpoint_in(path):
    """A checkpoint given as its file, as a run folder or as its checkpoints/ (the newest)."""
    if not os.path.isdir(path):
        return path
    sub = os.path.join(path, "checkpoints")
    found = newest_checkpoint(sub if os.path.isdir(sub) else path)
    if found is None:
        raise UserError(f"no checkpoint in {path} (a .pt file, a run folder or its checkpoints/)")
    return found


def resume_run(run):
    """Continue from the newest checkpoint of the run folder (or --resume PATH): weights, EMA,
    optimiser, step and data position. Rank 0 chooses the file and tells the others, so that on
    several nodes the ranks do not each pick what their own disk shows."""
    cfg = run.cfg
    path = newest = None  # the checkpoint to resume; the newest in the run folder
    if run.rank == 0 and not cfg.bench:
        if cfg.resume in ("auto", "none"):  # a PATH needs no look at the run folder
            newest = newest_checkpoint(run.ckpt_dir)
        path = newest if cfg.resume == "auto" else None if cfg.resume == "none" else \
            checkpoint_in(cfg.resume)
    if dist.is_initialized():
        box = [path, newest]
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
        stored = ckpt.get("args")
        if isinstance(stored, dict):  # ours; official checkpoints hold a Namespace
            changed = [f"{k} {stored[k]} -> {getattr(cfg, k)}" for k in METHOD_FIELDS
                       if k in stored and stored[k] != getattr(cfg, k)]
            if changed:
                raise UserError(f"{path} is another experiment ({', '.join(changed)}): " + (
                    "use another --exp-name" if cfg.resume == "auto" else
                    "resume it with the flags it was trained with"))
        load_sit_weights(run.model, ckpt["model"])
        load_sit_weights(run.ema, ckpt["ema"])
        run.opt.load_state_dict(ckpt["opt"])
        for group in run.opt.param_groups:  # the command line, not the checkpoint, sets these
            group.update(lr=cfg.lr, weight_decay=cfg.weight_decay)
        run.step = ckpt["steps"]
        data = ckpt.get("data")  # official checkpoints have none: restart the order at `steps`
        run.sampler.start = (data["epoch"] * run.sampler.per_epoch + data["position"]
                             if data else run.step)
    run.first_step = run.step  # the step at which this process started, and its data position
    return path


#################################################################################
#           Watching a run: log lines, metrics.jsonl, W&B, sample grids          #
#################################################################################

class Logger:
    """Sums the step statistics on the device and, every log_every steps, makes the one host sync
    of the interval: a line on stdout (with an ETA), a row of metrics.jsonl (the source of
    truth), optionally Weights & Biases, and a progress bar between the lines (rank 0)."""

    def __init__(self, run):
        from tqdm import tqdm
        self.run, cfg = run, run.cfg
        self.sums, self.count = torch.zeros(3, device=run.device), 0
        self.flops = train_flops_per_image(run.model, run.encoders)
        self.peak = peak_flops(run.device)
        self.writes = run.rank == 0 and not cfg.bench
        self.file = open(os.path.join(run.dir, "metrics.jsonl"), "a") if self.writes else None
        if self.file and run.step:
            self.file.write(json.dumps({"resumed_at": run.step}) + "\n")
        self.wandb = None
        if self.writes and cfg.wandb:
            import wandb  # only when asked for
            self.wandb = wandb.init(project=cfg.wandb, name=cfg.exp_name, dir=run.dir,
                                    config=asdict(cfg), resume="allow", id=hashlib.sha1(
                                        os.path.abspath(run.dir).encode()).hexdigest()[:16])
        # the bar shows only on a terminal (disable=None), so scheduler logs stay readable
        self.bar = tqdm(total=cfg.max_steps, initial=run.step, unit="step", dynamic_ncols=True,
                        disable=True if run.rank else None)
        self.start = self.timer = time.perf_counter()

    def add(self, stats):
        self.sums += stats
        self.count += 1
        self.bar.update(1)

    def pause(self, seconds):
        """Time spent on grids and checkpoints does not count against img/s."""
        self.timer += seconds

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
        stats = dict(step=run.step, loss=round(loss, 5), align=round(align, 5),
                     grad_norm=round(gnorm, 4), img_s=round(per_device * run.world, 1),
                     img_s_per_device=round(per_device, 1))
        if self.peak:
            stats["mfu"] = round(per_device * self.flops / self.peak, 4)
        if run.device.type == "cuda":
            stats["mem_gb"] = round(torch.cuda.max_memory_allocated(run.device) / 2**30, 2)
        eta = (cfg.max_steps - run.step) * seconds / self.count
        self.bar.set_postfix(loss=f"{loss:.4f}", align=f"{align:.3f}", img_s=stats["img_s"])
        if run.rank == 0:
            self.bar.write(" ".join(f"{k} {v}" for k, v in stats.items()) +
                           f" eta {datetime.timedelta(seconds=round(eta))}")
        if self.file:
            self.file.write(json.dumps(stats) + "\n")
            self.file.flush()
        if self.wandb:
            self.wandb.log(stats, step=run.step)
        self.sums.zero_()
        self.count, self.timer = 0, time.perf_counter()

    def image(self, path):
        if self.wandb:
            import wandb
            self.wandb.log({"samples": wandb.Image(path)}, step=self.run.step)

    def record(self, row):
        """One more row at this step, outside the interval's statistics (the alignment)."""
        row = dict(step=self.run.step, **row)
        self.bar.write(" ".join(f"{k} {v}" for k, v in row.items()))
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        if self.wandb:
            self.wandb.log(row, step=self.run.step)

    def close(self):
        self.bar.close()
        if self.file:
            self.file.close()
        if self.wandb:
            self.wandb.finish()


#################################################################################
#       Samples for the grids: guidance, the preview samplers, the PNG grid       #
#################################################################################
# The default grid: DiT's and REPA's showcase ImageNet classes (golden retriever, otter, red panda,
# geyser, macaw, valley, balloon, arctic fox). Models with fewer classes show their first 8.
GRID_CLASSES = [207, 360, 387, 974, 88, 979, 417, 279]
GRID_CFG = 4.0  # the grids' guidance scale, the official trainer's


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


@torch.no_grad()
def sample_euler(model, z, y, num_steps=50, cfg_scale=1.0):
    """The grids' sampler for a SiT, the official trainer's: Euler steps of dx = v dt from noise z
    (t = 1) to data (t = 0) on linspace(1, 0, N + 1), guided on every step; float64 state, the model
    called in z's dtype. sample.py's ODE and SDE solvers (Heun, guidance interval) build on guided
    too; with heun off and the interval [0, 1], its ODE takes these very steps."""
    ts = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64).tolist()
    x = z.to(torch.float64)
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        t = torch.full((x.shape[0],), t_cur, dtype=z.dtype, device=x.device)
        x = x + (t_next - t_cur) * guided(model, x.to(z.dtype), t, y, cfg_scale, torch.float64)
    return x


@torch.no_grad()
def sample_ddpm(model, z, y, num_steps=250, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0,
                generator=None):
    """DiT's sampler (its sample_ddp.py, for FID): ancestral steps x <- mean + sigma noise of the
    model's p(x_{k-1} | x_k) down the chain respaced to `num_steps` (ddpm_schedule), from
    noise z to data; returns z's dtype (float32, like the official: no float64 state here).

    Each step calls the model with the ORIGINAL timestep k (int64), then draws the step's noise
    (torch.randn_like, or `generator`); the last step's draw is masked, so there are num_steps
    draws. Guidance is on while k / 1000 (its t, 0 = data) is in [guidance_low, guidance_high]."""
    sched = ddpm_schedule(num_steps, z.device)
    x = z
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
    """Images in [-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3) on the CPU, as the official
    generate.py: clamp(255 (x + 1) / 2, 0, 255), then a cast that truncates rather than rounds.
    The FID numbers were computed on these bytes, so we keep the truncation."""
    return torch.clamp(255.0 * ((x + 1) / 2), 0, 255).permute(0, 2, 3, 1).to("cpu", torch.uint8)


def decode(x, vae):
    """Solver output (float64) -> uint8 images. Latent models go through the SD-VAE: z / 0.18215
    undoes the scaling applied in training (bias 0). Pixel-space models have no VAE."""
    x = x.to(torch.float32)
    if vae is not None:
        # divide by a tensor, as the official code does: CUDA divides by a Python scalar as a
        # multiplication by its reciprocal, which can differ in the last bit
        x = vae.decode(x / torch.full((1,), LATENT_SCALE, device=x.device)).sample
    return to_uint8(x)


def save_grid(images, names, path):
    """uint8 (rows * cols, H, W, 3), one class per row -> a PNG with the class name (or id) left
    of each row. Small images (16 px) are enlarged without smoothing so a person can see
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
    atomic_write(path, lambda f: grid.save(f, format="PNG"))


class Grids:
    """Samples from the EMA with the same noise and labels for the whole run (also across
    resumes), as the paper's fig. 4: one row per class, written as samples/NNNNNNN.png. The
    official trainer does this too (every 10K steps, 50 Euler steps, CFG 4); a DiT uses 50 DDPM
    steps, whose noise is seeded too. Latent runs are decoded with the VAE that made the latents."""

    def __init__(self, run, per_class=4, num_steps=50, cfg_scale=GRID_CFG):
        self.run, self.num_steps, model = run, num_steps, run.model
        names = getattr(run.dataset, "class_names", None)
        self.classes = (GRID_CLASSES if model.num_classes == NUM_CLASSES else
                        list(range(min(10, model.num_classes))))
        self.names = [names[c] for c in self.classes] if names else self.classes
        self.labels = torch.tensor(self.classes).repeat_interleave(per_class).to(run.device)
        size = run.model_kwargs["input_size"]
        g = torch.Generator().manual_seed(run.cfg.seed)
        self.noise = torch.randn(len(self.labels), model.in_channels, size, size,
                                 generator=g).to(run.device)
        has_null = model.y_embedder.embedding_table.num_embeddings > model.num_classes
        self.cfg_scale = cfg_scale if has_null else 1.0
        self.vae = None if model.in_channels == 3 else load_vae(
            json.load(open(os.path.join(run.cfg.data_dir, "manifest.json")))["vae"], run.device)
        os.makedirs(os.path.join(run.dir, "samples"), exist_ok=True)

    @torch.no_grad()
    def write(self):
        run = self.run
        if run.model.learn_sigma:  # a DiT: its ancestral sampler, with seeded noise
            generator = torch.Generator(run.device).manual_seed(run.cfg.seed)
            x = sample_ddpm(run.ema, self.noise, self.labels, self.num_steps, self.cfg_scale,
                            generator=generator)
        else:
            x = sample_euler(run.ema, self.noise, self.labels, self.num_steps, self.cfg_scale)
        path = os.path.join(run.dir, "samples", f"{run.step:07d}.png")
        save_grid(decode(x, self.vae), self.names, path)
        return path


def clean_latents(moments, dataset):
    """x_* for measuring: the VAE posterior mean, scaled, rather than a sample of the posterior
    (as training draws), so that the measurement depends on the image only."""
    return moments.chunk(2, dim=1)[0] * dataset.latent_scale


ALIGN_T = 0.5  # the noise level of --align-every's CKNNA: mid-path, where the loss is applied too


class AlignmentLog:
    """--align-every: how the EMA's hidden states relate to the encoders' features and to the
    classes, on one fixed set of images (the same images and noise all run, t = 0.5): CKNNA
    (k = --knn) at block encoder_depth (the aligned one) and at the last block, and a linear
    probe's accuracy at the aligned block (trained on the first half of the set, tested on the
    second): rows of metrics.jsonl that show a run's representation forming. The encoders'
    features are computed once; a measurement is one forward pass of the EMA over the set, on
    rank 0, where the grids are drawn, outside the step. `data`: the images' data set (of the
    reader's format), the training set's if None."""

    def __init__(self, run, data=None):
        cfg, self.run = run.cfg, run
        data = run.dataset if data is None else data
        g = torch.Generator().manual_seed(cfg.seed)
        rows = torch.randperm(len(data), generator=g)[:cfg.align_images].sort().values.numpy()
        images, moments, self.labels = data.__getitems__(rows)
        self.x = clean_latents(moments, data).to(run.device)
        self.noise = torch.randn(self.x.shape, generator=g).to(run.device)
        self.chunk = max(1, cfg.batch_size // run.world)  # what a training step holds in memory
        self.autocast = torch.autocast(run.device.type, dtype=torch.bfloat16,
                                       enabled=run.precision == "bf16")
        with self.autocast:
            feats = [encode(run.encoders, im.to(run.device)) for im in images.split(self.chunk)]
        self.targets = [F.normalize(torch.cat(f).float().mean(1), dim=-1) for f in zip(*feats)]
        self.blocks = sorted({run.model.encoder_depth, len(run.model.blocks)})

    @torch.no_grad()
    def __call__(self):
        run, aligned = self.run, self.run.model.encoder_depth
        with self.autocast:
            feats = torch.cat([block_features(
                run.ema, x, torch.full((len(x),), ALIGN_T, device=x.device), eps,
                run.cfg.path_type) for x, eps in zip(self.x.split(self.chunk),
                                                     self.noise.split(self.chunk))])
        half, labels = len(feats) // 2, self.labels.to(feats.device)
        probe = linear_probe(feats[:half, aligned - 1], labels[:half], feats[half:, aligned - 1],
                             labels[half:], run.model.num_classes, epochs=100, lr=1e-2)
        feats = F.normalize(feats, dim=-1)
        return {**{f"cknna/{enc.name}/block{b}": round(cknna(feats[:, b - 1], z, run.cfg.knn), 4)
                   for enc, z in zip(run.encoders, self.targets) for b in self.blocks},
                f"probe/block{aligned}": round(probe, 4)}


#################################################################################
#                                  The loop                                     #
#################################################################################

def describe(run, own_data=False):
    """What runs, as it runs: the config without the fields this run does not use, the model,
    the data and the target. own_data: a tool's data set, which says what it is (`description`)."""
    cfg, unused = run.cfg, set()
    unused |= {"data_dir", "resolution"} if own_data else set()
    unused |= {"path_type", "weighting"} if run.model.learn_sigma else set()  # SiT's only
    shown = {k: v for k, v in asdict(cfg).items() if k not in unused}
    data = (run.dataset.description if own_data else
            "random data and random-weight encoders (--bench)" if cfg.bench else
            f"{len(run.dataset):,} images at {run.dataset.resolution} px from {cfg.data_dir}")
    params = sum(p.numel() for p in run.model.parameters())
    return (f"config {json.dumps(shown)}\nmodel {json.dumps(run.model_kwargs)}\ndata {data}\n"
            f"git {git_revision()}, world {run.world}, device {run.device}, {run.precision}; "
            f"{'DiT' if run.model.learn_sigma else 'SiT'} {params:,} parameters")


@contextlib.contextmanager
def forbid_host_sync(enabled):
    """While enabled, any host-device synchronisation raises (CUDA's sync-debug mode "error"):
    this is how --sync-debug checks that a training step never waits for the GPU."""
    if enabled:
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        if enabled:
            torch.cuda.set_sync_debug_mode("default")


def train(cfg, data=None, encoders=None, measure=None):
    """The training loop: one path for CPU, one GPU and torchrun over many GPUs and nodes.

    Tools train through three factories, called in the run's processes (so that under torchrun
    each builds its own, after the process group exists):
      data()           -> the training set, in the reader's format (images, moments, labels from
                          __getitems__; `latent_scale`, `resolution`, `num_classes`), plus a
                          `description` for the log and optionally `class_names` for the grids
                          and checkpoints. Default: the shards at --data-dir.
      encoders(device) -> [Encoder]: the frozen targets of eq. (8). Default: --enc-type's.
      measure(run)     -> a function () -> dict, called on rank 0 every --align-every steps; its
                          dict is a row of metrics.jsonl. Default: AlignmentLog(run).
    None of these is needed for the paper's runs; tools/demo.py trains through all three."""
    run = start_run(cfg, data, encoders)
    path = resume_run(run)
    if run.step >= cfg.max_steps:  # nothing to do, and nothing in the run folder changes
        print0(f"{run.dir} is already at step {run.step} (--max-steps {cfg.max_steps}): nothing "
               f"to train. Train longer with a larger --max-steps, or start a new run with "
               f"another --exp-name")
        return run
    # Start: the run folder and what runs
    if run.rank == 0 and not cfg.bench:
        os.makedirs(run.ckpt_dir, exist_ok=True)
        info = dict(config=asdict(cfg), model_kwargs=run.model_kwargs, git=git_revision(),
                    world=run.world)
        atomic_write(os.path.join(run.dir, "config.json"), lambda f: json.dump(info, f, indent=1),
                     "w")
    print0(describe(run, data is not None) +
           (f"\nresumed from {path} at step {run.step}" if path else ""))
    data = iter(loader(run.dataset, run.sampler, cfg.num_workers))
    grids = Grids(run) if run.rank == 0 and cfg.sample_every and not cfg.bench else None
    aligner = ((measure or AlignmentLog)(run)
               if run.rank == 0 and cfg.align_every and not cfg.bench else None)
    log = Logger(run)
    run.model.train()
    with StopSignal() as stop:
        while run.step < cfg.max_steps:
            # One optimisation step (with --sync-debug, any host-device sync in it is an error)
            debug = cfg.sync_debug and run.device.type == "cuda" and run.step > run.first_step
            with forbid_host_sync(debug):
                log.add(train_step(run, [next(data) for _ in range(cfg.grad_accum)]))
            # Log: the one host sync of the interval
            if run.step % cfg.log_every == 0 or run.step == cfg.max_steps:
                log.flush()
            # Samples, stop on a signal, checkpoints: time not counted as training
            began = time.perf_counter()
            if grids and (run.step == 1 or run.step % cfg.sample_every == 0):
                log.image(grids.write())
            if aligner and run.step % cfg.align_every == 0:
                log.record(aligner())
            if stop:
                if not cfg.bench:
                    save_checkpoint(run, "latest.pt")
                print0(f"stopped by signal at step {run.step}" +
                       ("" if cfg.bench else "; saved, resume with the same command"))
                break
            if not cfg.bench and (run.step % cfg.ckpt_every == 0 or run.step == cfg.max_steps):
                save_checkpoint(run, f"{run.step:07d}.pt")
            elif not cfg.bench and run.step % cfg.latest_every == 0:
                save_checkpoint(run, "latest.pt")
            log.pause(time.perf_counter() - began)
    log.close()
    if not cfg.bench and run.step == cfg.max_steps:
        print0(f"done: {run.step} steps; checkpoints in {run.ckpt_dir}, metrics in "
               f"{os.path.join(run.dir, 'metrics.jsonl')}" +
               (f", grids in {os.path.join(run.dir, 'samples')}" if grids else "") +
               f". Sample with: python sample.py --ckpt {run.dir}")
    return run


#################################################################################
#                                  Command line                                 #
#################################################################################

def add_flags(parser, config_class, defaults=None, skip=()):
    """One flag per dataclass field but those in `skip`: --batch-size for batch_size, --no-compile
    for a bool; the comment after each field is its help. `defaults` replaces the dataclass's
    (a tool's own). sample.py builds its command line the same way."""
    import inspect
    import re
    helps = dict(re.findall(r"^\s+(\w+): .*?#\s*(.*)$", inspect.getsource(config_class), re.M))
    for f in fields(config_class):
        if f.name in skip:
            continue
        flag, text = "--" + f.name.replace("_", "-"), helps.get(f.name, "")
        default = (defaults or {}).get(f.name, f.default)
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=text)
        else:
            parser.add_argument(flag, type=type(f.default), default=default,
                                help=f"{text} (default {default!r})".lstrip())


def parse_args(argv=None):
    """Config from the command line; names and values are checked here, before anything slow."""
    parser = argparse.ArgumentParser(description="REPA training (see the docstring of repa.py).",
                                     allow_abbrev=False)  # --max-step must not pass for --max-steps
    add_flags(parser, Config)
    cfg = Config(**vars(parser.parse_args(argv)))
    try:
        check_config(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    except UserError as e:  # one line, without argparse's usage block
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return cfg


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


def main(argv=None):
    cfg = parse_args(argv)
    run_command(lambda: train(replace(cfg, max_steps=cfg.bench, log_every=max(1, cfg.bench // 2))
                              if cfg.bench else cfg))


if __name__ == "__main__":
    main()
