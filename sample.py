"""Sampling from a trained DiMR: images, a labelled grid and the .npz that FID reads (paper Sec. 4).

The paper's numbers are FID-50K of class-conditional samples, 50 per ImageNet class, drawn with the
release's DPM-Solver (250 steps), with classifier-free guidance s = 0.4 on latents (256 px) and
none at 64 px (Table 2) (diffusion.guided_eps_fn, default_guidance); DDPM's 1000 ancestral steps
are the baseline sampler. The samplers and the guidance live in diffusion.py; this
file turns a checkpoint into images:

- library (train.py uses it): `generate` (model-space samples, image i from the noise of seed
  seeds[i], whatever the batch it lands in), `default_guidance` (the paper's protocol where it has
  one, else ours),
  `decode_to_uint8` (VAE for latents; support/images.py has to_uint8 and save_grid);
- command line: `python sample.py CKPT --num-images 50000 --out DIR`, or under
  `torchrun --nproc_per_node=8`. The images are cut into batches of --batch-size indices; each
  finished batch is saved as DIR/parts/batch_NNNNNN.npy (atomically), and the processes share the
  unfinished ones. A run that is interrupted (killed, preempted) and started again with the same
  arguments, on any number of processes, samples only the missing batches, so its samples.npz
  equals an uninterrupted run's (support/sample_parts.py). At the end the parts are merged into
  one .npz in index order.

Outputs in --out: grid.png (at most 64 images, evenly spread over the indices so that they span
the classes, each labelled with its class id), images/000000.png ... (one per image), samples.npz
with arr_0 uint8 [N, H, W, 3] (the ADM evaluation suite's layout) and labels int64 [N].
"""
import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import diffusion
import dimr
from diffusion import (DEFAULT_SAMPLER, FEW_STEPS, FEW_STEPS_SAMPLER, ORDERS, RELEASE_SAMPLER,
                       SPACINGS, B_H, ddpm_sample, ode_sample, sampler_settings)
from support import checkpoints, distributed, images as image_files, sample_parts, vae as vae_lib
from support.images import save_grid, to_uint8
from support.cli import Parser, add_threads_flag, number
from support.progress import Progress

# The default guidance s (release convention, diffusion.guided_eps_fn) of a model; --cfg-scale
# overrides it. The paper's protocol where it has one: none at 64 px in pixels (Table 2), s = 0.4
# on latents (the release's eval.py, 256 px); at 512 px neither says, and we keep 0.4.
PIXELS_64_GUIDANCE = 0.0
LATENT_GUIDANCE = 0.4  # w = 1 + s = 1.4 in the usual convention
DIGITS_GUIDANCE = 1.0  # the digits demo's (docs/demo.md)
# The default sampler at 25 evaluations solves the ODE at least as accurately as the release's
# FID-50K setting, 250 evaluations of its own sampler (docs/samplers.md).
DEFAULT_STEPS = 25
GRID_MAX = 64  # images in grid.png
# the network's autocast dtype (None: plain fp32); its flag keeps its first name, --precision
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# --method: diffusion.METHODS (UniPC, the default, and DPM-Solver++ singlestep), 'release' (the
# release's sampler, RELEASE_SAMPLER, whatever order and spacing say) and 'ddpm' (DDPM's 1000
# ancestral steps).
METHODS = (*diffusion.METHODS, "release", "ddpm")
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
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds]


def check_labels(labels, num_classes):
    bad = [int(c) for c in np.asarray(labels).reshape(-1) if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"class ids {bad[:5]} out of range 0..{num_classes - 1} "
                         f"(this model has {num_classes} classes)")


def default_guidance(config):
    """(s, why): the guidance a model samples with unless told, and where the value comes from."""
    if vae_lib.is_latent(config):
        s, why = LATENT_GUIDANCE, ("at 512 px neither the paper nor the release states it: the "
                                   "256 px value, our choice (sweep --cfg-scale on FID-10K)"
                                   if config.input_size == 64 else "the release's eval.py")
    elif (config.input_size, config.in_channels) == (64, 3):
        s, why = PIXELS_64_GUIDANCE, "the paper's Table 2 protocol (ImageNet 64, no guidance)"
    elif config.in_channels == 1 and config.num_classes == 10:
        s, why = DIGITS_GUIDANCE, "the digits demo's choice (docs/demo.md)"
    else:
        s, why = 0.0, "no guidance: the paper has no protocol for this input"
    return s, f"default for {dimr.variant_name(config)}: {why}"


def sampler_of(method, steps, order=None, spacing=None, bh=None, lower_order_final=None):
    """The sampler of a run: 'ddpm', or the settings of diffusion.ode_sample (the release's, or
    those given over the default's)."""
    if method == "ddpm":
        return "ddpm"
    given = RELEASE_SAMPLER if method == "release" else dict(
        method=method, order=order, spacing=spacing, bh=bh, lower_order_final=lower_order_final)
    return sampler_settings(steps, **given)


@torch.no_grad()
def generate(model, labels, seeds, steps=DEFAULT_STEPS, guidance=None, decay_power=None,
             sampler=None, batch_size=64, device="cpu", amp_dtype=None):
    """Class-conditional samples in model space (pixels in [-1, 1] or scaled latents), float32 CPU.

    labels: class ids [N]; seeds: one int per image (x_T of image i from seeds[i]);
    guidance: s in the release's convention (0 = none; None: default_guidance of the model);
    decay_power: power-cosine decay of the guidance;
    steps: evaluations of the sampler; sampler: None (the default), the settings of
    diffusion.ode_sample (e.g. diffusion.RELEASE_SAMPLER), or 'ddpm' (1000 ancestral steps, steps
    unused); amp_dtype: run the network under autocast to this dtype (the solver's own arithmetic
    stays float32). Returns [N, C, H, W].
    """
    config = model.config
    if guidance is None:
        guidance = default_guidance(config)[0]
    check_labels(labels, config.num_classes)
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)
    seeds = [int(seed) for seed in seeds]
    if len(seeds) != len(labels):
        raise ValueError(f"{len(labels)} labels but {len(seeds)} seeds")
    out = []
    for start in range(0, len(labels), batch_size):
        y = labels[start:start + batch_size].to(device)
        generators = image_generators(seeds[start:start + batch_size])
        x_T = torch.stack([torch.randn(config.in_channels, config.input_size, config.input_size,
                                       generator=g) for g in generators]).to(device)  # (B, C, H, W)
        eps_fn = diffusion.guided_eps_fn(model, y, guidance, config.num_classes, decay_power)
        with torch.autocast(torch.device(device).type, dtype=amp_dtype,
                            enabled=amp_dtype is not None):
            if sampler == "ddpm":
                x = ddpm_sample(eps_fn, x_T, generator=generators)
            else:
                x = ode_sample(eps_fn, x_T, steps, **(sampler or {}))
        out.append(x.float().cpu())
    if not out:
        return torch.empty(0, config.in_channels, config.input_size, config.input_size)
    return torch.cat(out)


def decode_to_uint8(x, config, vae=None):
    """Model-space samples -> uint8 (N, H, W, 3); latent models go through the VAE decoder first."""
    return to_uint8(vae_lib.decode(vae, x) if vae_lib.is_latent(config) else x)


def grid_indices(num):
    """At most GRID_MAX indices evenly spread over 0..num-1: with the classes 'even' (class
    floor(i K / N)) they span all classes, not only the first few."""
    return np.unique(np.linspace(0, num - 1, min(num, GRID_MAX)).round().astype(np.int64))


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
    check_labels(classes, num_classes)
    return np.resize(np.array(classes, dtype=np.int64), num)  # cycles through the list


# ----------------------------------------------------------------------------------------------
# Command line

def build_parser():
    p = Parser(description="Sample class-conditional images from a DiMR checkpoint (ours, or "
                           "converted from the release with `python -m tools.convert`). Writes "
                           "grid.png, images/NNNNNN.png and samples.npz (arr_0 uint8 [N, H, W, 3], "
                           "labels [N]) to --out. Multi-process: torchrun --nproc_per_node=G "
                           "sample.py ...")
    p.add_argument("checkpoint", help="checkpoint .pt with config and weights (train.py or "
                                      "tools/convert.py)")
    p.add_argument("--out", required=True, help="output directory")
    # not `--num`: torchrun reads abbreviations of its own flags (--numa-binding) after the
    # script too
    p.add_argument("--num-images", type=number(int, 1), default=64, help="number of images N")
    p.add_argument("--classes", default="even", help=CLASSES_HELP)
    p.add_argument("--seed", type=number(int, 0), default=0,
                   help="image i starts from the noise of seed SEED + i, whatever the number of "
                        "processes")
    p.add_argument("--cfg-scale", dest="guidance", type=number(float, 0), default=None,
                   help="classifier-free guidance s in the release's convention "
                        "eps = eps_c + s (eps_c - eps_u) (= guidance scale 1 + s); 0 = none. "
                        "Default by the model: 0 at 64 px (the paper's Table 2), 0.4 at 256 px "
                        "(the release's), 0.4 at 512 px (our choice), 1 for the digits")
    p.add_argument("--decay-power", type=number(float, above=0), default=None,
                   help="power-cosine guidance decay: "
                        "w(n) = 1 + s (1 - cos(pi (1 - n/1000)^P)) / 2; default constant guidance")
    p.add_argument("--steps", type=number(int, 1), default=DEFAULT_STEPS,
                   help="network evaluations of the sampler (with guidance each one pass over a "
                        "doubled batch: conditional and null class); the default sampler at 25 is "
                        "at least as accurate as the release's FID-50K setting, --steps 250 "
                        "--method release")
    few = f"below {FEW_STEPS} steps"
    p.add_argument("--method", choices=METHODS, default=DEFAULT_SAMPLER["method"],
                   help="'unipc': UniPC (Zhao et al. 2023); 'singlestep': DPM-Solver++ singlestep; "
                        "'release': the release's own sampler (its dpm_solver.py 'fast' method, "
                        "third order on a time-uniform grid; the other sampler flags do not "
                        "apply); 'ddpm': DDPM ancestral sampling with all 1000 steps (the "
                        "baseline; --steps and the other sampler flags do not apply)")
    p.add_argument("--order", type=int, choices=ORDERS, default=None,
                   help=f"solver order (None: {DEFAULT_SAMPLER['order']}, {few} "
                        f"{FEW_STEPS_SAMPLER['order']})")
    p.add_argument("--spacing", "--skip", dest="spacing", choices=SPACINGS, default=None,
                   help=f"spacing of the time steps, the release's skip_type "
                        f"(None: {DEFAULT_SAMPLER['spacing']})")
    p.add_argument("--bh", choices=B_H, default=None,
                   help=f"UniPC's B(h) (None: {DEFAULT_SAMPLER['bh']}, {few} "
                        f"{FEW_STEPS_SAMPLER['bh']})")
    p.add_argument("--lower-order-final", action=argparse.BooleanOptionalAction, default=None,
                   help=f"UniPC: lower the order of the last steps (default: only {few})")
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="EMA or raw weights")
    p.add_argument("--batch-size", type=number(int, 1), default=64,
                   help="images per forward pass and per saved batch (a resumed run needs the "
                        "same)")
    p.add_argument("--precision", dest="autocast", choices=tuple(AUTOCAST), default="fp32",
                   help="the network's arithmetic: fp32, or bf16 / fp16 autocast, faster on GPUs "
                        "but they slightly change the samples (a few pixel levels); the solver "
                        "and the VAE run in fp32")
    p.add_argument("--vae", default=vae_lib.DEFAULT_VAE,
                   help="latent models only: the release's autoencoder_kl_ema.pth, a diffusers "
                        "AutoencoderKL directory or a hub name")
    p.add_argument("--no-png", action="store_true", help="do not write images/NNNNNN.png")
    add_threads_flag(p)
    return p


def run(args):
    sampler = sampler_of(args.method, args.steps, args.order, args.spacing, args.bh,
                         args.lower_order_final)
    if sampler != "ddpm":
        diffusion.check_sampler(sampler, args.steps)
    device = distributed.init()
    threads = distributed.set_threads(args.threads)
    rank, world = distributed.rank(), distributed.world_size()
    model, _ = checkpoints.load_model(args.checkpoint, weights=args.weights, device=device)
    config = model.config
    labels = parse_classes(args.classes, args.num_images, config.num_classes, args.seed)
    why = "given"
    if args.guidance is None:
        args.guidance, why = default_guidance(config)
    out = Path(args.out)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "no_png", "threads")}
    settings["checkpoint"] = str(Path(args.checkpoint).resolve())
    parts = out / "parts"
    sample_parts.check_settings(parts, settings)  # before the VAE is loaded
    vae = vae_lib.load_vae(args.vae, device) if vae_lib.is_latent(config) else None
    name = ("DDPM, 1000 ancestral steps" if sampler == "ddpm" else f"{args.steps} steps of "
            + ("the release's sampler" if args.method == "release" else
               diffusion.sampler_name(sampler)))
    distributed.print0(f"sampling {args.num_images} images of "
                       f"{config.input_size}x{config.input_size}x{config.in_channels} "
                       f"({'latent, VAE ' + args.vae if vae else 'pixels'}) on {world} "
                       f"process(es), {threads} thread(s) each: {name}, guidance s = "
                       f"{args.guidance:g} ({why}), decay power {args.decay_power}, "
                       f"{args.weights} weights, {args.autocast}")

    done = sample_parts.finished_batches(parts, settings)
    batches = [np.arange(lo, min(lo + args.batch_size, args.num_images))
               for lo in range(0, args.num_images, args.batch_size)]
    todo = [b for b in range(len(batches)) if b not in done][rank::world]
    if done:
        distributed.print0(f"resuming: {len(done)} of {len(batches)} batches are in {parts}")
    bar = Progress(f"sample (rank 0 of {world})" if world > 1 else "sample",
                   sum(len(batches[b]) for b in todo)) if distributed.is_main() else None
    for b in todo:
        idx = batches[b]
        x = generate(model, labels[idx], args.seed + idx, steps=args.steps,
                     guidance=args.guidance, decay_power=args.decay_power, sampler=sampler,
                     batch_size=len(idx), device=device, amp_dtype=AUTOCAST[args.autocast])
        save_batch(decode_to_uint8(x.to(device), config, vae), idx,
                   sample_parts.batch_file(parts, b),
                   None if args.no_png else out / "images")
        if bar:
            bar.update(len(idx))
    distributed.barrier()  # every batch is written; rank 0 merges them alone, the others are done
    if distributed.is_main():
        shape = merge_parts(parts, out, len(batches), args.batch_size, labels)
        print(f"wrote {out / 'samples.npz'} (arr_0 uint8 {list(shape)}, labels) and "
              f"{out / 'grid.png'}" + ("" if args.no_png else f" and {out / 'images'}/"),
              flush=True)


def save_batch(images, indices, part, png_dir=None):
    """One finished batch: its part (the truth a resumed run reads) and, if asked, its PNGs."""
    for i, image in zip(indices, images) if png_dir else ():
        with checkpoints.atomic_write(png_dir / f"{i:06d}.png", ".png", fsync=False) as tmp:
            Image.fromarray(image).save(tmp)
    with checkpoints.atomic_write(part, suffix=".npy") as tmp:
        np.save(tmp, images)


def merge_parts(parts, out, num_batches, batch_size, labels):
    """samples.npz and grid.png from the parts (memory-mapped, never all in memory at once); then
    the parts go. Returns the shape of arr_0."""
    paths = [sample_parts.batch_file(parts, b) for b in range(num_batches)]
    arrays = [np.load(p, mmap_mode="r") for p in paths]
    image_files.write_npz(out / "samples.npz", arrays, labels)
    shown = grid_indices(len(labels))
    save_grid(np.stack([arrays[i // batch_size][i % batch_size] for i in shown]), labels[shown],
              out / "grid.png")
    shape = (len(labels), *arrays[0].shape[1:])
    del arrays
    for p in [*paths, parts / "settings.json"]:
        p.unlink()
    parts.rmdir()
    return shape


def main(argv=None):
    args = build_parser().parse_args(argv)
    distributed.run_main(lambda: run(args))


if __name__ == "__main__":
    main()
