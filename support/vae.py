"""The Stable Diffusion autoencoder (KL-f8) that maps 256/512 px images to DiMR's latent space.

Paper Sec. 4 (ImageNet 256x256 and 512x512): like LDM, DiT and U-ViT, DiMR-XL/2R, G/2R and
XL/3R are trained on the latents of the Stable Diffusion VAE, a KL-regularised autoencoder with
downsampling factor 8 and 4 latent channels (256x256x3 -> 32x32x4), scaled by 0.18215 so that
the latents have roughly unit variance. This module is the one place that knows about the VAE:
the latent scale, loading it through `diffusers` (an optional extra, imported only here, only
when needed), encoding (tools/extract_latents.py) and decoding (sample.py).

Which weights: the release decodes with U-ViT's `autoencoder_kl_ema.pth` (and extracts its
training latents with `autoencoder_kl.pth`), Stable Diffusion autoencoders stored with LDM's
module names; U-ViT does not say which Stable Diffusion checkpoints they were converted from.
`load_vae` reads such a file directly (`from_ldm` renames its weights to diffusers' AutoencoderKL),
so passing `autoencoder_kl_ema.pth` decodes with the release's exact weights. Without it we
default to the hub's `stabilityai/sd-vae-ft-ema` (as DiT does for its FID numbers), whose encoder
is the original Stable Diffusion encoder and whose decoder is EMA-fine-tuned.

Decoding is the release's `FrozenAutoencoderKL.decode`: latents / 0.18215, post_quant_conv, the
decoder. The release runs it under fp16 autocast on the GPU; here it runs in the VAE's dtype
(float32 as loaded).

Encoding uses the posterior mean, not a sample. The release stores the posterior moments (mean and
log-variance) and draws a fresh sample each time it reads a latent; DiT stores one fixed sample. We
store 4 channels like DiT, and the mean keeps extraction deterministic (a resumed or re-run shard is
bit-identical); what is lost is the posterior noise, of the posterior's standard deviation.
"""
import re
from pathlib import Path

import torch

from support import checkpoints

LATENT_SCALE = 0.18215  # latents = scale * posterior mean (LDM's scale factor for this VAE)
LATENT_CHANNELS = 4  # a DiMR config with 4 input channels is a latent model
DOWNSAMPLE = 8  # image side / latent side (KL-f8)
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
# Images per VAE call: at 512 px one activation of the decoder's last block is 128 x 512 x 512
# floats (134 MB per image in fp32) and several are alive at once, so a batch of 64 goes in chunks.
VAE_CHUNK = 8
INSTALL_HINT = "pip install -r requirements-latent.txt"

# The KL-f8 autoencoder as diffusers' AutoencoderKL arguments: LDM's ddconfig in the release's
# libs/autoencoder.py (ch 128, ch_mult (1, 2, 4, 4), 2 res blocks, z and embed_dim 4, GroupNorm
# with 32 groups, attention only in the middle blocks) and its scale factor.
KL_F8 = dict(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
             block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
             act_fn="silu", sample_size=256, scaling_factor=LATENT_SCALE)

# LDM module names (the release's .pth) -> diffusers' AutoencoderKL, applied in order to every key
# once the decoder's up-block index is in decoding order. Attention q/k/v/proj_out are 1x1
# convolutions in LDM and linear layers in diffusers (same numbers, kernel dims dropped).
LDM_TO_DIFFUSERS = (
    (r"\.down\.(\d+)\.block\.", r".down_blocks.\1.resnets."),
    (r"\.down\.(\d+)\.downsample\.", r".down_blocks.\1.downsamplers.0."),
    (r"\.up\.(\d+)\.block\.", r".up_blocks.\1.resnets."),
    (r"\.up\.(\d+)\.upsample\.", r".up_blocks.\1.upsamplers.0."),
    (r"\.mid\.block_1\.", ".mid_block.resnets.0."),
    (r"\.mid\.block_2\.", ".mid_block.resnets.1."),
    (r"\.mid\.attn_1\.norm\.", ".mid_block.attentions.0.group_norm."),
    (r"\.mid\.attn_1\.([qkv])\.", r".mid_block.attentions.0.to_\1."),
    (r"\.mid\.attn_1\.proj_out\.", ".mid_block.attentions.0.to_out.0."),
    (r"\.nin_shortcut\.", ".conv_shortcut."),
    (r"\.norm_out\.", ".conv_norm_out."),
)


def _autoencoder_kl():
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise ImportError("latent models need the optional `diffusers` package: "
                          f"{INSTALL_HINT}") from None
    return AutoencoderKL


def is_latent(config):
    """Whether a DiMR config works on VAE latents (decode before saving images)."""
    return config.in_channels == LATENT_CHANNELS


def load_vae(name_or_path=DEFAULT_VAE, device="cpu"):
    """A diffusers AutoencoderKL from an LDM-format state_dict file (the release's
    autoencoder_kl_ema.pth, see `from_ldm`), a local diffusers directory (save_pretrained layout)
    or a hub name.

    Hub names need network access the first time; on an offline machine download the model
    elsewhere (`huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir DIR`) and pass DIR.
    """
    AutoencoderKL = _autoencoder_kl()
    name = str(name_or_path)
    local = Path(name).expanduser()
    if not local.exists() and name.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"VAE file or directory not found: {name}")
    if local.is_file():
        sd = checkpoints.load(local)  # weights_only: a dict of tensors (LDM nests it in state_dict)
        vae = from_ldm(sd.get("state_dict", sd), name)
    else:
        try:
            # low_cpu_mem_usage=False: the default wants the `accelerate` package, warns without it
            vae = AutoencoderKL.from_pretrained(str(local) if local.exists() else name,
                                                low_cpu_mem_usage=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load the VAE {name!r} (an LDM-format .pth file, a local "
                             f"diffusers directory or a hub name; offline, download it elsewhere "
                             f"and pass its directory): {str(e).splitlines()[0][:200]}") from None
    return vae.to(device).eval().requires_grad_(False)


def from_ldm(sd, source="state_dict"):
    """A diffusers AutoencoderKL holding the weights of an LDM-format KL autoencoder state_dict
    (U-ViT's FrozenAutoencoderKL: encoder.*, decoder.*, quant_conv, post_quant_conv).

    The config is KL_F8 with the number of levels, their widths and the res blocks per level read
    from the state_dict, so smaller autoencoders of the same design load too. Every weight must
    find its place with its shape and every place must get a weight; otherwise a ValueError names
    `source` and the first offending keys.
    """
    def fail(what, keys):
        more = f" (and {len(keys) - 3} more)" if len(keys) > 3 else ""
        raise ValueError(f"{source}: not an LDM-format KL autoencoder state_dict: {what} "
                         f"{', '.join(sorted(keys)[:3])}{more}")

    if not isinstance(sd, dict) or not all(isinstance(w, torch.Tensor) for w in sd.values()):
        fail("expected a state_dict of tensors, got", [type(sd).__name__])
    levels = 0
    while f"encoder.down.{levels}.block.0.conv1.weight" in sd:
        levels += 1
    depth = 0
    while f"encoder.down.0.block.{depth}.conv1.weight" in sd:
        depth += 1
    if not levels:
        fail("no key", ["encoder.down.0.block.0.conv1.weight"])
    widths = tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels))
    config = {**KL_F8, "block_out_channels": widths, "layers_per_block": depth,
              "down_block_types": ("DownEncoderBlock2D",) * levels,
              "up_block_types": ("UpDecoderBlock2D",) * levels}
    converted, origin = {}, {}
    for key, w in sd.items():
        # LDM's up[i] is resolution level i, run from i = levels - 1 down; diffusers' up_blocks
        # are numbered in the order they run
        new = re.sub(r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.",
                     key)
        for pattern, replacement in LDM_TO_DIFFUSERS:
            new = re.sub(pattern, replacement, new)
        converted[new] = w.flatten(1) if ".attentions." in new and w.dim() == 4 else w
        origin[new] = key
    vae = _autoencoder_kl()(**config)
    expected = vae.state_dict()
    if unknown := converted.keys() - expected.keys():
        fail("unexpected keys", [origin[k] for k in unknown])
    if missing := expected.keys() - converted.keys():
        fail("no weights for diffusers'", missing)
    if wrong := [f"{origin[k]} {tuple(sd[origin[k]].shape)} (expected {tuple(expected[k].shape)})"
                 for k, w in converted.items() if w.shape != expected[k].shape]:
        fail("wrong shapes", wrong)
    vae.load_state_dict(converted, strict=True)
    return vae


@torch.no_grad()
def encode(vae, images, chunk=VAE_CHUNK):
    """Images in [-1, 1] (B, 3, H, W) -> scaled latents (B, 4, H/8, W/8): LATENT_SCALE * posterior
    mean, `chunk` images per call."""
    return torch.cat([vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean * LATENT_SCALE
                      for x in images.split(chunk)])


@torch.no_grad()
def decode(vae, latents, chunk=VAE_CHUNK):
    """Scaled latents (B, 4, h, w) -> images (B, 3, 8h, 8w), nominally in [-1, 1] (not clipped),
    `chunk` latents per call."""
    if vae is None:
        raise ValueError("this is a latent model: pass a VAE (vae.load_vae) to decode its samples")
    return torch.cat([vae.decode(z.to(vae.device, vae.dtype) / LATENT_SCALE).sample
                      for z in latents.split(chunk)])
