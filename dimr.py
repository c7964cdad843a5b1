"""DiMR: the multi-resolution diffusion network (paper Sec. 3.1-3.3, Fig. 3, Tables 1, 5, 6).

A cascade of R branches, low resolution to high. Branch 1 is a Transformer on a coarse token
grid (16x16 for the paper's models); branches 2..R are ConvNeXt-style conv branches, each at twice
the resolution and half the width of the one before. Every branch patchifies the *input* with
kernel = stride = p_r (p_r = p_1 / 2^(r-1), so the last branch sees single pixels), is U-ViT
shaped (long skips from the first half of its blocks to the second), predicts the noise at its own
resolution (multi-scale loss, Sec. 3.2), and hands *all* its feature maps to the next branch
through the feature cascade (Sec. 3.1). Time enters only through TD-LN (Sec. 3.3, td_ln.py);
the class enters as one token prepended to the Transformer branch.

Call convention: model(x, t, y) with x (B, C, H, W), t float (B,) DDPM steps on the 0..1000
scale, y int64 (B,) where y == num_classes is the null class of classifier-free guidance. It
returns one noise prediction per branch, lowest resolution first; the last is full resolution.

Also here: the variant registry (Table 1/6 names), the Table 5 ablation switches (norm, MLP,
number of branches), `python dimr.py --variant xl` (parameters and MACs per branch), and
loading the authors' released checkpoints (`from_official`, `python dimr.py convert`).
"""
import argparse
import dataclasses
import math
import re
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import checkpoints
from diffusion import NUM_TIMESTEPS
from td_ln import TDLayerNorm, TDRMSNorm, per_sample, time_input

# Table 5: TD-LN (ours), adaLN-Zero (DiT), LN + time token (U-ViT)
NORMS = ("td", "adaln_zero", "ln")
MLPS = ("glu", "gelu")              # Table 5: GLU with hidden 2D, or the usual 4D GELU MLP
TIME_EMBED_DIM = 256                # DiT's sinusoidal time embedding (adaLN-Zero ablation only)


# ----------------------------------------------------------------------------------------------
# Configuration and variants

@dataclass(frozen=True)
class DiMRConfig:
    input_size: int = 32          # H = W of the model input (latent or pixels)
    in_channels: int = 4
    num_classes: int = 1000       # class id num_classes is the null class
    patch_size: int = 2           # p_1 of the Transformer branch; each further branch halves it
    depths: tuple = (39, 20)      # configured blocks N_r per branch (builds 2 floor(N/2) + 1)
    widths: tuple = (960, 480)    # D_r per branch
    num_heads: int = 16
    norm: str = "td"
    mlp: str = "glu"

    def __post_init__(self):
        object.__setattr__(self, "depths", tuple(self.depths))
        object.__setattr__(self, "widths", tuple(self.widths))
        R = len(self.depths)
        problems = []
        if R < 1 or len(self.widths) != R:
            problems.append(f"depths {self.depths} and widths {self.widths} must have one entry "
                            "per branch")
        sizes = dict(input_size=self.input_size, in_channels=self.in_channels,
                     num_classes=self.num_classes, patch_size=self.patch_size,
                     num_heads=self.num_heads)
        problems += [f"{k} must be >= 1, got {v}" for k, v in sizes.items() if v < 1]
        problems += [f"{k} must all be >= 1, got {v}"
                     for k, v in (("depths", self.depths), ("widths", self.widths))
                     if min(v, default=1) < 1]
        if problems:  # the structural checks below divide by these sizes
            raise ValueError("bad DiMR config: " + "; ".join(problems))
        if self.norm not in NORMS:
            problems.append(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.mlp not in MLPS:
            problems.append(f"mlp must be one of {MLPS}, got {self.mlp!r}")
        if R > 1 and self.patch_size != 2 ** (R - 1):
            problems.append(f"patch_size must be 2^(R-1) = {2 ** (R - 1)} for {R} branches, "
                            f"got {self.patch_size}")
        if self.input_size % self.patch_size:
            problems.append(f"input_size {self.input_size} is not a multiple of "
                            f"patch_size {self.patch_size}")
        if self.widths and self.widths[0] % self.num_heads:
            problems.append(f"width {self.widths[0]} is not divisible by "
                            f"num_heads {self.num_heads}")
        if problems:
            raise ValueError("bad DiMR config: " + "; ".join(problems))

    @property
    def num_branches(self):
        return len(self.depths)

    @property
    def patch_sizes(self):  # (p_1, ..., p_R)
        return tuple(self.patch_size // 2 ** r for r in range(self.num_branches))


VARIANTS = {
    # ImageNet 64x64 in pixel space (Table 2); L/3R's depths are inferred from its 284M count.
    "DiMR-M/3R": DiMRConfig(64, 3, 1000, 4, (15, 8, 8), (768, 384, 192), 12),
    "DiMR-L/3R": DiMRConfig(64, 3, 1000, 4, (19, 7, 7), (1024, 512, 256), 16),
    # ImageNet 256x256 / 512x512 on Stable Diffusion latents (Tables 3, 4);
    # the 2R ones are released.
    "DiMR-XL/2R": DiMRConfig(32, 4, 1000, 2, (39, 20), (960, 480), 16),
    "DiMR-G/2R": DiMRConfig(32, 4, 1000, 2, (57, 29), (1152, 576), 16),
    "DiMR-XL/3R": DiMRConfig(64, 4, 1000, 4, (39, 20, 20), (960, 480, 240), 16),
    # 0.7M parameters for the CPU: the digits demo (8x8 grey, 10 classes) and the tests.
    "DiMR-S/2R": DiMRConfig(8, 1, 10, 2, (5, 3), (96, 48), 4),
}
ALIASES = {"m": "DiMR-M/3R", "l": "DiMR-L/3R", "xl": "DiMR-XL/2R", "g": "DiMR-G/2R",
           "xl_3r": "DiMR-XL/3R", "s": "DiMR-S/2R"}
VARIANT_CHOICES = (*ALIASES, *VARIANTS)  # argparse choices everywhere


def get_config(name, **overrides):
    """Registry lookup by paper name or alias, with optional field overrides."""
    if name not in VARIANTS and name not in ALIASES:
        raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANT_CHOICES)}")
    return dataclasses.replace(VARIANTS[ALIASES.get(name, name)], **overrides)


def config_from_dict(d):
    """Rebuild a config stored in a checkpoint (a plain dict, as nanoGPT stores it)."""
    fields = {f.name for f in dataclasses.fields(DiMRConfig)}
    if not isinstance(d, dict) or set(d) - fields:
        raise ValueError(f"checkpoint config has unknown fields: "
                         f"{sorted(set(d) - fields) if isinstance(d, dict) else d}")
    return DiMRConfig(**d)


# ----------------------------------------------------------------------------------------------
# Norms: TD-LN (default) and the two alternatives of Table 5, all called as norm(x, cond)

class LayerNorm(nn.LayerNorm):
    """Plain LN (U-ViT): time-independent; time enters as a token instead."""

    def forward(self, x, cond=None):
        return super().forward(x)


class AdaLN(nn.Module):
    """adaLN (DiT): LN without affine, then shift/scale regressed from the condition, zero-init."""

    def __init__(self, dim, cond_dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Linear(cond_dim, 2 * dim)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x, c):                               # c: (B, cond_dim) = SiLU(t_emb + y_emb)
        shift, scale = self.modulation(c).chunk(2, dim=-1)
        return self.norm(x) * (1 + per_sample(scale, x)) + per_sample(shift, x)


def make_norm(kind, dim, cond_dim, pre_norm):
    """Block pre-norms are TD-RMSNorm, heads and cascade use TD-LayerNorm (the release's
    "TDRMSN")."""
    if kind == "td":
        return TDRMSNorm(dim) if pre_norm else TDLayerNorm(dim)
    if kind == "ln":
        return LayerNorm(dim)
    return AdaLN(dim, cond_dim)


class Gates(nn.Module):
    """adaLN-Zero's residual gates, zero-initialised so every block starts as the identity."""

    def __init__(self, n, dim, cond_dim):
        super().__init__()
        self.n = n
        self.linear = nn.Linear(cond_dim, n * dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, c):
        return self.linear(c).chunk(self.n, dim=-1)


def residual(x, h, gate):
    return x + h if gate is None else x + per_sample(gate, h) * h


# ----------------------------------------------------------------------------------------------
# Blocks

class GLU(nn.Module):
    """Gated MLP (Sec. 3.1): W2(GELU(W0 n) * W1 n), hidden width 2D, replacing U-ViT's 4D MLP."""

    def __init__(self, dim):
        super().__init__()
        self.w0 = nn.Linear(dim, 2 * dim)
        self.w1 = nn.Linear(dim, 2 * dim)
        self.w2 = nn.Linear(2 * dim, dim)

    def forward(self, n):
        return self.w2(F.gelu(self.w0(n)) * self.w1(n))


class GeluMLP(nn.Module):
    """The usual Transformer MLP (hidden 4D), the Table 5 baseline."""

    def __init__(self, dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, n):
        return self.fc2(F.gelu(self.fc1(n)))


def make_mlp(kind, dim):
    return GLU(dim) if kind == "glu" else GeluMLP(dim)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):                                                  # (B, L, D)
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                            # 3 x (B, heads, L, D/heads)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, L, D))


class TransformerBlock(nn.Module):
    """x = x + Attn(norm(x)); x = x + GLU(norm(x)), on tokens (B, L, D)."""

    def __init__(self, cfg, dim, cond_dim):
        super().__init__()
        self.norm1 = make_norm(cfg.norm, dim, cond_dim, pre_norm=True)
        self.attn = Attention(dim, cfg.num_heads)
        self.norm2 = make_norm(cfg.norm, dim, cond_dim, pre_norm=True)
        self.mlp = make_mlp(cfg.mlp, dim)
        self.gates = Gates(2, dim, cond_dim) if cfg.norm == "adaln_zero" else None

    def forward(self, x, cond):
        g1, g2 = self.gates(cond) if self.gates else (None, None)
        x = residual(x, self.attn(self.norm1(x, cond)), g1)
        return residual(x, self.mlp(self.norm2(x, cond)), g2)


class DepthwiseConvCPU(torch.autograd.Function):
    """The ConvNeXt blocks' depthwise conv, F.conv2d(x, w, b, padding=k // 2, groups=D), with a
    faster backward on the CPU, where oneDNN's depthwise kernel gradient is slow. That gradient is
    itself a depthwise convolution: grad_w[d, i, j] = sum_{b,h,w} x_pad[b, d, h + i, w + j]
    g[b, d, h, w], the input convolved with the output gradient as the kernel, one group per
    (image, channel), summed over the images. Under CPU autocast it runs in float32."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)
    def forward(ctx, x, weight, bias):                               # x: (B, D, H, W)
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=x.shape[1])

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, g):                                            # g: (B, D, H, W)
        x, weight = ctx.saved_tensors
        (B, D, H, W), k = x.shape, weight.shape[-1]
        grad_x = torch.nn.grad.conv2d_input(x.shape, weight, g, padding=k // 2, groups=D)
        grad_w = F.conv2d(x.reshape(1, B * D, H, W), g.reshape(B * D, 1, H, W), padding=k // 2,
                          groups=B * D)                              # (1, B*D, k, k)
        grad_w = torch.empty_like(weight).copy_(grad_w.view(B, D, 1, k, k).sum(0))  # w's strides
        return grad_x, grad_w, g.sum((0, 2, 3))


class ConvNeXtBlock(nn.Module):
    """x = x + DWConv7x7(x) (no norm before it); x = x + GLU(norm(x)), on maps (B, H, W, D)."""

    def __init__(self, cfg, dim, cond_dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        # The input is channels-last, so the kernel's gradient comes out channels-last; storing the
        # kernel in that layout keeps DDP's gradient buckets matching (no stride-mismatch copies).
        # DepthwiseConvCPU returns its gradient in the kernel's layout too.
        self.dwconv.weight.data = self.dwconv.weight.data.to(memory_format=torch.channels_last)
        self.norm = make_norm(cfg.norm, dim, cond_dim, pre_norm=True)
        self.mlp = make_mlp(cfg.mlp, dim)
        self.gates = Gates(1, dim, cond_dim) if cfg.norm == "adaln_zero" else None

    def forward(self, x, cond):
        h = x.permute(0, 3, 1, 2)                            # (B, D, H, W), channels-last in memory
        conv = self.dwconv
        h = DepthwiseConvCPU.apply(h, conv.weight, conv.bias) if h.is_cpu else conv(h)
        x = x + h.permute(0, 2, 3, 1)
        (g,) = self.gates(cond) if self.gates else (None,)
        return residual(x, self.mlp(self.norm(x, cond)), g)


# ----------------------------------------------------------------------------------------------
# Feature cascade, output head, branch

def pixel_shuffle(x, k):
    """(B, h, w, k*k*D) -> (B, h*k, w*k, D): channel (i*k + j)*D + c goes to pixel
    (h*k + i, w*k + j)."""
    B, h, w, C = x.shape
    x = x.view(B, h, w, k, k, C // (k * k)).permute(0, 1, 3, 2, 4, 5)      # (B, h, i, w, j, D)
    return x.reshape(B, h * k, w * k, C // (k * k))


class Cascade(nn.Module):
    """Feature cascade (Sec. 3.1): every feature map of branch r -> TD-LN -> linear -> pixel
    shuffle to branch r+1's resolution -> TD-LN; added to branch r+1's input embedding."""

    def __init__(self, cfg, in_dim, out_dim, ratio, cond_dim):
        super().__init__()
        self.ratio = ratio
        self.norm_in = make_norm(cfg.norm, in_dim, cond_dim, pre_norm=False)
        self.proj = nn.Linear(in_dim, out_dim * ratio ** 2)
        self.norm_out = make_norm(cfg.norm, out_dim, cond_dim, pre_norm=False)

    def forward(self, features, cond):  # list of (B, h, w, D_prev), one per block + input
        x = self.norm_in(torch.cat(features, dim=-1), cond)                 # (B, h, w, M*D_prev)
        x = pixel_shuffle(self.proj(x), self.ratio)                         # (B, h*k, w*k, D)
        return self.norm_out(x, cond)


class Head(nn.Module):
    """Output head of a branch: TD-LN -> Conv3x3(D -> C). A branch with patch p > 1 as the last
    one (only the single-branch ablation) un-patchifies its p*p*C channels to full resolution."""

    def __init__(self, cfg, dim, patch, cond_dim):
        super().__init__()
        self.patch = patch
        self.norm = make_norm(cfg.norm, dim, cond_dim, pre_norm=False)
        self.conv = nn.Conv2d(dim, cfg.in_channels * patch ** 2, 3, padding=1)

    def forward(self, x, cond):                                             # (B, h, w, D)
        x = self.conv(self.norm(x, cond).permute(0, 3, 1, 2))               # (B, C*p*p, h, w)
        return F.pixel_shuffle(x, self.patch) if self.patch > 1 else x


class Branch(nn.Module):
    """One resolution of the cascade: patchify + position embedding (+ cascade from the branch
    below), U-ViT-shaped blocks (first half pushes to a stack, middle block, second half pops
    through Linear(2D -> D)), output head. Returns (noise prediction, all feature maps)."""

    def __init__(self, cfg, r, cond_dim):
        super().__init__()
        D, p, N = cfg.widths[r], cfg.patch_sizes[r], cfg.depths[r]
        self.is_transformer = r == 0
        self.grid = cfg.input_size // p
        self.patch_embed = nn.Conv2d(cfg.in_channels, D, p, stride=p)
        self.pos_embed = nn.Parameter(torch.zeros(self.grid ** 2, D))       # row h*grid + w
        if r > 0:
            num_maps = 2 * (cfg.depths[r - 1] // 2) + 2   # input of the first block + every block
            self.cascade = Cascade(cfg, num_maps * cfg.widths[r - 1], D, 2, cond_dim)
        Block = TransformerBlock if self.is_transformer else ConvNeXtBlock
        self.blocks = nn.ModuleList(Block(cfg, D, cond_dim) for _ in range(2 * (N // 2) + 1))
        self.skips = nn.ModuleList(nn.Linear(2 * D, D) for _ in range(N // 2))
        self.head = Head(cfg, D, p if r == cfg.num_branches - 1 else 1, cond_dim)
        self.grad_checkpointing = False

    def forward(self, x, cond, extra_tokens, below):
        x = self.patch_embed(x).permute(0, 2, 3, 1).contiguous()            # (B, h, w, D)
        B, h, w, D = x.shape
        x = x + self.pos_embed.view(self.grid, self.grid, D)[:h, :w]
        if below is not None:
            x = x + self.cascade(below, cond)
        features = [x]
        n = 0
        if self.is_transformer:                                             # tokens (B, n + h*w, D)
            n = extra_tokens.shape[1]
            x = torch.cat([extra_tokens.to(x.dtype), x.flatten(1, 2)], dim=1)

        def run(i, x):
            block = self.blocks[i]
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, cond, use_reentrant=False)
            else:
                x = block(x, cond)
            features.append(x[:, n:].view(B, h, w, D) if self.is_transformer else x)
            return x

        half = len(self.skips)
        stack = []
        for i in range(half):
            x = run(i, x)
            stack.append(x)
        x = run(half, x)
        for i, skip in enumerate(self.skips):
            x = run(half + 1 + i, skip(torch.cat([x, stack.pop()], dim=-1)))
        return self.head(features[-1], cond), features


# ----------------------------------------------------------------------------------------------
# The network

def require(ok, message):
    """Raise ValueError(message()) unless every entry of the bool tensor `ok` is True.

    Reading `ok` on an accelerator would make the host wait for the device on every forward
    pass, so there the check is torch._assert_async: a device-side assert that fails the run at
    the next synchronisation instead (meta tensors, as in `count`, pass through it). Skipped
    while torch.compile traces the model.
    """
    if torch.compiler.is_compiling():
        return
    if ok.device.type != "cpu":
        torch._assert_async(ok.all())
    elif not ok.all():
        raise ValueError(message())


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of the DDPM step (only for the Table 5 ablations), (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class DiMR(nn.Module):
    def __init__(self, cfg: DiMRConfig):
        super().__init__()
        self.config = cfg
        D1 = cfg.widths[0]
        self.class_embed = nn.Embedding(cfg.num_classes + 1, D1)            # last row: null class
        if cfg.norm == "adaln_zero":  # DiT: c = t_emb + y_emb conditions every norm
            self.time_embed = nn.Sequential(nn.Linear(TIME_EMBED_DIM, D1), nn.SiLU(),
                                            nn.Linear(D1, D1))
        self.branches = nn.ModuleList(Branch(cfg, r, D1) for r in range(cfg.num_branches))
        self.reset_parameters()

    def reset_parameters(self):
        """U-ViT's initialisation: linears and embeddings ~ N(0, 0.02) truncated, zero biases;
        norms start as identity (TD parameters constant in time); adaLN-Zero stays zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, (AdaLN, Gates)):
                for p in m.parameters():
                    nn.init.zeros_(p)
        nn.init.trunc_normal_(self.class_embed.weight, std=0.02)
        for b in self.branches:
            nn.init.trunc_normal_(b.pos_embed, std=0.02)

    def set_grad_checkpointing(self, enabled=True):
        """Recompute each block in the backward pass (memory for compute, as the release trains)."""
        for b in self.branches:
            b.grad_checkpointing = enabled

    def check_inputs(self, x, t, y):
        cfg = self.config
        if x.dim() != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be [B, {cfg.in_channels}, H, W], got {list(x.shape)}")
        B, _, H, W = x.shape
        if H % cfg.patch_size or W % cfg.patch_size or max(H, W) > cfg.input_size:
            raise ValueError(f"x is {H}x{W}; H and W must be multiples of {cfg.patch_size} "
                             f"and at most {cfg.input_size}")
        if t.shape != (B,) or not t.is_floating_point():
            raise ValueError(f"t must be a float tensor [{B}] of DDPM steps, "
                             f"got {t.dtype} {list(t.shape)}")
        if y.shape != (B,) or y.dtype != torch.long:
            raise ValueError(f"y must be an int64 tensor [{B}] of class ids, "
                             f"got {y.dtype} {list(y.shape)}")
        t_ok = (t >= 0) & (t <= NUM_TIMESTEPS)                               # False for NaN too
        require(t_ok, lambda: f"t must be finite DDPM steps in [0, {NUM_TIMESTEPS}], "
                              f"got {t[~t_ok].tolist()[:5]}")
        y_ok = (y >= 0) & (y <= cfg.num_classes)
        require(y_ok, lambda: f"class ids {y[~y_ok].tolist()[:5]} out of range "
                              f"0..{cfg.num_classes} ({cfg.num_classes} is the null class)")

    def condition(self, t, y):
        """What the norms see (cond) and the tokens prepended to the Transformer branch."""
        y_emb = self.class_embed(y)                                         # (B, D1)
        if self.config.norm == "td":
            return time_input(t), y_emb[:, None]                           # t~ (B,), (B, 1, D1)
        if self.config.norm == "ln":   # U-ViT: a sinusoidal time token and a class token
            t_emb = timestep_embedding(t, y_emb.shape[-1])
            return None, torch.stack([t_emb, y_emb], dim=1)                 # (B, 2, D1)
        # DiT: no extra tokens
        c = F.silu(self.time_embed(timestep_embedding(t, TIME_EMBED_DIM)) + y_emb)
        return c, y_emb.new_empty(y_emb.shape[0], 0, y_emb.shape[1])    # (B, 0, D1)

    def forward(self, x, t, y):
        self.check_inputs(x, t, y)
        cond, extra_tokens = self.condition(t, y)
        outputs, features = [], None
        for branch in self.branches:
            out, features = branch(x, cond, extra_tokens, features)
            outputs.append(out)
        return outputs                     # [(B, C, H_r, W_r)], lowest resolution first


# ----------------------------------------------------------------------------------------------
# Checkpoints of ours

def load_model(path, weights="ema", device="cpu"):
    """Rebuild a DiMR from one of our checkpoints (train.py or `dimr.py convert`)."""
    ckpt = checkpoints.load(path)
    if "config" not in ckpt or weights not in ckpt:
        hint = ("; it looks like the authors' release: convert it with `python dimr.py convert`"
                if any(str(k).startswith("stages.") for k in ckpt) else "")
        raise ValueError(f"{path}: not a DiMR checkpoint with '{weights}' weights "
                         f"({len(ckpt)} keys, e.g. {', '.join(map(str, list(ckpt)[:3]))}){hint}")
    model = DiMR(config_from_dict(ckpt["config"]))
    load_state_dict_strict(model, ckpt[weights], source=str(path))
    return model.to(device).eval(), ckpt


def load_state_dict_strict(model, sd, source):
    """load_state_dict with one clear line per kind of mismatch instead of a long RuntimeError."""
    ours = model.state_dict()
    missing = [k for k in ours if k not in sd]
    unexpected = [k for k in sd if k not in ours]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(ours[k].shape)}"
              for k in ours if k in sd and sd[k].shape != ours[k].shape]
    for what, names in (("missing keys", missing), ("unexpected keys", unexpected),
                        ("shape mismatches", shapes)):
        if names:
            raise ValueError(f"{source}: {len(names)} {what}, e.g. {', '.join(names[:3])}")
    model.load_state_dict(sd)


# ----------------------------------------------------------------------------------------------
# The authors' release

# Their key -> ours, applied in order (regexes on the full key).
OFFICIAL_KEYS = [
    (r"^stages\.0\.class_embeds\.", "class_embed."),
    (r"^stages\.(\d+)\.", r"branches.\1."),
    (r"\.input_layer\.1\.", ".patch_embed."),
    (r"\.input_layer\.3\.position_embeddings\.weight$", ".pos_embed"),
    (r"\.block1\.norm\.scale\.", ".norm1.gamma."),
    (r"\.block1\.query_key_value\.", ".attn.qkv."),
    (r"\.block1\.dense\.", ".attn.proj."),
    (r"\.block1\.1\.", ".dwconv."),
    (r"\.block2\.norm\.scale\.", ".NORM2.gamma."),
    (r"\.block2\.(w\d)\.", r".mlp.\1."),
    (r"\.skip_denses\.", ".skips."),
    (r"\.output_layer\.0\.", ".head.norm."),
    (r"\.output_layer\.2\.", ".head.conv."),
    (r"\.upsample\.0\.", ".cascade.norm_in."),
    (r"\.upsample\.1\.kernel\.", ".cascade.proj."),
    (r"\.upsample\.2\.", ".cascade.norm_out."),
    (r"\.norm(_in|_out)?\.weight\.", r".norm\1.gamma."),
    (r"\.norm(_in|_out)?\.bias\.", r".norm\1.beta."),
    (r"\.param0$", ".p0"), (r"\.param1$", ".p1"),
    (r"\.nodecay_weight$", ".w"), (r"\.nodecay_bias$", ".b"),
]


def official_key(key):
    for pattern, repl in OFFICIAL_KEYS:
        key = re.sub(pattern, repl, key)
    # the second norm is `norm2` in a Transformer block and `norm` in a ConvNeXt block
    return key.replace(".NORM2.", ".norm2." if key.startswith("branches.0.") else ".norm.")


def config_from_official(sd, num_heads):
    """Infer the config from the release's tensor shapes (only the head count is not in them)."""
    try:
        R = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("stages."))
        widths, depths = [], []
        for r in range(R):
            D, C, p, _ = sd[f"stages.{r}.input_layer.1.weight"].shape
            widths.append(D)
            depths.append(1 + max(int(k.split(".")[3]) for k in sd
                                  if k.startswith(f"stages.{r}.blocks.")))
            if r == 0:
                patch, in_channels = p, C
                grid = math.isqrt(sd["stages.0.input_layer.3.position_embeddings.weight"].shape[0])
        num_classes = sd["stages.0.class_embeds.weight"].shape[0] - 1
    except (KeyError, ValueError, AttributeError) as e:
        raise ValueError(f"not a DiMR release state_dict (could not read {e})") from None
    cfg = DiMRConfig(grid * patch, in_channels, num_classes, patch, tuple(depths), tuple(widths),
                     num_heads)
    # prefer the registry's config (same model, configured depths)
    for variant in VARIANTS.values():
        built = tuple(2 * (n // 2) + 1 for n in variant.depths)
        if dataclasses.replace(variant, depths=built) == cfg:
            return variant
    return cfg


def from_official(state_dict, num_heads):
    """Build the model matching a released state_dict (sizes from its shapes) and load it."""
    sd = state_dict.get("state_dict", state_dict.get("model", state_dict))
    cfg = config_from_official(sd, num_heads)
    model = DiMR(cfg)
    load_state_dict_strict(model, {official_key(k): v for k, v in sd.items()},
                           source="release checkpoint")
    return model


# ----------------------------------------------------------------------------------------------
# Command line: summary (parameters, MACs) and conversion

def count(cfg):
    """Parameters and multiply-accumulates (batch 1) per branch, on the meta device (no weights)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        model = DiMR(cfg)
        x = torch.zeros(1, cfg.in_channels, cfg.input_size, cfg.input_size)
        t, y = torch.full((1,), 500.0), torch.zeros(1, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            model(x, t, y)
    flops = counter.get_flop_counts()
    rows = []
    for r, b in enumerate(model.branches):
        name = f"branch {r + 1} ({'Transformer' if r == 0 else 'ConvNeXt'}, {cfg.widths[r]}-d, " \
               f"{len(b.blocks)} blocks, {cfg.input_size // cfg.patch_sizes[r]}^2)"
        macs = sum(flops.get(f"DiMR.branches.{r}", {}).values()) // 2
        rows.append((name, sum(p.numel() for p in b.parameters()), macs))
    rest = sum(p.numel() for p in model.parameters()) - sum(r[1] for r in rows)
    rows.append(("embeddings (class, time)", rest, 0))
    return rows


def print_summary(name, cfg):
    rows = count(cfg)
    print(f"{name}: input {cfg.input_size}x{cfg.input_size}x{cfg.in_channels}, "
          f"norm={cfg.norm}, mlp={cfg.mlp}")
    for label, params, macs in rows:
        print(f"  {label:<58} {params:>15,} params {macs / 1e9:9.2f} GMACs")
    print(f"  {'total':<58} {sum(r[1] for r in rows):>15,} params "
          f"{sum(r[2] for r in rows) / 1e9:9.2f} GMACs")


# Table 5 (ImageNet 64, 300K steps): U-ViT-M/4 -> DiMR-M/3R, with the paper's parameter counts.
TABLE5 = [
    ("U-ViT-M/4 baseline", dict(depths=(17,), widths=(768,), norm="ln", mlp="gelu"), 130.9),
    ("+ adaLN-Zero", dict(depths=(17,), widths=(768,), norm="adaln_zero", mlp="gelu"), 202.4),
    ("adaLN-Zero + multi-branch", dict(norm="adaln_zero", mlp="gelu"), 217.9),
    ("TD-LN + multi-branch", dict(mlp="gelu"), 154.0),
    ("+ GLU (= DiMR-M/3R)", dict(), 132.9),
]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] + " Without a command: print "
                                "parameters and GMACs (batch 1) per branch of a variant.")
    p.add_argument("--variant", choices=VARIANT_CHOICES, default="xl", help="variant to summarise")
    p.add_argument("--table5", action="store_true",
                   help="parameter counts of the Table 5 ablations")
    sub = p.add_subparsers(dest="command")
    c = sub.add_parser("convert", help="convert an authors' release checkpoint to ours")
    c.add_argument("src", help="the release's .pth (a state_dict)")
    c.add_argument("dst", help="output checkpoint (.pt) for sample.py")
    c.add_argument("--heads", type=int, required=True, help="attention heads (16 for XL and G)")
    args = p.parse_args(argv)
    try:
        if args.command == "convert":
            model = from_official(checkpoints.load(args.src), args.heads)
            sd = model.state_dict()
            checkpoints.save({"config": dataclasses.asdict(model.config), "model": sd, "ema": sd},
                             args.dst)
            print(f"wrote {args.dst}: {sum(v.numel() for v in sd.values()):,} parameters, "
                  f"config {model.config}")
        elif args.table5:
            base = VARIANTS["DiMR-M/3R"]
            for label, overrides, paper in TABLE5:
                if len(overrides.get("depths", base.depths)) == 1:
                    overrides = dict(overrides, patch_size=4)
                params = sum(r[1] for r in count(dataclasses.replace(base, **overrides)))
                print(f"{label:<28} {params / 1e6:7.1f}M params (paper: {paper}M)")
        else:
            print_summary(ALIASES.get(args.variant, args.variant), get_config(args.variant))
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
