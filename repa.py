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

Glossary: h_phi = projector (one per encoder); encoder_depth = the block whose output is aligned
(8 for L and XL, 4 for B); lambda = `proj_coeff`; z / z_dims = encoder features and their widths.

Commands
--------
  pip install -r requirements.txt && python -m pytest -q test_repa.py      # set up and test
"""
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Mlp, PatchEmbed

LATENT_SCALE = 0.18215  # SD-VAE latents are scaled to roughly unit variance (LDM paper, sec. 4.3)
NUM_CLASSES = 1000      # ImageNet; the null (unconditional) label is index `num_classes`


class UserError(Exception):
    """A problem with the user's input (a name, a file, a checkpoint). The command line prints it as
    one line, without a traceback; library callers get it as an ordinary exception."""


#################################################################################
#                     The stochastic interpolant (eqs. 1-2)                     #
#################################################################################

def interpolant(t, path_type="linear"):
    """(alpha_t, sigma_t, d alpha_t / dt, d sigma_t / dt) for x_t = alpha_t x + sigma_t eps.

    Both paths go from data (t = 0: alpha = 1, sigma = 0) to noise (t = 1: alpha = 0, sigma = 1).
    The linear path is rectified flow; the cosine path keeps alpha^2 + sigma^2 = 1 (variance
    preserving). This is the only place where the path's math lives: the loss and the samplers
    (sample.py) both call it."""
    if path_type == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    if path_type == "cosine":
        angle = t * (math.pi / 2)
        return (torch.cos(angle), torch.sin(angle),
                -(math.pi / 2) * torch.sin(angle), (math.pi / 2) * torch.cos(angle))
    raise UserError(f"unknown path type {path_type!r}: choose 'linear' or 'cosine'")


def sample_t(batch, weighting="uniform", path_type="linear", device=None):
    """Training times t in [0, 1], shape (batch,).

    uniform:   t ~ U(0, 1), the SiT default and the paper's.
    lognormal: the EDM noise-level distribution, sigma = exp(n) with n ~ N(0, 1), mapped to the t
               at which the path's noise-to-signal ratio sigma_t / alpha_t equals sigma
               (t = sigma / (1 + sigma) for linear, t = (2 / pi) atan(sigma) for cosine). It puts
               more training at middle noise levels."""
    if weighting == "uniform":
        return torch.rand(batch, device=device)
    if weighting == "lognormal":
        sigma = torch.randn(batch, device=device).exp()
        return sigma / (1 + sigma) if path_type == "linear" else (2 / math.pi) * torch.atan(sigma)
    raise UserError(f"unknown weighting {weighting!r}: choose 'uniform' or 'lognormal'")


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
        return self.mlp(code.to(t.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> vector. The extra row `num_classes` is the null label used by classifier-free
    guidance: in training, each label is replaced by it with probability `dropout_prob`, so that
    the same network learns both v(x, t, y) and v(x, t, null)."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
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

    forward(x, t, y) -> (v, zs): v has x's shape; zs[k] is (B, tokens, z_dims[k])."""

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
                 num_heads=16, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=NUM_CLASSES,
                 encoder_depth=8, z_dims=(768,), projector_dim=2048, qk_norm=False):
        super().__init__()
        if not 1 <= encoder_depth <= depth:
            raise UserError(f"encoder_depth must be in [1, {depth}], got {encoder_depth}")
        self.in_channels, self.patch_size = in_channels, patch_size
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
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
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
        p, c = self.patch_size, self.in_channels
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed     # (B, T, D), T = (H / p) * (W / p)
        c = self.t_embedder(t) + self.y_embedder(y)  # (B, D), the condition of every block
        for i, block in enumerate(self.blocks, start=1):
            x = block(x, c)
            if i == self.encoder_depth:  # h_t of eq. (8): read it mid-network, token by token
                zs = [proj(x) for proj in self.projectors]
        return self.unpatchify(self.final_layer(x, c)), zs


# Sizes of the SiT paper (table 1), with REPA's alignment depth: 8 for L and XL and, from the
# official issue #5, 4 for B. S is not in the paper; it gets 4, like B (12 blocks too).
_WIDTHS = {"S": (12, 384, 6, 4), "B": (12, 768, 12, 4), "L": (24, 1024, 16, 8),
           "XL": (28, 1152, 16, 8)}
SIZES = {f"{name}/{p}": dict(depth=d, hidden_size=h, num_heads=n, patch_size=p, encoder_depth=e)
         for name, (d, h, n, e) in _WIDTHS.items() for p in (2, 4, 8)}


def size_config(name):
    """SIZES entry for 'XL/2' or the official 'SiT-XL/2'."""
    key = name.removeprefix("SiT-")
    if key not in SIZES:
        raise UserError(f"unknown model size {name!r}: choose one of {', '.join(SIZES)}")
    return dict(SIZES[key])


def build_model(name, **overrides):
    """SiT of a named size, e.g. build_model('XL/2', input_size=32, z_dims=[768])."""
    return SiT(**{**size_config(name), **overrides})


def load_sit_weights(model, state_dict):
    """Load ours or an official SiT state dict strictly, with one clear error when it is for
    another model. The released XL/2 `last.pt` names the blocks after `encoder_depth`
    `decoder_blocks.N`; they are `blocks.(N + encoder_depth)` here."""
    state_dict = {k.removeprefix("module.").removeprefix("_orig_mod."): v
                  for k, v in state_dict.items()}
    legacy = {}
    for k, v in state_dict.items():
        if k.startswith("decoder_blocks."):
            _, n, rest = k.split(".", 2)
            k = f"blocks.{int(n) + model.encoder_depth}.{rest}"
        legacy[k] = v
    ours = model.state_dict()
    missing, unexpected = ours.keys() - legacy.keys(), legacy.keys() - ours.keys()
    wrong = [k for k in ours.keys() & legacy.keys() if ours[k].shape != legacy[k].shape]
    if missing or unexpected or wrong:
        what = wrong[:1] and f"{wrong[0]} is {tuple(legacy[wrong[0]].shape)}, " \
                             f"expected {tuple(ours[wrong[0]].shape)}"
        raise UserError(f"checkpoint does not fit this model ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected, {len(wrong)} wrong-shaped keys"
                        f"{'; ' + what if what else ''}): is it for another size or encoder set?")
    model.load_state_dict(legacy, strict=True)
    return model


#################################################################################
#                          The REPA loss (eqs. 3, 8, 9)                         #
#################################################################################

def repa_loss(model, x, y, zs, path_type="linear", weighting="uniform", t=None, noise=None):
    """(denoising_loss (B,), alignment_loss scalar) for clean latents x (B, C, H, W), labels y and
    the encoder targets zs (a list of (B, N, D_k)). The total is denoising.mean() + lambda * align.

    t (B,) and noise (x's shape) are drawn when not given, in the official order (t, then noise,
    then the label dropout inside the model), so a seeded run reproduces the official one."""
    t = sample_t(x.shape[0], weighting, path_type, x.device) if t is None else t
    noise = torch.randn_like(x) if noise is None else noise
    alpha, sigma, d_alpha, d_sigma = interpolant(t.to(x.dtype).view(-1, 1, 1, 1), path_type)
    x_t = alpha * x + sigma * noise                                  # eq. (1)
    v_target = d_alpha * x + d_sigma * noise                         # eq. (2)
    v_pred, zs_pred = model(x_t, t.to(x.dtype), y)
    denoising = (v_pred.float() - v_target.float()).square().mean(dim=(1, 2, 3))  # eq. (3)
    # eq. (8): -cos per patch, averaged over patches, samples and encoders. In fp32: normalising
    # in fp16 underflows to NaN (an official user report), and the cost is negligible.
    align = torch.stack([
        -(F.normalize(zp.float(), dim=-1) * F.normalize(z.float(), dim=-1)).sum(-1).mean()
        for zp, z in zip(zs_pred, zs)]).mean()
    return denoising, align


#################################################################################
#             Frozen encoders: the targets y_* = f(x_*) of eq. (8)               #
#################################################################################
# An encoder entry is "family-vit-size", as in the official --enc-type, optionally with
# "=/path/to/weights" for a local file. Weights otherwise come from timm (the Hugging Face cache,
# downloaded on first use where there is internet). timm's DINOv2 weights are the same tensors as
# the torch.hub ones the official code uses.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
_VIT = {"s": "small", "b": "base", "l": "large", "g": "giant"}
# family -> (timm architecture for a size letter, input pixels at 256 px, mean, std)
ENCODER_FAMILIES = {
    # the official choice: 224 px input, i.e. a 16 x 16 grid of patch-14 tokens for 256 SiT tokens
    "dinov2": (lambda s: f"vit_{_VIT[s]}_patch14_dinov2.lvd142m", 224, IMAGENET_MEAN, IMAGENET_STD),
    "dinov2reg": (lambda s: f"vit_{_VIT[s]}_patch14_reg4_dinov2.lvd142m", 224,
                  IMAGENET_MEAN, IMAGENET_STD),
    # DINOv3 has patch 16 and rotary positions: 256 px gives the 16 x 16 grid with no resize
    "dinov3": (lambda s: f"vit_{_VIT[s]}_patch16_dinov3.lvd1689m", 256, IMAGENET_MEAN, IMAGENET_STD),
    "clip": (lambda s: "vit_large_patch14_clip_224.openai" if s == "l" else None, 224,
             CLIP_MEAN, CLIP_STD),
}
ENCODER_SIZES = {"dinov2": "sblg", "dinov2reg": "sblg", "dinov3": "sbl", "clip": "l"}


@dataclass
class Encoder:
    name: str           # e.g. "dinov2-vit-b"
    model: nn.Module    # a timm VisionTransformer, frozen, in eval mode
    size: int           # input pixels: images are resized to size x size
    mean: tuple
    std: tuple

    @property
    def dim(self):
        return self.model.embed_dim


def load_encoders(spec="dinov2-vit-b", resolution=256, device="cpu", **timm_kwargs):
    """Frozen encoders for a comma-separated spec such as "dinov2-vit-b,clip-vit-l".

    Each entry may end in "=PATH" to read the weights from a local file (timm or original
    layout). `timm_kwargs` go to timm.create_model (the tests pass pretrained=False and tiny
    widths to build the same classes with random weights)."""
    import timm
    if resolution not in (256, 512):
        raise UserError(f"resolution must be 256 or 512, got {resolution}")
    encoders = []
    for entry in spec.split(","):
        name, _, path = entry.strip().partition("=")
        family, arch, size = (name.lower().split("-") + ["", "", ""])[:3]
        if family not in ENCODER_FAMILIES or arch != "vit" or size not in ENCODER_SIZES[family]:
            names = [f"{f}-vit-{s}" for f, sizes in ENCODER_SIZES.items() for s in sizes]
            raise UserError(f"unknown encoder {name!r}: choose from {', '.join(names)}")
        timm_name, pixels, mean, std = ENCODER_FAMILIES[family]
        timm_name = timm_name(size)
        pixels *= resolution // 256  # 512 px images: 448 px input, a 32 x 32 grid (1024 tokens)
        kwargs = {"pretrained": True, "img_size": pixels, "num_classes": 0, **timm_kwargs}
        if kwargs["pretrained"]:
            path = path or _hub_weights(timm.models.get_pretrained_cfg(timm_name).hf_hub_id)
            if not path or not os.path.isfile(path):
                raise UserError(
                    f"cannot load encoder {name}: " + (f"weight file {path} not found" if path else
                    f"its weights ({timm_name}) are not in the Hugging Face cache and cannot be "
                    f"downloaded here; on a machine with internet run python -c \"import timm; "
                    f"timm.create_model('{timm_name}', pretrained=True)\" and copy "
                    f"~/.cache/huggingface, or pass a file: {name}=PATH"))
            kwargs["pretrained_cfg_overlay"] = dict(file=path)
        try:
            # timm resamples the stored position embedding to the new grid (bicubic, antialiased),
            # exactly as the official code does after loading from torch.hub
            model = timm.create_model(timm_name, **kwargs)
        except Exception as e:  # a corrupt file, or weights of another architecture
            raise UserError(f"cannot load encoder {name} from {path}: "
                            f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
        model = model.to(device).eval().requires_grad_(False)
        encoders.append(Encoder(name, model, pixels, mean, std))
    return encoders


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


def _hub_folder(repo_id):
    """A model folder (config and weights) from the cache, or downloaded when reachable."""
    from huggingface_hub import snapshot_download
    patterns = ["config.json", "*.safetensors"]
    try:
        return snapshot_download(repo_id, local_files_only=True, allow_patterns=patterns)
    except Exception:
        return snapshot_download(repo_id, allow_patterns=patterns) if _hub_reachable() else None


@torch.no_grad()
def encode(encoders, images):
    """uint8 images (B, 3, H, W) -> a list of patch features (B, N, D_k), one per encoder.

    Preprocessing as in the official code: x / 255, normalise, bicubic resize (for DINOv2,
    normalise first, then resize). The features are the final-norm patch tokens, with the CLS and
    register tokens dropped (DINOv2's x_norm_patchtokens)."""
    out = []
    for enc in encoders:
        x = images.float() / 255
        mean = torch.tensor(enc.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(enc.std, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
        if x.shape[-1] != enc.size:
            x = F.interpolate(x, size=(enc.size, enc.size), mode="bicubic")
        out.append(enc.model.forward_features(x)[:, enc.model.num_prefix_tokens:])
    return out


#################################################################################
#                 Data: SD-VAE latents and images, read fast                     #
#################################################################################

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
                f"it is not in the Hugging Face cache and cannot be downloaded here; on a machine "
                f"with internet run python -c \"from diffusers import AutoencoderKL; "
                f"AutoencoderKL.from_pretrained('{name}')\" and copy ~/.cache/huggingface, or "
                f"pass a local folder")
        raise UserError(f"cannot load the VAE {name}: {hint} ({type(e).__name__})") from None
    return vae.to(device).eval().requires_grad_(False)
