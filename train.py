"""Training DiMR with plain torch.distributed (paper Sec. 3.2 and Sec. 4, the release's settings).

    python train.py                                              # the digits demo, CPU, < 10 minutes
    torchrun --nproc_per_node=8 train.py --variant m --data imagenet64/       # DiMR-M/3R, Imagenet64_train_part*.npz
    torchrun --nproc_per_node=8 train.py --variant xl --data latents/         # DiMR-XL/2R, ImageNet 256
    python train.py --resume runs/000-DiMR-S-2R                  # continue a run where it stopped

One step (Sec. 3.2): a step n ~ U{1..1000} and noise eps ~ N(0, I) per image,
x_n = sqrt(alpha_bar_n) x_0 + sqrt(1 - alpha_bar_n) eps, the label replaced by the null class
with probability 0.1 (classifier-free guidance), and the multi-scale loss
sum_r alpha_r |eps_hat_r - eps_r|^2 over the R branches' noise predictions (diffusion.py).
The release's optimisation: AdamW, lr 2e-4 (3e-4 at 64 px), betas (0.99, 0.99),
weight decay 0.03, 5K steps of linear warm-up then constant, global batch 1024, EMA 0.9999,
mixed precision (we default to bf16 on GPUs where the release used fp16; --precision fp16 adds
the GradScaler) and gradient checkpointing. Weight decay applies to weight matrices and conv
kernels only: not to biases, norms, embedding tables and the TD parameters (whose slope and
offset w', b' the release exempts explicitly).

Randomness: every random draw of a step (n, eps, class dropout, flips) is made for the whole
global batch from one generator seeded with --seed, the same on every process, and each process
takes the rows of its own samples. Image j of the global batch therefore gets the same noise
whatever the number of processes or accumulation steps (EDM's per-image seeds, for training),
so DDP on P processes with batch b equals one process with batch P*b (tests/test_train.py),
and one generator state in the checkpoint resumes all processes. The data order is
DistributedSampler's, a function of (seed, epoch); a resumed run restarts inside its epoch.
SIGTERM (preemption) or Ctrl-C finishes the step, writes a checkpoint and exits; a non-finite
loss stops the run without writing one, naming the last good checkpoint.

The run folder (--results-dir/NNN-VARIANT): config.json (resolved options, model config, data),
stats.jsonl (one line per --log-every steps), samples/step_NNNNNNN.png (EMA samples, fixed seeds
and classes), checkpoints/ckpt_NNNNNNN.pt (the last --keep), loss.png, and for the digits demo
eval.json with the class accuracy of its samples (fid.digit_class_accuracy).
"""
import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image, ImageDraw
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

import checkpoints
import data as data_lib
import diffusion
import dimr
import distributed
import fid
import sample
import vae as vae_lib
from progress import format_seconds

# The release's recipe, and the digits demo's for the 1.2M-parameter DiMR-S/2R: 2,000 steps take
# 6.3 minutes on 2 idle cores; a busy CPU stops earlier, at 7.5 minutes. Measured (class accuracy of
# 100 EMA samples at 700 steps): betas (0.99, 0.99) 24%, (0.9, 0.99) 63%, (0.9, 0.999) 70%; with
# (0.9, 0.99), lr 3e-3 85% and 5e-3 85%. With this recipe 200 samples scored 100% at 1,500 and 2,000 steps.
PAPER_RECIPE = dict(batch_size=1024, lr=2e-4, warmup=5000, weight_decay=0.03, betas=[0.99, 0.99], ema=0.9999,
                    class_dropout=0.1, steps=1_000_000, minutes=None, grad_checkpointing=True,
                    log_every=100, sample_every=10_000, ckpt_every=10_000, cfg_scale=sample.RELEASE_CFG_SCALE)
RECIPES = {
    "DiMR-M/3R": dict(PAPER_RECIPE, lr=3e-4, steps=300_000),   # ImageNet 64: 3e-4, 300K steps
    "DiMR-L/3R": dict(PAPER_RECIPE, lr=3e-4, steps=300_000),
    "DiMR-XL/2R": PAPER_RECIPE,
    "DiMR-G/2R": PAPER_RECIPE,
    "DiMR-XL/3R": PAPER_RECIPE,
    "DiMR-S/2R": dict(PAPER_RECIPE, batch_size=64, lr=3e-3, betas=[0.9, 0.99], warmup=100, ema=0.995, steps=2000,
                      minutes=7.5, grad_checkpointing=False, log_every=100, sample_every=1000, ckpt_every=500,
                      cfg_scale=1.0),  # s = 1: the usual guidance scale w = 1 + s = 2
}
PAPER_DATA = {"DiMR-M/3R": "ImageNet 64x64 (a directory of downsampled ImageNet Imagenet64_train_part*.npz)",
              "DiMR-L/3R": "ImageNet 64x64 (a directory of downsampled ImageNet Imagenet64_train_part*.npz)",
              "DiMR-XL/2R": "ImageNet 256 latents (extract_latents.py)",
              "DiMR-G/2R": "ImageNet 256 latents (extract_latents.py)",
              "DiMR-XL/3R": "ImageNet 512 latents (extract_latents.py)"}
# Options that define what a run computes: a resumed run keeps them (the others may change).
RUN_KEYS = ("variant", "arch", "data", "image_size", "num_classes", "batch_size", "lr", "warmup",
            "weight_decay", "betas", "ema", "class_dropout", "grad_clip", "precision", "seed")
ARCH_KEYS = ("patch_size", "depths", "widths", "num_heads", "norm", "mlp")  # what --arch may change
IMAGENET_GRID_CLASSES = (207, 360, 387, 974, 88, 979, 417, 279)  # DiT's sample classes
GRID_CLASSES = 10  # other data: the grid shows the first ten classes
GRID_PER_CLASS_FEW = 10  # images per class in the sample grids with at most GRID_CLASSES classes (digits: 10 x 10)
GRID_PER_CLASS_MANY = 4  # ... with more classes (ImageNet: DiT's 8 classes x 4)
SAMPLE_STEPS = 25       # DPM-Solver evaluations for the sample grids and the demo's evaluation
# Defaults of the options that are the same for every variant (eval_per_class: 200 digit samples).
COMMON_DEFAULTS = dict(seed=0, results_dir="runs", keep=3, eval_per_class=20, vae=vae_lib.DEFAULT_VAE, workers=8,
                       compile=False)


# ----------------------------------------------------------------------------------------------
# Options

def build_parser():
    p = argparse.ArgumentParser(
        description="Train DiMR (single process, or DDP under torchrun). With no arguments: the digits demo\n"
                    "(DiMR-S/2R on scikit-learn's 8x8 digits on the CPU, then the class accuracy of its samples).\n"
                    "Options left unset take the variant's recipe (below): the release's for the paper variants,\n"
                    "the demo's for s; with --resume, the run's.",
        epilog="recipes:\n" + "\n".join(
            f"  {name:<11} batch {r['batch_size']}, lr {r['lr']:g}, betas {r['betas'][0]:g} {r['betas'][1]:g}, "
            f"wd {r['weight_decay']:g}, warm-up {r['warmup']}, EMA {r['ema']:g}, class dropout {r['class_dropout']:g},\n"
            f"  {'':<11} {r['steps']:,} steps" + (f" or {r['minutes']:g} minutes" if r["minutes"] else "")
            + f", grad checkpointing {'on' if r['grad_checkpointing'] else 'off'}, log / sample / checkpoint every "
            f"{r['log_every']} / {r['sample_every']} / {r['ckpt_every']} steps, grid cfg-scale {r['cfg_scale']:g} "
            f"(guidance scale {1 + r['cfg_scale']:g})"
            for name, r in RECIPES.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--variant", choices=dimr.VARIANT_CHOICES,
                   help="DiMR variant (default s = DiMR-S/2R, the demo); input size, channels and classes follow "
                        "the data")
    g.add_argument("--arch", nargs="+", metavar="KEY=VALUE",
                   help=f"override the variant's architecture ({', '.join(ARCH_KEYS)}), e.g. widths=64,32 depths=3,2 "
                        "num_heads=2, or norm=adaln_zero mlp=gelu for the Table 5 ablations")
    g.add_argument("--data", help="'digits' (default for s); downsampled ImageNet: a directory of "
                                  "Imagenet64_train_part*.npz (its *train*.npz files) or one such file, random flips; "
                                  "a class-per-folder image directory (ADM center crop, random flips); or VAE "
                                  "latents: .npz / X.npy with X_labels.npy / a directory of shard_00000.npz, ... "
                                  "(see data.py)")
    g.add_argument("--image-size", type=int,
                   help="digits: 8 (native, default), 16 or 32 (upsampled, ~4x the cost per doubling); image "
                        "folder: crop size (default the variant's input size); other data: their stored size")
    g.add_argument("--num-classes", type=int,
                   help="classes of latent data (default the variant's, 1000); folders and digits know theirs")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, help="global batch size over all processes and accumulation steps")
    g.add_argument("--micro-batch", type=int,
                   help="images per process per forward pass (default batch-size / processes); gradient "
                        "accumulation makes up the rest")
    g.add_argument("--lr", type=float, help="AdamW learning rate after warm-up")
    g.add_argument("--warmup", type=int, help="steps of linear learning-rate warm-up")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay of weight matrices and conv kernels")
    g.add_argument("--betas", type=float, nargs=2, metavar=("BETA1", "BETA2"), help="AdamW betas")
    g.add_argument("--ema", type=float, help="EMA decay per step of the weights used for sampling")
    g.add_argument("--class-dropout", type=float, help="probability of replacing a label by the null class")
    g.add_argument("--grad-clip", type=float, help="clip the gradient norm to this (default: no clipping)")
    g.add_argument("--precision", choices=tuple(sample.PRECISIONS),
                   help="fp32, bf16 autocast, or fp16 autocast with a GradScaler (default bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction,
                   help="recompute each block in the backward pass (default on for the paper variants)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model")
    g.add_argument("--steps", type=int, help="total optimizer steps of the run")
    g.add_argument("--minutes", type=float,
                   help="stop training after this many minutes of this invocation (then checkpoint, grid and "
                        "evaluation as at --steps)")
    g.add_argument("--seed", type=int, help="seed of the initialisation, the data order and the noise "
                                              f"(default {COMMON_DEFAULTS['seed']})")
    g = p.add_argument_group("run folder, logging, sampling")
    g.add_argument("--results-dir", help=f"parent of the numbered run folders (default {COMMON_DEFAULTS['results_dir']})")
    g.add_argument("--resume", metavar="RUN_DIR_OR_CKPT",
                   help="continue a run from its last checkpoint (or from the given one), with its options")
    g.add_argument("--log-every", type=int, help="steps per progress line and stats.jsonl record")
    g.add_argument("--sample-every", type=int, help="steps per EMA sample grid (0: none)")
    g.add_argument("--ckpt-every", type=int, help="steps per checkpoint (also written at the end and on SIGTERM)")
    g.add_argument("--keep", type=int, help=f"checkpoints kept (default {COMMON_DEFAULTS['keep']})")
    g.add_argument("--cfg-scale", type=float,
                   help="classifier-free guidance s of the sample grids (and the digits evaluation) in the release's "
                        "convention eps = eps_c + s (eps_c - eps_u) (= guidance scale 1 + s); 0 = none; as sample.py")
    g.add_argument("--eval-per-class", type=int,
                   help=f"digits only: samples per class for the final class-accuracy evaluation "
                        f"(default {COMMON_DEFAULTS['eval_per_class']}; 0: none)")
    g.add_argument("--vae", help=f"latent data only: the VAE that decodes the sample grids "
                                 f"(default {COMMON_DEFAULTS['vae']})")
    g.add_argument("--workers", type=int,
                   help=f"DataLoader worker processes per process for image folders (default {COMMON_DEFAULTS['workers']})")
    g.add_argument("--threads", type=int,
                   help="CPU threads per process (default: OMP_NUM_THREADS if set, as torchrun does, else all "
                        "cores but one)")
    return p


def canonical_variant(name):
    return dimr.ALIASES.get(name, name)


def parse_arch(items):
    """['widths=64,32', 'norm=ln'] -> {'widths': (64, 32), 'norm': 'ln'}, typed by DiMRConfig's fields."""
    types = {f.name: f.type for f in dataclasses.fields(dimr.DiMRConfig)}
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or key not in ARCH_KEYS:
            raise ValueError(f"--arch {item}: expected KEY=VALUE with KEY one of {', '.join(ARCH_KEYS)}")
        try:
            out[key] = tuple(int(v) for v in value.split(",")) if types[key] is tuple else types[key](value)
        except ValueError:
            kind = "integers a,b,..." if types[key] is tuple else types[key].__name__
            raise ValueError(f"--arch {item}: {key} must be {kind}") from None
    return out


def find_checkpoint(path):
    """--resume RUN_DIR (its newest checkpoint) or a checkpoint file -> (run dir, checkpoint path)."""
    path = Path(path)
    if path.is_file():
        return path.parent.parent, path
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {path}: no such run folder or checkpoint")
    found = sorted((path / "checkpoints").glob("ckpt_*.pt"))
    if not found:
        raise FileNotFoundError(f"--resume {path}: no checkpoints/ckpt_*.pt in this run folder")
    return path, found[-1]


def resolve_options(args):
    """Fill unset options from the recipe, or with --resume from the run's checkpoint.

    Returns (options dict, checkpoint dict or None, checkpoint path or None).
    """
    ckpt, ckpt_path = None, None
    if args.data not in (None, "digits"):  # a run resumed from another directory finds its data
        args.data = str(Path(args.data).resolve())
    if args.resume:
        _, ckpt_path = find_checkpoint(args.resume)
        try:
            ckpt = checkpoints.load(ckpt_path)
        except ValueError as e:
            raise ValueError(f"{e} (give an earlier checkpoint's path to --resume)") from None
        missing = {"options", "config", "model", "ema", "optimizer", "scaler", "step", "rng"} - set(ckpt)
        if missing:
            raise ValueError(f"{ckpt_path}: not a train.py checkpoint (missing {sorted(missing)})")
        stored = ckpt["options"]
        if args.variant is not None:
            args.variant = canonical_variant(args.variant)
        for key in RUN_KEYS:
            given = getattr(args, key)
            if given is not None and given != stored[key]:
                raise ValueError(f"--{key.replace('_', '-')} {given} differs from the run's {stored[key]} "
                                 f"({ckpt_path}); a resumed run keeps the options it was started with")
        defaults = stored
    else:
        args.variant = canonical_variant(args.variant or "s")
        defaults = dict(COMMON_DEFAULTS, **RECIPES[args.variant],
                        data="digits" if args.variant == "DiMR-S/2R" else None)
        if args.data is None and args.variant != "DiMR-S/2R":
            raise ValueError(f"{args.variant} trains on {PAPER_DATA[args.variant]}: give --data "
                             f"(or --data digits for the demo data)")
    options = vars(args).copy()
    for key, value in options.items():
        if value is None:
            options[key] = defaults.get(key)
    if options["precision"] is None:
        options["precision"] = "bf16" if torch.cuda.is_available() else "fp32"
    check_options(options)
    return options, ckpt, ckpt_path


def check_options(o):
    rules = [("batch_size", 1), ("micro_batch", 1), ("lr", 0), ("warmup", 0), ("weight_decay", 0), ("ema", 0),
             ("class_dropout", 0), ("grad_clip", 0), ("steps", 1), ("minutes", 0), ("log_every", 1),
             ("sample_every", 0), ("ckpt_every", 1), ("keep", 1), ("cfg_scale", 0), ("eval_per_class", 0),
             ("workers", 0), ("threads", 1), ("image_size", 1), ("num_classes", 1), ("seed", 0)]
    problems = [f"--{k.replace('_', '-')} must be >= {lo}, got {o[k]}" for k, lo in rules
                if o[k] is not None and o[k] < lo]
    problems += [f"--{k.replace('_', '-')} must be below 1, got {o[k]}" for k in ("ema", "class_dropout")
                 if o[k] is not None and o[k] >= 1]
    if not all(0 <= b < 1 for b in o["betas"]):
        problems.append(f"--betas must lie in [0, 1), got {o['betas']}")
    if problems:
        raise ValueError("; ".join(problems))


def default_threads():
    """CPU threads: all cores but one. OpenMP threads wait for each other at every operation, so
    one that shares its core with another busy process stalls them all: on 2 cores with one
    other process busy, the demo model's step took 2.7x longer with 2 threads than with 1 (idle,
    2 threads were 1.6x faster)."""
    return max(1, len(os.sched_getaffinity(0)) - 1)


def split_batch(batch_size, world_size, micro_batch=None):
    """Global batch -> (images per process per forward pass, accumulation steps)."""
    if batch_size % world_size:
        raise ValueError(f"--batch-size {batch_size} is not divisible by the {world_size} processes")
    per_process = batch_size // world_size
    micro = micro_batch or per_process
    if per_process % micro:
        raise ValueError(f"--batch-size {batch_size} over {world_size} processes is {per_process} per process, "
                         f"not a multiple of --micro-batch {micro}")
    return micro, per_process // micro


def model_config(options, data):
    """The variant's config with the architecture overrides and the data's size, channels, classes."""
    return dimr.get_config(options["variant"], **parse_arch(options["arch"]), input_size=data.image_size,
                           in_channels=data.channels, num_classes=data.num_classes)


# ----------------------------------------------------------------------------------------------
# Optimisation

def param_groups(model, weight_decay):
    """AdamW groups: decay on weight matrices and conv kernels; none on 1-d parameters (biases, norm
    gains, TD p0/p1/w/b) and on the embedding tables (class embedding, position embeddings)."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            table = isinstance(module, nn.Embedding) or name == "pos_embed"
            (decay if p.ndim >= 2 and not table else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def learning_rate(step, lr, warmup):
    """Linear warm-up over `warmup` steps, then constant (step = optimizer steps already taken)."""
    return lr * min(1.0, (step + 1) / warmup) if warmup else lr


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, for every parameter (DiMR has no buffers)."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


def rng_state(generator):
    np_state = np.random.get_state(legacy=False)
    return {"train": generator.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "numpy": {**np_state, "state": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                                            "pos": np_state["state"]["pos"]}},
            "python": random.getstate()}


def set_rng_state(generator, state):
    generator.set_state(state["train"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state({**np_state, "state": {"key": np_state["state"]["key"].numpy().astype(np.uint32),
                                               "pos": np_state["state"]["pos"]}})
    random.setstate(state["python"])


# ----------------------------------------------------------------------------------------------
# Data order

def _ignore_signals(worker_id):
    """DataLoader workers leave SIGTERM / SIGINT to the training process, which checkpoints."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def micro_batches(dataset, sampler, micro, accum, start_step, workers, pin_memory):
    """Yield, step after step from start_step on, the `accum` micro-batches of this process.

    Step s of an epoch takes this process's sampler positions [s * micro * accum, (s + 1) * micro * accum):
    sample i of micro-batch k is the global batch's sample (k * micro + i) * world_size + rank.
    """
    per_step = micro * accum
    steps_per_epoch = len(sampler) // per_step
    if steps_per_epoch == 0:
        raise ValueError(f"the data has {len(dataset)} samples, fewer than one global batch")
    epoch, position = divmod(start_step, steps_per_epoch)
    while True:
        sampler.set_epoch(epoch)
        indices = list(sampler)[position * per_step:steps_per_epoch * per_step]
        loader = iter(DataLoader(dataset, batch_size=micro, sampler=indices, num_workers=workers,
                                 pin_memory=pin_memory, worker_init_fn=_ignore_signals if workers else None))
        for _ in range(position, steps_per_epoch):
            yield [next(loader) for _ in range(accum)]
        epoch, position = epoch + 1, 0


# ----------------------------------------------------------------------------------------------
# Run folder

def new_run_dir(results_dir, variant):
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name[:3]) for p in results_dir.iterdir() if p.name[:3].isdigit()]
    run_dir = results_dir / f"{max(taken, default=-1) + 1:03d}-{variant.replace('/', '-')}"
    run_dir.mkdir()
    return run_dir


def read_stats(path):
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(stats, path, width=720, height=360):
    """loss.png: the logged loss against the step on a log scale, drawn with pillow."""
    steps, losses = [s["step"] for s in stats], [s["loss"] for s in stats]
    if len(steps) < 2:
        return
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 64, width - 24, 28, height - 36
    lo, hi = math.log10(min(losses)), math.log10(max(losses))
    hi = max(hi, lo + 1e-3)

    def xy(step, value):
        return (left + (step - steps[0]) / (steps[-1] - steps[0]) * (right - left),
                bottom - (math.log10(value) - lo) / (hi - lo) * (bottom - top))

    draw.rectangle([left, top, right, bottom], outline="black")
    for i in range(5):
        value = 10 ** (lo + i * (hi - lo) / 4)
        y = xy(steps[0], value)[1]
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((4, y - 6), f"{value:.3g}", fill="black")
        step = round(steps[0] + i * (steps[-1] - steps[0]) / 4)
        x = xy(step, losses[0])[0]
        draw.line([x, bottom, x, bottom + 4], fill="black")
        draw.text((x - 12, bottom + 8), str(step), fill="black")
    draw.line([xy(s, v) for s, v in zip(steps, losses)], fill=(31, 119, 180), width=2)
    draw.text((left, 8), "training loss (multi-scale, log scale) against the step", fill="black")
    image.save(path)


def grid_labels(num_classes, per_class=None):
    """Fixed classes for the sample grids: DiT's eight for ImageNet, else the first ten; per_class
    images of each (default GRID_PER_CLASS_FEW or _MANY)."""
    classes = IMAGENET_GRID_CLASSES if num_classes == 1000 else range(min(num_classes, GRID_CLASSES))
    if per_class is None:
        per_class = GRID_PER_CLASS_FEW if num_classes <= GRID_CLASSES else GRID_PER_CLASS_MANY
    return np.repeat(np.array(classes, dtype=np.int64), per_class)


def sample_grid(ema, labels, cfg_scale, device, vae, path):
    """EMA samples of the fixed classes from seeds 0..N-1, saved as a labelled grid; returns uint8 images."""
    x = sample.generate(ema, labels, range(len(labels)), steps=SAMPLE_STEPS, cfg_scale=cfg_scale,
                        batch_size=len(labels), device=device)
    images = sample.decode_to_uint8(x.to(device), ema.config, vae)
    per_row = int(np.sum(labels == labels[0]))
    sample.save_grid(images, labels, path, ncol=per_row)
    return images


def save_checkpoint(run_dir, keep, state):
    """checkpoints/ckpt_NNNNNNN.pt, atomically; keeps the last `keep` up to this step (checkpoints
    past it, left by a run resumed from an earlier one, are overwritten as the run gets there)."""
    path = run_dir / "checkpoints" / f"ckpt_{state['step']:07d}.pt"
    checkpoints.save(state, path)
    older = [p for p in sorted(path.parent.glob("ckpt_*.pt")) if p.name <= path.name]
    for old in older[:-keep]:
        old.unlink()
    return path


def open_run_dir(options, resuming, step, summary):
    """Rank 0: a new numbered run folder or the resumed one; stats.jsonl cut back to `step`."""
    run_dir = find_checkpoint(options["resume"])[0] if resuming else new_run_dir(options["results_dir"],
                                                                                 options["variant"])
    stats_path = run_dir / "stats.jsonl"
    kept = [s for s in read_stats(stats_path) if s["step"] <= step]  # records past the checkpoint are redone
    checkpoints.write_text(stats_path, "".join(json.dumps(s) + "\n" for s in kept))
    checkpoints.write_text(run_dir / "config.json", json.dumps({"options": options, **summary}, indent=2) + "\n")
    return run_dir, stats_path


# ----------------------------------------------------------------------------------------------
# Training

def draw_step_noise(schedule, generator, G, shape, class_dropout, flip, device):
    """All randomness of one step, for the whole global batch (G rows), the same on every process."""
    n = schedule.sample_steps(G, device, generator)                                  # (G,) in 1..1000
    eps = torch.randn((G, *shape), generator=generator, device=device)                # (G, C, H, W)
    drop = torch.rand(G, generator=generator, device=device) < class_dropout         # (G,) -> null class
    flips = torch.rand(G, generator=generator, device=device) < 0.5 if flip else None
    return n, eps, drop, flips


def forward_backward(net, batches, noise, schedule, scaler, amp_dtype, null_class):
    """Gradients of this process's micro-batches of one step; returns (loss, loss per branch) (1 + R,).

    Sample i of micro-batch k is row (k * micro + i) * world_size + rank of the global batch
    (the order in which micro_batches deals out the sampler's indices), and takes that row's noise.
    """
    n, eps, drop, flips = noise
    world, rank, accum = distributed.world_size(), distributed.rank(), len(batches)
    losses = 0.0
    for k, (x0, y) in enumerate(batches):
        micro = len(y)
        rows = torch.arange(k * micro, (k + 1) * micro, device=eps.device) * world + rank
        x0, y = x0.to(eps.device, non_blocking=True), y.to(eps.device, non_blocking=True)
        if flips is not None:
            x0 = torch.where(flips[rows, None, None, None], x0.flip(-1), x0)
        y = torch.where(drop[rows], null_class, y)
        x_n = schedule.q_sample(x0, n[rows], eps[rows])
        # DDP all-reduces the gradients after the last micro-batch only.
        last = k == accum - 1 or not isinstance(net, DistributedDataParallel)
        with contextlib.nullcontext() if last else net.no_sync():
            with torch.autocast(eps.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                preds = net(x_n, n[rows].float(), y)                              # R x (micro, C, H_r, W_r)
            loss, terms = diffusion.multiscale_loss(preds, eps[rows])
            scaler.scale(loss / accum).backward()
        losses = losses + torch.stack([loss.detach(), *[t.detach() for t in terms]]).float() / accum
    return losses


def train(args):
    device = distributed.init()
    rank, world = distributed.rank(), distributed.world_size()
    options, ckpt, ckpt_path = resolve_options(args)
    if options["threads"] or (device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ):
        torch.set_num_threads(options["threads"] or default_threads())
    if device.type == "cuda":  # TF32 matmuls for the fp32 parts, as DiT
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    variant = dimr.get_config(options["variant"])
    data = data_lib.open_data(options["data"], options["image_size"], options["num_classes"],
                              variant_size=variant.input_size, variant_classes=variant.num_classes)
    cfg = model_config(options, data)
    if ckpt is not None and dimr.config_from_dict(ckpt["config"]) != cfg:
        raise ValueError(f"{ckpt_path} holds a model {dimr.config_from_dict(ckpt['config'])}, but the options and "
                         f"data give {cfg}")
    G, steps = options["batch_size"], options["steps"]
    micro, accum = split_batch(G, world, options["micro_batch"])

    # Model, EMA, optimizer, scaler and the noise generator: identical on every process.
    torch.manual_seed(options["seed"])
    np.random.seed(options["seed"])
    random.seed(options["seed"])
    model = dimr.DiMR(cfg).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(param_groups(model, options["weight_decay"]), lr=options["lr"],
                                  betas=tuple(options["betas"]), fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=options["precision"] == "fp16")
    generator = torch.Generator(device).manual_seed(options["seed"])
    step = 0
    if ckpt is not None:
        dimr.load_state_dict_strict(model, ckpt["model"], source=str(ckpt_path))
        dimr.load_state_dict_strict(ema, ckpt["ema"], source=str(ckpt_path))
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(generator, ckpt["rng"])
        step = ckpt["step"]
        if step >= steps:
            raise ValueError(f"{ckpt_path} is at step {step}, the run's --steps is {steps}: "
                             f"give a larger --steps to continue")
    model.set_grad_checkpointing(options["grad_checkpointing"])
    net = torch.compile(model) if options["compile"] else model
    if dist.is_initialized():
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    amp_dtype = sample.PRECISIONS[options["precision"]]
    schedule = diffusion.DiscreteSchedule()
    sampler = DistributedSampler(data.dataset, num_replicas=world, rank=rank, shuffle=True, seed=options["seed"],
                                 drop_last=True)
    batches = micro_batches(data.dataset, sampler, micro, accum, step, options["workers"] if data.flip else 0,
                            device.type == "cuda")
    grid = grid_labels(cfg.num_classes)

    run_dir, stats_path, vae = None, None, None
    if distributed.is_main():
        if options["sample_every"] and vae_lib.is_latent(cfg):
            try:
                vae = vae_lib.load_vae(options["vae"], device)
            except (ImportError, ValueError, OSError) as e:
                raise ValueError(f"{e} (the sample grids of a latent model need the VAE; --sample-every 0 "
                                 f"trains without grids)") from None
        params = sum(p.numel() for p in model.parameters())
        run_dir, stats_path = open_run_dir(options, ckpt is not None, step, {
            "model": dataclasses.asdict(cfg), "parameters": params, "data": data.description,
            "class_names": data.class_names, "world_size": world, "micro_batch": micro, "accumulation": accum,
            "device": str(device), "torch": torch.__version__})
        print(f"{f'resuming {ckpt_path} at step {step}' if ckpt else 'new run'}: {run_dir}\n"
              f"model: {options['variant']} {cfg}, {params:,} parameters\n"
              f"data: {data.description}\n"
              f"batch {G} = {world} process(es) x {micro} x {accum} accumulation step(s); {steps} steps"
              f"{', at most %g minutes' % options['minutes'] if options['minutes'] else ''}; lr {options['lr']}, "
              f"warm-up {options['warmup']}, EMA {options['ema']}, {options['precision']} on {device}, "
              f"{torch.get_num_threads()} CPU thread(s)", flush=True)

    stop_signal = []  # SIGTERM (preemption) or Ctrl-C: finish the step, checkpoint, exit
    handlers = {s: signal.signal(s, lambda signum, frame: stop_signal.append(signum))
                for s in (signal.SIGTERM, signal.SIGINT)}
    last_ckpt = ckpt_path
    start_time = tick_time = time.time()
    tick = []  # (loss, per-branch losses, grad norm) of the steps since the last log line
    try:
        while True:
            noise = draw_step_noise(schedule, generator, G, (cfg.in_channels, cfg.input_size, cfg.input_size),
                                    options["class_dropout"], data.flip, device)
            lr = learning_rate(step, options["lr"], options["warmup"])
            for group in optimizer.param_groups:
                group["lr"] = lr
            losses = forward_backward(net, next(batches), noise, schedule, scaler, amp_dtype, cfg.num_classes)
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), options["grad_clip"] or math.inf)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            ema_update(ema, model, options["ema"])
            step += 1

            # One reduction per step: the mean losses, and whether any process has to stop.
            out_of_time = bool(distributed.is_main() and options["minutes"]
                               and time.time() - start_time > 60 * options["minutes"])
            flags = torch.tensor([float(bool(stop_signal)), float(out_of_time)], device=device)
            reduced = distributed.all_reduce_mean(torch.cat([losses, grad_norm.reshape(1).float(), flags])).tolist()
            if not math.isfinite(reduced[0]):
                raise FloatingPointError(f"non-finite loss at step {step}; last good checkpoint: "
                                         f"{last_ckpt or 'none written yet'}")
            tick.append(reduced[:-2])
            preempted, finished = reduced[-2] > 0, reduced[-1] > 0 or step == steps

            if distributed.is_main() and (step % options["log_every"] == 0 or preempted or finished):
                log_progress(stats_path, tick, step, lr, G, time.time() - tick_time, time.time() - start_time, options)
                tick, tick_time = [], time.time()
            if distributed.is_main() and (step % options["ckpt_every"] == 0 or preempted or finished):
                last_ckpt = save_checkpoint(run_dir, options["keep"], {
                    "config": dataclasses.asdict(cfg), "options": options, "step": step, "model": model.state_dict(),
                    "ema": ema.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                    "rng": rng_state(generator)})
            if distributed.is_main() and options["sample_every"] and step % options["sample_every"] == 0:
                sample_grid(ema, grid, options["cfg_scale"], device, vae, run_dir / "samples" / f"step_{step:07d}.png")
            if preempted:
                distributed.print0(f"stopped by signal at step {step}: wrote {last_ckpt}; continue with "
                                   f"--resume {run_dir}")
                return
            if finished:
                break
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)

    if distributed.is_main():
        plot_loss(read_stats(stats_path), run_dir / "loss.png")
        summary = [f"trained {step} steps in {format_seconds(time.time() - start_time)}; "
                   f"checkpoint: {last_ckpt}", f"loss curve: {run_dir / 'loss.png'}"]
        if options["data"] == "digits" and options["eval_per_class"]:
            summary.append(evaluate_digits(ema, options, device, run_dir, step))
        elif options["sample_every"]:
            path = run_dir / "samples" / f"step_{step:07d}.png"
            if not path.is_file():
                sample_grid(ema, grid, options["cfg_scale"], device, vae, path)
            summary.append(f"samples: {path}")
        print("\n".join(summary), flush=True)


def log_progress(stats_path, tick, step, lr, G, seconds, elapsed, options):
    """Append the mean of the last log interval to stats.jsonl and print a progress line."""
    values = np.mean(tick, axis=0)                          # loss, per-branch losses..., grad norm
    record = {"step": step, "loss": float(values[0]), "loss_branches": values[1:-1].tolist(), "lr": lr,
              "grad_norm": float(values[-1]), "images_per_s": G * len(tick) / seconds,
              "s_per_step": seconds / len(tick), "time": elapsed}
    with open(stats_path, "a") as f:
        f.write(json.dumps(record) + "\n")
    eta = (options["steps"] - step) * record["s_per_step"]
    if options["minutes"]:
        eta = min(eta, max(0.0, 60 * options["minutes"] - elapsed))
    print(f"step {step}/{options['steps']}  loss {record['loss']:.4f} "
          f"({', '.join(f'{v:.4f}' for v in record['loss_branches'])})  lr {lr:.2e}  |g| {record['grad_norm']:.3f}  "
          f"{record['images_per_s']:.1f} img/s  {record['s_per_step']:.3f} s/step  ETA {format_seconds(eta)}",
          flush=True)


def evaluate_digits(ema, options, device, run_dir, step):
    """The demo's metric: share of samples that an SVM of real digits labels as their class."""
    per_class = options["eval_per_class"]
    labels = grid_labels(ema.config.num_classes, per_class)
    path = run_dir / "samples" / f"final_{step:07d}.png"
    s = options["cfg_scale"]
    images = sample_grid(ema, labels, s, device, None, path)
    result = fid.digit_class_accuracy(images, labels)
    record = {"step": step, "samples": len(labels), "sampler_steps": SAMPLE_STEPS, "cfg_scale": s,
              "accuracy": result["accuracy"], "per_class": result["per_class"].tolist()}
    checkpoints.write_text(run_dir / "eval.json", json.dumps(record, indent=2) + "\n")
    return (f"class accuracy of {len(labels)} EMA samples ({per_class} per class, {SAMPLE_STEPS} DPM-Solver steps, "
            f"guidance scale {1 + s:g}, i.e. cfg-scale s = {s:g}) by an SVM of the real digits: "
            f"{100 * result['accuracy']:.1f}%\nsamples: {path}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        train(args)
        distributed.shutdown(wait=True)
    except (ValueError, OSError, ImportError, FloatingPointError) as e:
        main_rank = distributed.is_main()
        distributed.shutdown()
        sys.exit(f"error: {e}" if main_rank else 1)


if __name__ == "__main__":
    main()
