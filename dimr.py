"""DiMR: the multi-resolution diffusion network (paper Sec. 3.1-3.3, Fig. 3, Tables 1, 5, 6).

A cascade of R branches, low resolution to high. Branch 1 is a Transformer on a coarse token
grid (16x16 for the paper's models); branches 2..R are ConvNeXt-style conv branches, each at twice
the resolution and half the width of the one before. Every branch patchifies the *input* with
kernel = stride = p_r (p_r = p_1 / 2^(r-1): with R > 1 the last branch sees single pixels), is U-ViT
shaped (long skips from the first half of its blocks to the second), predicts the noise at its own
resolution (multi-scale loss, Sec. 3.2), and hands *all* its feature maps to the next branch
through the feature cascade (Sec. 3.1). Time enters only through TD-LN (Sec. 3.3, td_ln.py);
the class enters as one token prepended to the Transformer branch.

Call convention: model(x, n, y) with x (B, C, H, W), n float (B,) DDPM steps on the 0..1000
scale, y int64 (B,) where y == num_classes is the null class of classifier-free guidance. It
returns one noise prediction per branch, lowest resolution first; the last is full resolution.
docs/shapes.md follows one forward pass of DiMR-M/3R and DiMR-XL/2R through every stage.

Read top to bottom: the config and the variant registry (Tables 1, 2, 6), the blocks, the feature
cascade and the output head, a branch, the network; then, in a section of their own, the Table 5
ablations (plain LN with a time token, adaLN-Zero, the 4x GELU MLP), which the paper's path only
names. Parameter and MAC counts: `python -m tools.count`; the authors' checkpoints:
support/checkpoints.py.
"""
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from td_ln import TDLayerNorm, TDRMSNorm, per_sample, t_tilde

NORMS = ("td", "adaln_zero", "ln")  # Table 5: TD-LN (the paper's), adaLN-Zero (DiT), LN (U-ViT)
MLPS = ("glu", "gelu")              # Table 5: GLU with hidden 2D, or the usual 4D GELU MLP


# ----------------------------------------------------------------------------------------------
# Configuration and variants

@dataclass(frozen=True)
class DiMRConfig:
    input_size: int = 32          # H = W of the model input (latent or pixels)
    in_channels: int = 4          # C
    num_classes: int = 1000       # class id num_classes is the null class
    patch_size: int = 2           # p_1 of the Transformer branch; each further branch halves it
    depths: tuple = (39, 20)      # configured blocks N_r per branch (builds 2 floor(N/2) + 1)
    widths: tuple = (960, 480)    # D_r per branch
    num_heads: int = 16
    norm: str = "td"              # one of NORMS
    mlp: str = "glu"              # one of MLPS

    def __post_init__(self):
        object.__setattr__(self, "depths", tuple(self.depths))
        object.__setattr__(self, "widths", tuple(self.widths))
        check_config(self)

    @property
    def num_branches(self):  # R
        return len(self.depths)

    @property
    def patch_sizes(self):  # (p_1, ..., p_R)
        return tuple(self.patch_size // 2 ** r for r in range(self.num_branches))

    @property
    def blocks(self):
        """Blocks built per branch: U-ViT's first half, a middle block, a second half."""
        return tuple(2 * (N // 2) + 1 for N in self.depths)


def check_config(config):
    """One ValueError naming every problem of a config (sizes first: the rest divides by them)."""
    sizes = [f"{k} must be >= 1, got {v}" for k, v in vars(config).items()
             if isinstance(v, int) and v < 1]
    sizes += [f"{k} must all be >= 1, got {v}"
              for k, v in (("depths", config.depths), ("widths", config.widths)) if min(v) < 1]
    if sizes or not 1 <= len(config.depths) == len(config.widths):
        raise ValueError("bad DiMR config: " + "; ".join(sizes or [
            f"depths {config.depths} and widths {config.widths} need one entry per branch"]))
    R = len(config.depths)
    problems = [f"norm must be one of {NORMS}, got {config.norm!r}"] * (config.norm not in NORMS)
    problems += [f"mlp must be one of {MLPS}, got {config.mlp!r}"] * (config.mlp not in MLPS)
    problems += [f"patch_size must be 2^(R-1) = {2 ** (R - 1)} for {R} branches, got "
                 f"{config.patch_size}"] * (R > 1 and config.patch_size != 2 ** (R - 1))
    problems += [f"input_size {config.input_size} is not a multiple of patch_size "
                 f"{config.patch_size}"] * bool(config.input_size % config.patch_size)
    problems += [f"width {config.widths[0]} is not divisible by num_heads "
                 f"{config.num_heads}"] * bool(config.widths[0] % config.num_heads)
    if problems:
        raise ValueError("bad DiMR config: " + "; ".join(problems))


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
    if name not in VARIANT_CHOICES:
        raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANT_CHOICES)}")
    return dataclasses.replace(VARIANTS[ALIASES.get(name, name)], **overrides)


def variant_name(config):
    """The registry's name of a config ('DiMR-M/3R'), else what its input is."""
    found = [name for name, c in VARIANTS.items() if c == config]
    return found[0] if found else f"a {config.input_size}x{config.input_size}x" \
                                  f"{config.in_channels} model"


def config_from_dict(d):
    """Rebuild a config stored in a checkpoint (a plain dict, as nanoGPT stores it)."""
    unknown = set(d) - {f.name for f in dataclasses.fields(DiMRConfig)}
    if unknown:
        raise ValueError(f"checkpoint config has unknown fields: {sorted(unknown)}")
    return DiMRConfig(**d)


# ----------------------------------------------------------------------------------------------
# Blocks. Every norm and block is called as f(x, cond): cond is t~ (B,) with TD-LN, the paper's
# network; the Table 5 ablations pass their own condition (see the last section).

def make_norm(config, dim, pre_norm):
    """TD-RMSNorm before each block's attention and MLP, TD-LayerNorm in the feature cascade and
    the output heads (the release's "TDRMSN"); a Table 5 norm otherwise (ablation_norm)."""
    if config.norm == "td":
        return TDRMSNorm(dim) if pre_norm else TDLayerNorm(dim)
    return ablation_norm(config, dim)


class GLU(nn.Module):
    """Gated MLP (Sec. 3.1): W2(GELU(W0 x) * W1 x), hidden width 2D, replacing U-ViT's 4D MLP."""

    def __init__(self, dim):
        super().__init__()
        self.w0 = nn.Linear(dim, 2 * dim)
        self.w1 = nn.Linear(dim, 2 * dim)
        self.w2 = nn.Linear(2 * dim, dim)

    def forward(self, x):                                                   # (..., D)
        return self.w2(F.gelu(self.w0(x)) * self.w1(x))


def make_mlp(config, dim):
    return GLU(dim) if config.mlp == "glu" else GeluMLP(dim)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):                                                   # (B, L, D)
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                            # 3 x (B, heads, L, D/heads)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, L, D))


class TransformerBlock(nn.Module):
    """x = x + Attn(norm(x)); x = x + GLU(norm(x)), on tokens (B, L, D)."""

    def __init__(self, config, dim):
        super().__init__()
        self.norm1 = make_norm(config, dim, pre_norm=True)
        self.attn = Attention(dim, config.num_heads)
        self.norm2 = make_norm(config, dim, pre_norm=True)
        self.mlp = make_mlp(config, dim)

    def forward(self, x, cond):
        x = x + self.attn(self.norm1(x, cond))
        return x + self.mlp(self.norm2(x, cond))


class ConvNeXtBlock(nn.Module):
    """x = x + DWConv7x7(x) (no norm before it); x = x + GLU(norm(x)), on maps (B, H, W, D)."""

    def __init__(self, config, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = make_norm(config, dim, pre_norm=True)
        self.mlp = make_mlp(config, dim)

    def forward(self, x, cond):
        x = x + self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)     # conv on (B, D, H, W)
        return x + self.mlp(self.norm(x, cond))


def make_block(config, dim, transformer):
    """Branch 1's Transformer block or a ConvNeXt block; with adaLN-Zero (Table 5), the same block
    with DiT's residual gates."""
    if config.norm == "adaln_zero":
        return (GatedTransformerBlock if transformer else GatedConvNeXtBlock)(config, dim)
    return (TransformerBlock if transformer else ConvNeXtBlock)(config, dim)


# ----------------------------------------------------------------------------------------------
# Feature cascade, output head, branch

def pixel_shuffle(x, k):
    """(B, h, w, k*k*D) -> (B, h*k, w*k, D): channel (i*k + j)*D + c of cell (a, b) goes to
    pixel (a*k + i, b*k + j)."""
    B, h, w, C = x.shape
    x = x.view(B, h, w, k, k, C // (k * k)).permute(0, 1, 3, 2, 4, 5)      # (B, h, i, w, j, D)
    return x.reshape(B, h * k, w * k, C // (k * k))


class Cascade(nn.Module):
    """Feature cascade (Sec. 3.1): all M feature maps of branch r, concatenated on channels ->
    one TD-LN over M D_r -> linear -> pixel shuffle to branch r+1's resolution -> TD-LN; added to
    branch r+1's input embedding."""

    def __init__(self, config, in_dim, out_dim, ratio):
        super().__init__()
        self.ratio = ratio
        self.norm_in = make_norm(config, in_dim, pre_norm=False)
        self.proj = nn.Linear(in_dim, out_dim * ratio ** 2)
        self.norm_out = make_norm(config, out_dim, pre_norm=False)

    def forward(self, maps, cond):  # list of M maps (B, h, w, D_r): branch r's input and blocks
        x = self.norm_in(torch.cat(maps, dim=-1), cond)                     # (B, h, w, M*D_r)
        x = pixel_shuffle(self.proj(x), self.ratio)                         # (B, 2h, 2w, D_r+1)
        return self.norm_out(x, cond)


class Head(nn.Module):
    """Output head of a branch: TD-LN -> Conv3x3(D -> C). A branch with patch p > 1 as the last
    one (only in Table 5's one-branch rows) un-patchifies its p*p*C channels to full resolution."""

    def __init__(self, config, dim, patch):
        super().__init__()
        self.patch = patch
        self.norm = make_norm(config, dim, pre_norm=False)
        self.conv = nn.Conv2d(dim, config.in_channels * patch ** 2, 3, padding=1)

    def forward(self, x, cond):                                             # (B, h, w, D)
        x = self.conv(self.norm(x, cond).permute(0, 3, 1, 2))               # (B, C*p*p, h, w)
        return F.pixel_shuffle(x, self.patch) if self.patch > 1 else x


class Branch(nn.Module):
    """One resolution of the cascade: patchify + position embedding (+ the cascade from the branch
    below), U-ViT-shaped blocks (first half pushes to a stack, middle block, second half pops
    through Linear(2D -> D)), output head."""

    def __init__(self, config, r):
        super().__init__()
        D, p = config.widths[r], config.patch_sizes[r]
        self.is_transformer = r == 0
        self.grid = config.input_size // p
        self.patch_embed = nn.Conv2d(config.in_channels, D, p, stride=p)
        self.pos_embed = nn.Parameter(torch.zeros(self.grid ** 2, D))       # row a*grid + b
        if r > 0:
            num_maps = config.blocks[r - 1] + 1   # the input of the first block and every block
            self.cascade = Cascade(config, num_maps * config.widths[r - 1], D, 2)
        self.blocks = nn.ModuleList(make_block(config, D, self.is_transformer)
                                    for _ in range(config.blocks[r]))
        self.skips = nn.ModuleList(nn.Linear(2 * D, D) for _ in range(config.blocks[r] // 2))
        self.head = Head(config, D, p if r == config.num_branches - 1 else 1)
        self.grad_checkpointing = False

    def forward(self, x, cond, extra_tokens, below):
        """x (B, C, H, W); below: the feature maps of the branch below (None for branch 1).
        Returns its noise prediction (B, C, H_r, W_r) and its feature maps, each (B, h, w, D)."""
        x = self.patch_embed(x).permute(0, 2, 3, 1).contiguous()            # (B, h, w, D)
        B, h, w, D = x.shape
        x = x + self.pos_embed.view(self.grid, self.grid, D)[:h, :w]
        if below is not None:
            x = x + self.cascade(below, cond)
        maps = [x]                                # every feature map, for the next branch
        E = extra_tokens.shape[1] if self.is_transformer else 0
        if self.is_transformer:                                             # (B, E + h*w, D)
            x = torch.cat([extra_tokens.to(x.dtype), x.flatten(1, 2)], dim=1)

        def as_map(x):  # a block's output as the cascade reads it, without the extra tokens
            return x[:, E:].view(B, h, w, D) if self.is_transformer else x

        half = len(self.skips)
        stack = []
        for block in self.blocks[:half]:                                    # in blocks
            x = self.run(block, x, cond)
            stack.append(x)
            maps.append(as_map(x))
        x = self.run(self.blocks[half], x, cond)                            # middle block
        maps.append(as_map(x))
        for block, skip in zip(self.blocks[half + 1:], self.skips):         # out blocks
            x = self.run(block, skip(torch.cat([x, stack.pop()], dim=-1)), cond)
            maps.append(as_map(x))
        return self.head(maps[-1], cond), maps

    def run(self, block, x, cond):
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, cond, use_reentrant=False)
        return block(x, cond)


# ----------------------------------------------------------------------------------------------
# The network

class DiMR(nn.Module):
    def __init__(self, config: DiMRConfig):
        super().__init__()
        self.config = config
        D1 = config.widths[0]
        self.class_embed = nn.Embedding(config.num_classes + 1, D1)         # last row: null class
        if config.norm == "adaln_zero":  # Table 5's DiT rows: c = SiLU(time MLP + class embedding)
            self.time_embed = TimeEmbedding(D1)
        self.branches = nn.ModuleList(Branch(config, r) for r in range(config.num_branches))
        self.reset_parameters()

    def reset_parameters(self):
        """U-ViT's initialisation: linears and embeddings ~ N(0, 0.02) truncated, zero biases;
        the norms' gains start at 1 and biases at 0 (TD parameters constant in time); adaLN-Zero's
        modulation and gates at 0."""
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

    def condition(self, n, y):
        """What the norms see (cond) and the tokens prepended to the Transformer branch: with
        TD-LN, t~ (B,) and the class token (B, 1, D_1); the ablations' in ablation_condition."""
        y_emb = self.class_embed(y)                                         # (B, D_1)
        if self.config.norm != "td":
            return ablation_condition(self, n, y_emb)
        return t_tilde(n), y_emb[:, None]

    def forward(self, x, n, y):
        cond, extra_tokens = self.condition(n, y)
        predictions, maps = [], None
        for branch in self.branches:
            eps_r, maps = branch(x, cond, extra_tokens, maps)
            predictions.append(eps_r)
        return predictions                 # [(B, C, H_r, W_r)], lowest resolution first


# ----------------------------------------------------------------------------------------------
# Table 5's ablations: what the paper compares TD-LN and GLU against. The network above reaches
# them only through make_norm, make_mlp, make_block and DiMR.condition.

TIME_EMBED_DIM = 256  # DiT's sinusoidal time embedding (adaLN-Zero only)


def ablation_norm(config, dim):
    """U-ViT's plain LN (time enters as a token), or DiT's adaLN conditioned on c (B, D_1)."""
    return LayerNorm(dim) if config.norm == "ln" else AdaLN(dim, config.widths[0])


def ablation_condition(model, n, y_emb):
    """U-ViT: no condition for the norms, a time token and the class token (B, 2, D_1).
    DiT: c = SiLU(MLP(time embedding) + class embedding) (B, D_1) for every norm, no tokens."""
    if model.config.norm == "ln":
        return None, torch.stack([timestep_embedding(n, y_emb.shape[-1]), y_emb], dim=1)
    c = F.silu(model.time_embed(timestep_embedding(n, TIME_EMBED_DIM)) + y_emb)
    return c, y_emb.new_empty(y_emb.shape[0], 0, y_emb.shape[1])          # (B, 0, D_1)


def timestep_embedding(n, dim, max_period=10000):
    """Sinusoidal embedding of the DDPM step n, (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=n.device) / half)
    args = n.float()[:, None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimeEmbedding(nn.Sequential):
    """DiT's MLP on the sinusoidal time embedding: Linear -> SiLU -> Linear, (B, 256) -> (B, D)."""

    def __init__(self, dim):
        super().__init__(nn.Linear(TIME_EMBED_DIM, dim), nn.SiLU(), nn.Linear(dim, dim))


class LayerNorm(nn.LayerNorm):
    """Plain LN (U-ViT): time-independent; time enters as a token instead."""

    def forward(self, x, cond=None):
        return super().forward(x)


class AdaLN(nn.Module):
    """adaLN (DiT): LN without affine, then shift/scale regressed from c, zero-initialised."""

    def __init__(self, dim, cond_dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Linear(cond_dim, 2 * dim)

    def forward(self, x, c):                                                # c: (B, cond_dim)
        shift, scale = self.modulation(c).chunk(2, dim=-1)
        return self.norm(x) * (1 + per_sample(scale, x)) + per_sample(shift, x)


class Gates(nn.Module):
    """adaLN-Zero's residual gates, zero-initialised so every block starts as the identity."""

    def __init__(self, num, dim, cond_dim):
        super().__init__()
        self.num = num
        self.linear = nn.Linear(cond_dim, num * dim)

    def forward(self, c):
        return self.linear(c).chunk(self.num, dim=-1)


class GatedTransformerBlock(TransformerBlock):
    """adaLN-Zero's Transformer block: x = x + g1(c) Attn(norm(x)); x = x + g2(c) MLP(norm(x))."""

    def __init__(self, config, dim):
        super().__init__(config, dim)
        self.gates = Gates(2, dim, config.widths[0])

    def forward(self, x, c):
        g1, g2 = self.gates(c)
        x = x + per_sample(g1, x) * self.attn(self.norm1(x, c))
        return x + per_sample(g2, x) * self.mlp(self.norm2(x, c))


class GatedConvNeXtBlock(ConvNeXtBlock):
    """adaLN-Zero's ConvNeXt block: the gate g(c) on the MLP's residual."""

    def __init__(self, config, dim):
        super().__init__(config, dim)
        self.gates = Gates(1, dim, config.widths[0])

    def forward(self, x, c):
        x = x + self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        (g,) = self.gates(c)
        return x + per_sample(g, x) * self.mlp(self.norm(x, c))


class GeluMLP(nn.Module):
    """The usual Transformer MLP (hidden 4D), Table 5's rows before '+ GLU'."""

    def __init__(self, dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))
