"""Sampling from a trained DiMR: images, a labelled grid and the .npz that FID reads (paper Sec. 4).

The paper's numbers are FID-50K of class-conditional samples, 50 per ImageNet class, drawn with the
release's DPM-Solver (250 steps) and classifier-free guidance (diffusion.guided_eps_fn); DDPM's 1000
ancestral steps are the baseline sampler. The samplers and the guidance live in diffusion.py; this
file turns a checkpoint into images:

- library (train.py uses it): `generate` (model-space samples, image i from the noise of seed i,
  whatever the batch it lands in), `to_uint8`, `save_grid`, `decode_to_uint8` (VAE for latents);
- command line: `python sample.py CKPT --num-images 50000 --out DIR`, or under
  `torchrun --nproc_per_node=8`. The images are cut into batches of --batch-size indices; each
  finished batch is saved as DIR/parts/batch_NNNNNN.npy (atomically), and the processes share the
  unfinished ones. A run that is interrupted (killed, preempted) and started again with the same
  arguments, on any number of processes, samples only the missing batches, so its samples.npz
  equals an uninterrupted run's. At the end the parts are merged into one .npz in index order.

Outputs in --out: grid.png (the first 64 images, each labelled with its class id),
images/000000.png ... (one per image), samples.npz with arr_0 uint8 [N, H, W, 3] (the ADM
evaluation suite's layout) and labels int64 [N].
"""
import argparse
import json
import math
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import checkpoints
import dimr
import distributed
import vae as vae_lib
import diffusion
from diffusion import (DEFAULT_SAMPLER, FEW_STEPS, FEW_STEPS_SAMPLER, ORDERS, RELEASE_SAMPLER,
                       SPACINGS, VARIANTS, ddpm_sample, dpm_solver_sample, sampler_settings)
from progress import Progress

# s of the release's 256 px configs (w = 1 + s = 1.4 in the usual convention)
RELEASE_CFG_SCALE = 0.4
# The default sampler at 25 evaluations solves the ODE at least as accurately as the release's
# FID-50K setting, 250 evaluations of its own sampler (README, "Sampler accuracy").
DEFAULT_STEPS = 25
GRID_MAX = 64  # images in grid.png
GRID_MIN_CELL = 64  # images smaller than this many pixels are upscaled (nearest) in the grid
GRID_PAD = 4  # white pixels around each grid cell
# autocast dtype of the network
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# diffusion.METHODS: UniPC ('unipc', the default) and DPM-Solver++ ('singlestep', 'multistep');
# 'release': the release's sampler (RELEASE_SAMPLER, whatever order and skip say); 'ddpm': DDPM
# ancestral sampling with all 1000 steps.
SAMPLERS = (*diffusion.METHODS, "release", "ddpm")
CLASSES_HELP = ("class of image i: 'even' (image i of N gets class floor(i K / N): exactly N / K "
                "per class, in class order, as the release's FID-50K, when K divides N), a list "
                "'3,1,4' or an inclusive range '0-9' (cycled over the images), or 'random' "
                "(uniform, drawn with --seed)")


# ----------------------------------------------------------------------------------------------
# Library

def image_generators(seeds):
    """One CPU torch.Generator per image, seeded with its seed: x_T is its first standard normal
    (C, H, W), and DDPM's step noise follows from it, so image i is the same whatever the batch
    composition or the number of processes."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def check_labels(labels, num_classes):
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if len(bad):
        raise ValueError(f"class ids {bad[:5].tolist()} out of range 0..{num_classes - 1} "
                         f"(this model has {num_classes} classes)")
    return labels


def solver_settings(method, steps, order=None, skip=None, variant=None, lower_order_final=None):
    """The dpm_solver_sample settings of a run: the release's, or those given over the
    default's."""
    if method == "release":
        return RELEASE_SAMPLER
    return sampler_settings(steps, order=order, method=method, skip=skip, variant=variant,
                            lower_order_final=lower_order_final)


@torch.no_grad()
def generate(model, labels, seeds, steps=DEFAULT_STEPS, cfg_scale=RELEASE_CFG_SCALE,
             decay_power=None, order=None, method=DEFAULT_SAMPLER["method"], skip=None,
             variant=None, lower_order_final=None, batch_size=64, device="cpu", amp_dtype=None):
    """Class-conditional samples in model space (pixels in [-1, 1] or scaled latents), float32 CPU.

    labels: class ids [N]; seeds: one int per image (x_T of image i from seeds[i]);
    cfg_scale: the release's s (0 = no guidance); decay_power: power-cosine decay of the guidance;
    order / method / skip / variant / lower_order_final / steps: diffusion.dpm_solver_sample (None:
    the default's); method 'release': the release's sampler (RELEASE_SAMPLER); 'ddpm': 1000
    ancestral steps (diffusion.ddpm_sample; the other sampler settings unused); amp_dtype: run the
    network under autocast to this dtype (the solver's own arithmetic stays float32).
    Returns [N, C, H, W].
    """
    cfg = model.config
    labels = check_labels(labels, cfg.num_classes)
    seeds = [int(s) for s in seeds]
    if len(seeds) != len(labels):
        raise ValueError(f"{len(labels)} labels but {len(seeds)} seeds")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if method not in SAMPLERS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(SAMPLERS)}")
    solver = solver_settings(method, steps, order, skip, variant, lower_order_final)
    out = []
    for start in range(0, len(labels), batch_size):
        y = labels[start:start + batch_size].to(device)
        generators = image_generators(seeds[start:start + batch_size])
        x_T = torch.stack([torch.randn(cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
                           for g in generators]).to(device)                 # (B, C, H, W)
        eps_fn = diffusion.guided_eps_fn(model, y, cfg_scale, cfg.num_classes, decay_power)
        with torch.autocast(torch.device(device).type, dtype=amp_dtype,
                            enabled=amp_dtype is not None):
            if method == "ddpm":
                x = ddpm_sample(eps_fn, x_T, generator=generators)
            else:
                x = dpm_solver_sample(eps_fn, x_T, steps, **solver)
        out.append(x.float().cpu())
    if not out:
        return torch.empty(0, cfg.in_channels, cfg.input_size, cfg.input_size)
    return torch.cat(out)


def to_uint8(x):
    """Images in [-1, 1] (N, C, H, W), C = 1 or 3 -> uint8 (N, H, W, 3): round(127.5 (x + 1)),
    clipped."""
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images [N, 1 or 3, H, W], got {list(x.shape)}")
    x = torch.clamp(127.5 * x.float() + 128.0, 0, 255).to(torch.uint8)  # floor(v + 0.5) = round
    return x.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).cpu().numpy()


def decode_to_uint8(x, config, vae=None):
    """Model-space samples -> uint8 (N, H, W, 3); latent models go through the VAE decoder first."""
    if vae_lib.is_latent(config):
        if vae is None:
            raise ValueError("this is a latent model: pass a VAE (vae.load_vae) to decode its "
                             "samples")
        x = vae_lib.decode(vae, x)
    return to_uint8(x)


def save_grid(images, labels, path, ncol=None):
    """A grid PNG of uint8 images (N, H, W, 3), each with its class id written under it.

    Images smaller than GRID_MIN_CELL pixels are upscaled by an integer factor (nearest) so that
    8x8 digits stay visible. Returns the upscale factor.
    """
    images = np.asarray(images)
    n, h, w, _ = images.shape
    if n == 0 or len(labels) != n:
        raise ValueError(f"need at least one image and one label per image, got {n} images, "
                         f"{len(labels)} labels")
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    scale = max(1, math.ceil(GRID_MIN_CELL / min(h, w)))
    font = ImageFont.load_default()
    text_h = font.getbbox("0123456789")[3] + 4
    pad = GRID_PAD
    cell_w, cell_h = w * scale + pad, h * scale + text_h + pad
    grid = Image.new("RGB", (ncol * cell_w + pad, nrow * cell_h + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, label) in enumerate(zip(images, labels)):
        x0, y0 = pad + (i % ncol) * cell_w, pad + (i // ncol) * cell_h
        grid.paste(Image.fromarray(image).resize((w * scale, h * scale), Image.NEAREST), (x0, y0))
        draw.text((x0, y0 + h * scale + 1), str(int(label)), fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return scale


# ----------------------------------------------------------------------------------------------
# Command line: classes, index split, .npz

def parse_classes(spec, num, num_classes, seed):
    """Labels [num] from 'even', '3,1,4' (cycled), '0-9' (inclusive range, cycled) or 'random'.

    'even': image i gets class floor(i K / N), so N = 50 K gives the release's
    arange(K).repeat_interleave(50). 'random' draws uniformly from numpy's default_rng(seed).
    """
    spec = spec.strip()
    if spec == "even":
        return np.arange(num, dtype=np.int64) * num_classes // max(num, 1)
    if spec == "random":
        return np.random.default_rng(seed).integers(0, num_classes, num, dtype=np.int64)
    try:
        if "-" in spec[1:]:
            lo, hi = (int(v) for v in spec.split("-", 1))
            if hi < lo:
                raise ValueError
            classes = list(range(lo, hi + 1))
        else:
            classes = [int(v) for v in spec.split(",")]
    except ValueError:
        raise ValueError(f"--classes must be 'even', a list (3,1,4), a range (0-9) or 'random', "
                         f"got {spec!r}") from None
    labels = np.resize(np.array(classes, dtype=np.int64), num)  # cycles through the list
    check_labels(classes, num_classes)
    return labels


def write_npz(path, parts, labels):
    """Stream the uint8 part arrays (read in order, one chunk at a time) into an ADM .npz.

    Keys: arr_0 uint8 [N, H, W, 3] (the concatenation of `parts`) and labels int64 [N]; written
    as np.savez does (an uncompressed zip of .npy files), atomically (checkpoints.atomic_write),
    without ever holding all images in memory (50K 512 px images are 39 GB).
    """
    n = sum(len(p) for p in parts)
    shape = (n, *parts[0].shape[1:])
    with checkpoints.atomic_write(path) as tmp, \
            zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_2_0(
                f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                    "fortran_order": False, "shape": shape})
            for part in parts:
                for start in range(0, len(part), 1024):
                    f.write(np.ascontiguousarray(part[start:start + 1024],
                                                 dtype=np.uint8).tobytes())
        with zf.open("labels.npy", "w") as f:
            np.lib.format.write_array(f, np.asarray(labels, dtype=np.int64))


# ----------------------------------------------------------------------------------------------
# Command line: main

def build_parser():
    p = argparse.ArgumentParser(
        description="Sample class-conditional images from a DiMR checkpoint (ours, or converted "
                    "from the release with `python dimr.py convert`). Writes grid.png, "
                    "images/NNNNNN.png and samples.npz (arr_0 uint8 [N, H, W, 3], labels [N]) to "
                    "--out. Multi-process: torchrun --nproc_per_node=G sample.py ...",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint",
                   help="checkpoint .pt with config and weights (train.py or dimr.py convert)")
    p.add_argument("--out", required=True, help="output directory")
    # not `--num`: torchrun reads abbreviations of its own flags (--numa-binding) after the
    # script too
    p.add_argument("--num-images", type=int, default=64, help="number of images N")
    p.add_argument("--classes", default="even", help=CLASSES_HELP)
    p.add_argument("--seed", type=int, default=0,
                   help="image i starts from the noise of seed SEED + i, whatever the number of "
                        "processes")
    p.add_argument("--cfg-scale", type=float, default=RELEASE_CFG_SCALE,
                   help="classifier-free guidance s in the release's convention "
                        "eps = eps_c + s (eps_c - eps_u) (= guidance scale 1 + s); 0.4 is the "
                        "release's for ImageNet 256; 0 = none (the paper's ImageNet 64 results)")
    p.add_argument("--decay-power", type=float, default=None,
                   help="power-cosine guidance decay: "
                        "w(n) = 1 + s (1 - cos(pi (1 - n/1000)^P)) / 2; default constant guidance")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help="network evaluations of the sampler (with guidance each one pass over a "
                        "doubled batch: conditional and null class); the default sampler at 25 is "
                        "at least as accurate as the release's FID-50K setting, --steps 250 "
                        "--method release")
    few = f"below {FEW_STEPS} steps"
    p.add_argument("--method", choices=SAMPLERS, default=DEFAULT_SAMPLER["method"],
                   help="'unipc': UniPC (Zhao et al. 2023); 'singlestep', 'multistep': "
                        "DPM-Solver++; 'release': the release's own sampler (its dpm_solver.py "
                        "'fast' method, third order on a time-uniform grid; the other sampler "
                        "flags do not apply); 'ddpm': DDPM ancestral sampling with all 1000 steps "
                        "(the baseline; --steps and the other sampler flags do not apply)")
    p.add_argument("--order", type=int, choices=ORDERS, default=None,
                   help=f"solver order (None: {DEFAULT_SAMPLER['order']}, {few} "
                        f"{FEW_STEPS_SAMPLER['order']})")
    p.add_argument("--skip", choices=SPACINGS, default=None,
                   help=f"step spacing (None: {DEFAULT_SAMPLER['skip']})")
    p.add_argument("--variant", choices=VARIANTS, default=None,
                   help=f"UniPC's B(h) (None: {DEFAULT_SAMPLER['variant']}, {few} "
                        f"{FEW_STEPS_SAMPLER['variant']})")
    p.add_argument("--lower-order-final", action=argparse.BooleanOptionalAction, default=None,
                   help=f"UniPC: lower the order of the last steps (None: only {few})")
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="EMA or raw weights")
    p.add_argument("--batch-size", type=int, default=64,
                   help="images per forward pass and per saved batch (a resumed run needs the "
                        "same)")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32",
                   help="the network's arithmetic: fp32, or bf16 / fp16 autocast, faster on GPUs "
                        "but they slightly change the samples (a few pixel levels); the solver "
                        "and the VAE run in fp32")
    p.add_argument("--vae", default=vae_lib.DEFAULT_VAE,
                   help="latent models only: diffusers AutoencoderKL directory or hub name used "
                        "to decode")
    p.add_argument("--no-png", action="store_true", help="do not write images/NNNNNN.png")
    return p


def args_solver(args):
    """solver_settings of the command-line flags."""
    return solver_settings(args.method, args.steps, args.order, args.skip, args.variant,
                           args.lower_order_final)


def check_args(args):
    problems = [f"{flag} must be >= {lo}, got {v}" for flag, v, lo in
                (("--num-images", args.num_images, 1), ("--batch-size", args.batch_size, 1),
                 ("--steps", args.steps,
                  1 if args.method == "ddpm" else args_solver(args)["order"]),
                 ("--seed", args.seed, 0), ("--cfg-scale", args.cfg_scale, 0))
                if v < lo]
    if args.decay_power is not None and args.decay_power <= 0:
        problems.append(f"--decay-power must be > 0, got {args.decay_power}")
    if problems:
        raise ValueError("; ".join(problems))


def batch_path(parts, b):
    return parts / f"batch_{b:06d}.npy"


def open_parts(parts, settings):
    """The finished batches of DIR/parts, after checking that they were sampled with the same
    settings (parts/settings.json, written by the first run). Rank 0 creates the folder and
    removes what a killed process left half-written; every rank then reads the same state."""
    record = parts / "settings.json"
    if distributed.is_main():
        parts.mkdir(parents=True, exist_ok=True)
        for stale in parts.glob(".batch_*"):  # temporary files of an interrupted write
            stale.unlink()
        if not record.is_file():
            checkpoints.write_text(record, json.dumps(settings, indent=2) + "\n")
    distributed.barrier()
    stored = json.loads(record.read_text())
    changed = [f"{k} {stored.get(k)!r} there, {v!r} here" for k, v in settings.items()
               if stored.get(k) != v]
    if changed:
        raise ValueError(f"{parts} holds an unfinished run with other settings "
                         f"({'; '.join(changed)}): rerun with its arguments to continue it, "
                         f"or remove {parts}")
    done = {int(p.stem.split("_")[1]) for p in parts.glob("batch_*.npy")}
    distributed.barrier()  # every rank has seen the same finished batches before any writes one
    return done


def run(args):
    check_args(args)
    device = distributed.init()
    rank, world = distributed.rank(), distributed.world_size()
    model, _ = dimr.load_model(args.checkpoint, weights=args.weights, device=device)
    cfg = model.config
    labels = parse_classes(args.classes, args.num_images, cfg.num_classes, args.seed)
    vae = vae_lib.load_vae(args.vae, device) if vae_lib.is_latent(cfg) else None
    out = Path(args.out)
    sampler = ("DDPM, 1000 ancestral steps" if args.method == "ddpm" else
               f"{args.steps} steps of " + ("the release's sampler" if args.method == "release" else
                                            diffusion.sampler_name(args_solver(args))))
    distributed.print0(f"sampling {args.num_images} images of "
                       f"{cfg.input_size}x{cfg.input_size}x{cfg.in_channels} "
                       f"({'latent, VAE ' + args.vae if vae else 'pixels'}) on {world} "
                       f"process(es): {sampler}, cfg scale {args.cfg_scale}, "
                       f"decay power {args.decay_power}, {args.weights} weights, {args.precision}")

    settings = {k: v for k, v in vars(args).items() if k not in ("out", "no_png")}
    settings["checkpoint"] = str(Path(args.checkpoint).resolve())
    parts = out / "parts"
    done = open_parts(parts, settings)
    batches = [np.arange(lo, min(lo + args.batch_size, args.num_images))
               for lo in range(0, args.num_images, args.batch_size)]
    todo = [b for b in range(len(batches)) if b not in done][rank::world]
    if done:
        distributed.print0(f"resuming: {len(done)} of {len(batches)} batches are in {parts}")
    if not args.no_png:
        (out / "images").mkdir(exist_ok=True)
    bar = Progress(f"sample (rank 0 of {world})" if world > 1 else "sample",
                   sum(len(batches[b]) for b in todo)) if distributed.is_main() else None
    for b in todo:
        idx = batches[b]
        x = generate(model, labels[idx], args.seed + idx, steps=args.steps,
                     cfg_scale=args.cfg_scale, decay_power=args.decay_power, order=args.order,
                     method=args.method, skip=args.skip, variant=args.variant,
                     lower_order_final=args.lower_order_final,
                     batch_size=len(idx), device=device, amp_dtype=PRECISIONS[args.precision])
        images = decode_to_uint8(x.to(device), cfg, vae)
        if not args.no_png:
            for i, image in zip(idx, images):
                Image.fromarray(image).save(out / "images" / f"{i:06d}.png")
        with checkpoints.atomic_write(batch_path(parts, b), suffix=".npy") as tmp:
            np.save(tmp, images)
        if bar:
            bar.update(len(idx))
    distributed.barrier()  # every batch is written; rank 0 merges them alone, the others are done

    if distributed.is_main():
        paths = [batch_path(parts, b) for b in range(len(batches))]
        arrays = [np.load(p, mmap_mode="r") for p in paths]
        write_npz(out / "samples.npz", arrays, labels)
        first = np.concatenate([a for a, _ in
                                zip(arrays, range(math.ceil(GRID_MAX / args.batch_size)))])
        save_grid(first[:GRID_MAX], labels[:min(GRID_MAX, len(first))], out / "grid.png")
        del arrays
        for p in [*paths, parts / "settings.json"]:
            p.unlink()
        parts.rmdir()
        side = first.shape[1]
        print(f"wrote {out / 'samples.npz'} (arr_0 uint8 [{args.num_images}, {side}, {side}, 3], "
              f"labels) and {out / 'grid.png'}"
              + ("" if args.no_png else f" and {out / 'images'}/"), flush=True)


def main(argv=None):
    args = build_parser().parse_args(argv)
    distributed.run_main(lambda: run(args))


if __name__ == "__main__":
    main()
