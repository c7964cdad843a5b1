"""Encode an ImageNet-style image folder into Stable Diffusion VAE latents for the 256/512 px
models.

Paper Sec. 4: DiMR-XL/2R, G/2R (ImageNet 256) and XL/3R (ImageNet 512) are trained in the latent
space of the Stable Diffusion KL-f8 VAE (support/vae.py), as in LDM, DiT and U-ViT. Preprocessing
follows the release: ADM's center crop (support/data.center_crop_arr) to --image-size, and every
image is stored twice, as is and horizontally flipped, so training needs no flip of its own.

Output: a directory of shards in the latent format support/data.py reads: SHARD_NAME.format(k)
holds the
images k*S .. (k+1)*S - 1 of the folder (classes and files in sorted order, S = --shard-size) as
LATENTS_KEY float [2S, 4, size/8, size/8] (already multiplied by vae.LATENT_SCALE; rows 2i and
2i + 1 are image i and its flip) and LABELS_KEY int64 [2S]; plus classes.txt (class id = line).

    torchrun --nproc_per_node=8 -m tools.extract_latents --data-path IMAGENET/train \
        --image-size 256 \
        --out latents/in256 --vae stabilityai/sd-vae-ft-ema --npy latents/in256.npy

Process r encodes shards r, r + W, r + 2W, ...; each shard is written atomically (temporary file +
rename) and shards that exist are skipped, so an interrupted run resumes by running it again.
--npy finally concatenates the shards into one .npy (+ _labels.npy) that train.py memory-maps;
rank 0 does that alone while the other processes exit.
"""
import argparse
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from support import checkpoints, data, distributed, vae as vae_lib
from support.cli import Parser, add_threads_flag, number
from support.progress import Progress

DTYPES = {"float16": np.float16, "float32": np.float32}


def shard_samples(samples, shard_size):
    """[(path, label)] -> one list per shard, in order."""
    return [samples[k:k + shard_size] for k in range(0, len(samples), shard_size)]


def save_shard(path, latents, labels):
    """np.savez, atomically (never a truncated shard)."""
    with checkpoints.atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **{data.LATENTS_KEY: latents, data.LABELS_KEY: labels})


def encode_shard(vae, samples, image_size, batch_size, workers, dtype, progress=None):
    """Latents (2n, 4, h, w) and labels (2n,) of n images: rows 2i, 2i + 1 = image i, its flip."""
    loader = DataLoader(data.ImageFolderDataset(samples, image_size), batch_size=batch_size,
                        num_workers=workers, shuffle=False)
    latents, labels = [], []
    for x, y in data.batches(loader):                                      # (B, 3, S, S) in [-1, 1]
        z = vae_lib.encode(vae, torch.cat([x, x.flip(3)]))                 # (2B, 4, S/8, S/8)
        z, z_flip = z.float().cpu().chunk(2)
        latents.append(torch.stack([z, z_flip], dim=1).flatten(0, 1).numpy().astype(dtype))
        labels.append(y.repeat_interleave(2).numpy())
        if progress:
            progress.update(len(y))
    return np.concatenate(latents), np.concatenate(labels).astype(np.int64)


def merge_to_npy(shard_paths, out_npy):
    """Concatenate shards into OUT.npy + OUT_labels.npy, one shard in memory at a time.

    Both are written to temporary files first; the latents are renamed into place, then the labels,
    so a reader never pairs new latents with old labels (for an instant it may find no labels yet).
    """
    with np.load(shard_paths[0]) as f:
        sample_shape, dtype = f[data.LATENTS_KEY].shape[1:], f[data.LATENTS_KEY].dtype
    counts = []
    for p in shard_paths:
        with np.load(p) as f:
            counts.append(len(f[data.LABELS_KEY]))
    with checkpoints.atomic_write(data.labels_npy_path(out_npy)) as tmp_labels, \
            checkpoints.atomic_write(out_npy) as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype,
                                        shape=(sum(counts), *sample_shape))
        labels, start = [], 0
        for p, n in zip(shard_paths, counts):
            with np.load(p) as f:
                arr[start:start + n] = f[data.LATENTS_KEY]
                labels.append(f[data.LABELS_KEY])
            start += n
        arr.flush()
        del arr
        with open(tmp_labels, "wb") as f:
            np.save(f, np.concatenate(labels).astype(np.int64))


def build_parser():
    p = Parser(
        description="Encode a class-per-folder image directory (ImageNet train layout) into "
                    "shards of Stable Diffusion VAE latents, each image and its horizontal flip, "
                    "for train.py. Multi-process with torchrun; resumable (existing shards are "
                    "skipped).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-path", required=True, help="image folder with one sub-folder per class")
    p.add_argument("--image-size", type=number(int, vae_lib.DOWNSAMPLE), required=True,
                   help="ADM center crop size in pixels (256 or 512 in the paper); the latents "
                        "are size/8 on a side")
    p.add_argument("--out", required=True, help="output directory of shard_NNNNN.npz")
    p.add_argument("--vae", default=vae_lib.DEFAULT_VAE,
                   help="diffusers AutoencoderKL directory or hub name")
    p.add_argument("--shard-size", type=number(int, 1), default=10000,
                   help="source images per shard (each shard stores 2x as many latents, with the "
                        "flips)")
    p.add_argument("--batch-size", type=number(int, 1), default=64,
                   help="images per VAE forward pass (per process; the flips double it)")
    p.add_argument("--workers", type=number(int, 0), default=8,
                   help="image decoding worker processes per process")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float16",
                   help="storage type; float16 rounds by at most 2^-11 relative, far below the "
                        "noise std sqrt(beta_1) = 0.029 of the smallest diffusion step")
    p.add_argument("--npy", default=None,
                   help="after all shards exist, also write them as one memory-mappable NPY (and "
                        "NPY's _labels.npy), which train.py reads without loading it into each "
                        "process's memory")
    add_threads_flag(p)
    return p


def run(args):
    if args.image_size % vae_lib.DOWNSAMPLE:
        raise ValueError(f"--image-size must be a multiple of {vae_lib.DOWNSAMPLE}, "
                         f"got {args.image_size}")
    if not Path(args.data_path).is_dir():
        raise FileNotFoundError(f"--data-path {args.data_path}: no such directory")
    device = distributed.init()
    distributed.set_threads(args.threads)
    rank, world = distributed.rank(), distributed.world_size()
    folder = data.image_folder(args.data_path, args.image_size)
    samples = folder.dataset.samples
    shards = shard_samples(samples, args.shard_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / data.SHARD_NAME.format(k) for k in range(len(shards))]
    todo = [k for k in range(rank, len(shards), world) if not paths[k].exists()]
    distributed.print0(f"{folder.description}; {len(shards)} shards of {args.shard_size} images, "
                       f"{sum(1 for p in paths if p.exists())} already done; {world} process(es)")
    if distributed.is_main():
        checkpoints.write_text(out / "classes.txt",
                               "".join(f"{name}\n" for name in folder.class_names))

    if todo:
        vae = vae_lib.load_vae(args.vae, device)
        progress = Progress(f"extract (rank 0 of {world})" if world > 1 else "extract",
                            sum(len(shards[k]) for k in todo)) if distributed.is_main() else None
        for k in todo:
            latents, labels = encode_shard(vae, shards[k], args.image_size, args.batch_size,
                                           args.workers, DTYPES[args.dtype], progress)
            save_shard(paths[k], latents, labels)
    distributed.barrier()  # every shard is written
    if args.npy and distributed.is_main():
        merge_to_npy(paths, args.npy)
        print(f"wrote {args.npy} and {data.labels_npy_path(args.npy)}", flush=True)
    distributed.print0(f"done: {len(paths)} shards, {2 * len(samples)} latents in {out}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    distributed.run_main(lambda: run(args))


if __name__ == "__main__":
    main()
