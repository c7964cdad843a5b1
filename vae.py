"""The Stable Diffusion autoencoder (KL-f8) that maps 256/512 px images to DiMR's latent space.

Paper Sec. 4 (ImageNet 256x256 and 512x512): like LDM, DiT and U-ViT, DiMR-XL/2R, G/2R and
XL/3R are trained on the latents of the Stable Diffusion VAE, a KL-regularised autoencoder with
downsampling factor 8 and 4 latent channels (256x256x3 -> 32x32x4), scaled by 0.18215 so that
the latents have roughly unit variance. This module is the one place that knows about the VAE:
the latent scale, loading it through `diffusers` (an optional extra, imported only here, only
when needed), encoding (extract_latents.py) and decoding (sample.py).

Which weights: the release decodes with U-ViT's converted Stable Diffusion autoencoder
("autoencoder_kl_ema.pth"). The hub's `stabilityai/sd-vae-ft-ema` and `-ft-mse` fine-tuned only
the decoder of that autoencoder, so their encoder gives the same latents; their decoders differ
slightly from the release's. We default to ft-EMA, the EMA one (as DiT does for its FID numbers).

Encoding uses the posterior mean, not a sample. The release stores the posterior moments (mean and
log-variance) and draws a fresh sample each time it reads a latent; DiT stores one fixed sample. We
store 4 channels like DiT, and the mean keeps extraction deterministic (a resumed or re-run shard is
bit-identical); what is lost is the posterior noise, of the posterior's standard deviation.
"""
from pathlib import Path

import torch

LATENT_SCALE = 0.18215  # latents = scale * posterior mean (LDM's scale factor for this VAE)
LATENT_CHANNELS = 4  # a DiMR config with 4 input channels is a latent model
DOWNSAMPLE = 8  # image side / latent side (KL-f8)
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
# Images per VAE call: at 512 px one activation of the decoder's last block is 128 x 512 x 512
# floats (134 MB per image in fp32) and several are alive at once, so a batch of 64 goes in chunks.
VAE_CHUNK = 8
INSTALL_HINT = "pip install -r requirements-latent.txt"


def is_latent(config):
    """Whether a DiMR config works on VAE latents (decode before saving images)."""
    return config.in_channels == LATENT_CHANNELS


def load_vae(name_or_path=DEFAULT_VAE, device="cpu"):
    """A diffusers AutoencoderKL from a local directory (save_pretrained layout) or a hub name.

    Hub names need network access the first time; on an offline machine download the model
    elsewhere (`huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir DIR`) and pass DIR.
    """
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise ImportError(f"latent models need the optional `diffusers` package: {INSTALL_HINT}") from None
    name = str(name_or_path)
    local = Path(name).expanduser()
    if not local.exists() and name.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"VAE directory not found: {name}")
    try:
        # low_cpu_mem_usage=False: the default wants the `accelerate` package and warns without it
        vae = AutoencoderKL.from_pretrained(str(local) if local.exists() else name, low_cpu_mem_usage=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load the VAE {name!r} (a local diffusers directory or a hub name; "
                         f"offline, download it elsewhere and pass its directory): "
                         f"{str(e).splitlines()[0][:200]}") from None
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def encode(vae, images, chunk=VAE_CHUNK):
    """Images in [-1, 1] (B, 3, H, W) -> scaled latents (B, 4, H/8, W/8): LATENT_SCALE * posterior mean,
    `chunk` images per call."""
    return torch.cat([vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean * LATENT_SCALE
                      for x in images.split(chunk)])


@torch.no_grad()
def decode(vae, latents, chunk=VAE_CHUNK):
    """Scaled latents (B, 4, h, w) -> images (B, 3, 8h, 8w), nominally in [-1, 1] (not clipped),
    `chunk` latents per call."""
    return torch.cat([vae.decode(z.to(vae.device, vae.dtype) / LATENT_SCALE).sample for z in latents.split(chunk)])
