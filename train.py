"""Training DiMR with plain torch.distributed (paper Sec. 3.2 and Sec. 4, the release's settings).

    python train.py                                               # the digits demo, CPU
    torchrun --nproc_per_node=8 train.py --variant m --data in64.npy           # DiMR-M/3R
    torchrun --nproc_per_node=8 train.py --variant xl --data latents/in256.npy # DiMR-XL/2R
    python train.py --resume runs/000-DiMR-S-2R                   # continue where it stopped

Read top to bottom: TrainConfig (every option; the defaults are the release's recipe for XL/2R, and
RECIPES gives each variant's, the digits demo's for DiMR-S/2R), one step
(`train_step`: a step n ~ U{1..1000} and noise eps ~ N(0, I) per image, x_n = sqrt(alpha_bar_n) x_0
+ sqrt(1 - alpha_bar_n) eps, the label replaced by the null class with probability 0.1, the
multi-scale loss sum_r alpha_r |eps_hat_r - eps_r|^2 over the R branches' predictions, AdamW, EMA),
the loop (`train`), then the data each process gets, samples and FID, set-up and the command line.

Randomness: `GlobalBatches` draws n, eps, the class dropout and the flips for the whole global batch
from one generator seeded with --seed, the same on every process, and hands each process its rows.
Image j of the global batch therefore gets the same draws whatever the number of processes or
accumulation steps, so P processes with batch b compute what one process with batch P*b computes,
and one generator state in the checkpoint resumes all processes exactly.

Between log lines no step waits for the device. Once per --log-every steps the processes agree on
the mean losses and on whether to stop (SIGTERM or Ctrl-C, the --minutes budget, a non-finite loss),
then log, checkpoint, sample and compute FID (EDM's "maintenance tick"). A stop signal therefore
takes effect at the end of the current log interval; a NaN stops the run naming the last good
checkpoint, at most one interval late. The run folder: support/run_folder.py.
"""
import argparse
import contextlib
import copy
import dataclasses
import math
import signal
import sys
import time
import typing
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.optim.optimizer import _get_scalar_dtype  # the dtype of AdamW's step count
from torch.utils.data import DataLoader

import diffusion
import dimr
import fid
import sample
from support import checkpoints, data as data_lib, depthwise, distributed, plan as plan_lib
from support import vae as vae_lib
from support.cli import (THREADS_HELP, Parser, add_dataclass_flags, check_fields, flag, number,
                         opt, parse_overrides)
from support.images import save_grid, to_uint8
from support.progress import format_seconds
from support.run_folder import RunFolder, find_checkpoint
from td_ln import TimeDependentParameter


# ----------------------------------------------------------------------------------------------
# Configuration: every option with its default and help

@dataclass(frozen=True)
class TrainConfig:
    """Every training option. The defaults below are the release's recipe for DiMR-XL/2R (its
    configs/*.py and utils.py; PAPER). The recipe depends on the variant: `python train.py
    --variant V` starts from RECIPES[V] (ImageNet 64 variants: lr 3e-4, 300K steps; DiMR-S/2R:
    the digits demo, DEMO), and `python train.py` without --variant runs the demo. Flags override
    the recipe; a resumed run keeps its RUN_KEYS."""
    # model and data
    variant: str = opt("DiMR-XL/2R", f"DiMR variant: {', '.join(dimr.ALIASES)} or the full name")
    arch: tuple[str, ...] = opt((), "KEY=VALUE overrides of the variant: patch_size, depths, "
                                    "widths, num_heads, norm, mlp; e.g. widths=64,32 or norm=ln "
                                    "(Table 5)")
    data: str | None = opt(None, "'digits', ImageNet 64 (.npy from tools/imagenet64.py, or the "
                                 ".npz files), a class-per-folder image directory, or VAE latents "
                                 "(support/data.py)")
    image_size: int | None = opt(None, "digits 8, 16 or 32; crop size of an image folder (default "
                                       "the variant's); other data come at their stored size",
                                 low=1)
    num_classes: int | None = opt(None, "classes of latent data (default the variant's)", low=1)
    multiscale_loss: bool = opt(True, "the multi-scale loss; off: the full-resolution branch's "
                                      "term only (Table 5's rows before '+ multi-scale loss')")
    # optimisation (the release: configs/*.py, utils.py)
    batch_size: int = opt(1024, "global batch over all processes and accumulation steps", low=1)
    micro_batch: int | None = opt(None, "images per process per forward pass (default batch-size "
                                        "/ processes; gradient accumulation makes up the rest)",
                                  low=1)
    lr: float = opt(2e-4, "AdamW learning rate after warm-up", low=0)
    warmup: int = opt(5000, "steps of linear learning-rate warm-up", low=0)
    weight_decay: float = opt(0.03, "AdamW weight decay of all parameters but TD slopes, offsets",
                              low=0)
    betas: tuple[float, float] = opt((0.99, 0.99), "AdamW betas", low=0, high=1)
    ema: float = opt(0.9999, "EMA decay per step of the weights used for sampling", low=0, high=1)
    class_dropout: float = opt(0.1, "probability of replacing a label by the null class", low=0,
                               high=1)
    grad_clip: float | None = opt(None, "clip the gradient norm to this (default: no clipping)",
                                  low=0)
    autocast: str = opt("auto", "fp32, bf16 (autocast) or fp16 (autocast and GradScaler); auto: "
                                "bf16 on CUDA, fp32 on the CPU",
                         choices=("auto", *sample.AUTOCAST), flag="--precision")
    grad_checkpointing: bool = opt(True, "recompute each block in the backward pass")
    compile: bool = opt(False, "torch.compile the model")
    cpu_conv_kernel: bool = opt(False, "CPU only: the depthwise convolutions with a faster "
                                       "backward (support/depthwise.py)")
    steps: int = opt(1_000_000, "optimizer steps of the run", low=1)
    minutes: float | None = opt(None, "stop training after this many minutes of this invocation",
                                low=0)
    seed: int = opt(0, "seed of the initialisation, the data order and the noise", low=0)
    # run folder, logging, samples, FID
    results_dir: str = opt("runs", "parent of the numbered run folders")
    log_every: int = opt(100, "steps per log line and maintenance tick (stop checks)", low=1)
    ckpt_every: int = opt(10_000, "steps per checkpoint, a multiple of --log-every", low=1,
                          multiple_of="log_every")
    keep: int = opt(3, "checkpoints kept (the best-FID one is kept besides)", low=1)
    sample_every: int = opt(10_000, "steps per EMA sample grid, a multiple of --log-every; 0: none",
                            low=0, multiple_of="log_every")
    sample_steps: int = opt(10, "sampler evaluations of grids, FID samples, the final evaluation",
                            low=3)
    guidance: float | None = opt(None, "guidance s of the grids and the final evaluation, as "
                                       "sample.py's --cfg-scale (default: the model's, "
                                       "sample.default_guidance)", low=0, flag="--cfg-scale")
    fid_every: int = opt(0, "steps per FID of EMA samples (no guidance, as the release), a "
                            "multiple of --ckpt-every; 0: none", low=0, multiple_of="ckpt_every")
    fid_ref: str | None = opt(None, "reference statistics .npz (mu, sigma) for --fid-every")
    fid_images: int = opt(10_000, "samples per FID", low=2)
    eval_images: int = opt(200, "samples of the data's own final evaluation, where it has one "
                                "(digits: class accuracy); 0: none", low=0)
    vae: str = opt(vae_lib.DEFAULT_VAE, "latent data: the VAE that decodes samples (vae.load_vae)")
    workers: int = opt(8, "DataLoader worker processes per process that decode an image folder",
                       low=0)
    threads: int | None = opt(None, THREADS_HELP, low=1)


PAPER = TrainConfig()
# The digits demo: DiMR-S/2R on the CPU (docs/demo.md says why it departs from PAPER).
DEMO = replace(PAPER, variant="DiMR-S/2R", data="digits", batch_size=64, lr=3e-3, betas=(0.9, 0.99),
               warmup=100, ema=0.993, steps=1200, minutes=4.5, grad_checkpointing=False,
               cpu_conv_kernel=True, ckpt_every=400, sample_every=400)
RECIPES = {
    "DiMR-XL/2R": PAPER,
    "DiMR-G/2R": replace(PAPER, variant="DiMR-G/2R"),
    "DiMR-XL/3R": replace(PAPER, variant="DiMR-XL/3R"),
    "DiMR-M/3R": replace(PAPER, variant="DiMR-M/3R", lr=3e-4, steps=300_000),  # ImageNet 64
    "DiMR-L/3R": replace(PAPER, variant="DiMR-L/3R", lr=3e-4, steps=300_000),
    "DiMR-S/2R": DEMO,
}
PAPER_DATA = {"DiMR-M/3R": "ImageNet 64x64 (tools/imagenet64.py)",
              "DiMR-L/3R": "ImageNet 64x64 (tools/imagenet64.py)",
              "DiMR-XL/2R": "ImageNet 256 latents (tools/extract_latents.py)",
              "DiMR-G/2R": "ImageNet 256 latents (tools/extract_latents.py)",
              "DiMR-XL/3R": "ImageNet 512 latents (tools/extract_latents.py)"}
# What a run computes: a resumed run keeps these (the others may change, e.g. --steps).
RUN_KEYS = ("variant", "arch", "data", "image_size", "num_classes", "multiscale_loss",
            "batch_size", "lr", "warmup", "weight_decay", "betas", "ema", "class_dropout",
            "grad_clip", "autocast", "seed")
RENAMED = {"precision": "autocast", "cfg_scale": "guidance"}  # fields of older checkpoints
ARCH_KEYS = ("patch_size", "depths", "widths", "num_heads", "norm", "mlp")
IMAGENET_GRID = (207, 360, 387, 974, 88, 979, 417, 279)  # DiT's sample classes
FID_SEED = 10 ** 6  # FID sample i starts from seed FID_SEED + i, the same at every evaluation


# ----------------------------------------------------------------------------------------------
# One step (paper Sec. 3.2)

class Batch(typing.NamedTuple):
    x0: torch.Tensor    # (b, C, H, W) images or latents, flipped along W where drawn
    y: torch.Tensor     # (b,) class ids
    n: torch.Tensor     # (b,) DDPM steps, uniform in 1..1000
    eps: torch.Tensor   # (b, C, H, W) noise
    drop: torch.Tensor  # (b,) bool: replace the label by the null class


@dataclass
class TrainState:
    """What a checkpoint restores besides the configs."""
    KEYS = ("model", "ema", "optimizer", "scaler", "rng")
    model: torch.nn.Module
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    generator: torch.Generator  # the draws of GlobalBatches
    step: int = 0

    def state_dict(self):
        cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
        return {"step": self.step, "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": {"train": self.generator.get_state(), "torch": torch.get_rng_state(),
                        "cuda": cuda}, "threads": torch.get_num_threads()}

    def load_state_dict(self, ckpt, source):
        checkpoints.load_state_dict_strict(self.model, ckpt["model"], source=source)
        checkpoints.load_state_dict_strict(self.ema, ckpt["ema"], source=source)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.generator.set_state(ckpt["rng"]["train"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if ckpt["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
        self.step = ckpt["step"]


def param_groups(model, weight_decay):
    """AdamW groups as the release's utils.trainable_parameters: every parameter decays but the
    TD slopes and offsets w, b (its `nodecay_weight`, `nodecay_bias`)."""
    exempt = {id(p) for m in model.modules() if isinstance(m, TimeDependentParameter)
              for p in (m.w, m.b)}
    params = list(model.parameters())
    return [{"params": [p for p in params if id(p) not in exempt], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) in exempt], "weight_decay": 0.0}]


def create_adamw_state(optimizer):
    """AdamW's state now, as its first step would create it (torch.optim.Adam._init_group: a
    float32 step count, on the device where fused, and two zero moments like each parameter), so
    that it takes its memory before the first step and a checkpoint's size is known from the
    start (support/plan.py). Training is bit for bit the same (tests/test_plan.py)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            on_device = group["fused"] or group["capturable"]
            optimizer.state[p] = {
                "step": torch.zeros((), dtype=_get_scalar_dtype(group["fused"]),
                                    device=p.device if on_device else "cpu"),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}


def learning_rate(step, lr, warmup):
    """Linear warm-up over `warmup` steps, then constant (step = optimizer steps already taken)."""
    return lr * min(1.0, (step + 1) / warmup) if warmup else lr


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, for every parameter (DiMR has no buffers)."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


def train_step(net, state, batches, schedule, cfg, amp_dtype):
    """One optimizer step over this process's micro-batches. Returns, on the device, the mean
    loss, its per-branch terms and the gradient norm: (2 + R,)."""
    model, optimizer, scaler = state.model, state.optimizer, state.scaler
    weights = diffusion.loss_weights(model.config.num_branches, cfg.multiscale_loss)
    accum, losses = len(batches), 0.0
    for k, b in enumerate(batches):
        y = torch.where(b.drop, model.config.num_classes, b.y)    # class dropout: the null class
        x_n = schedule.q_sample(b.x0, b.n, b.eps)                 # x_n ~ q(x_n | x_0)
        with no_sync(net, last=k == accum - 1), torch.autocast(
                b.x0.device.type, amp_dtype, enabled=amp_dtype is not None):
            preds = net(x_n, b.n.float(), y)                      # R x (b, C, H_r, W_r)
            loss, terms = diffusion.multiscale_loss(preds, b.eps, weights)
            scaler.scale(loss / accum).backward()
        losses = losses + torch.stack([loss, *terms]).detach().float() / accum
    scaler.unscale_(optimizer)
    params = list(model.parameters())
    grad_norm = (torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip else
                 torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    ema_update(state.ema, model, cfg.ema)
    state.step += 1
    return torch.cat([losses, grad_norm.reshape(1).float()])


def no_sync(net, last):
    """DDP all-reduces the gradients after the last micro-batch of a step only."""
    if isinstance(net, DistributedDataParallel) and not last:
        return net.no_sync()
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# The loop

def train(cfg, ckpt=None, ckpt_path=None):
    run = setup(cfg, ckpt, ckpt_path)
    stop_signal = []  # SIGTERM (preemption) or Ctrl-C: stop at the end of the log interval
    handlers = {sig: signal.signal(sig, lambda signum, frame: stop_signal.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        tick_step, tick_time, sums, outcome = run.state.step, time.time(), 0.0, None
        while outcome is None:
            lr = learning_rate(run.state.step, cfg.lr, cfg.warmup)
            for group in run.state.optimizer.param_groups:
                group["lr"] = lr
            sums = sums + train_step(run.net, run.state, next(run.batches), run.schedule, cfg,
                                     run.amp_dtype)
            if run.state.step % cfg.log_every == 0 or run.state.step == cfg.steps:
                outcome = maintenance(run, lr, sums, tick_step, tick_time, bool(stop_signal))
                tick_step, tick_time, sums = run.state.step, time.time(), 0.0
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if outcome == "finished" and run.folder:
        with run.writing():
            finish(run)


def maintenance(run, lr, sums, tick_step, tick_time, stop_signal):
    """Once per log interval: agree on the mean losses and on stopping, then log, FID,
    checkpoint, grid. The only place where the processes wait for the device and each other.
    Returns 'preempted', 'finished' or None (go on)."""
    cfg, step = run.cfg, run.state.step
    out_of_time = bool(cfg.minutes) and time.time() - run.start > 60 * cfg.minutes
    flags = torch.tensor([stop_signal, out_of_time], device=run.device)
    reduced = distributed.all_reduce_mean(torch.cat([sums / (step - tick_step), flags])).tolist()
    mean, preempted, finished = reduced[:-2], reduced[-2] > 0, reduced[-1] > 0 or step == cfg.steps
    if not math.isfinite(mean[0]):
        raise FloatingPointError(f"non-finite loss at step {step}; {run.last_good()}")
    fid_value = None
    if cfg.fid_every and step % cfg.fid_every == 0:
        fid_value = compute_fid(run.state.ema, cfg, run.inception, run.fid_ref, run.device, run.vae)
    if run.folder:
        with run.writing():
            log(run, step, lr, mean, step - tick_step, time.time() - tick_time, fid_value)
            if step % cfg.ckpt_every == 0 or preempted or finished:
                run.last_ckpt = run.folder.save(run.checkpoint(), step)
            if cfg.sample_every and step % cfg.sample_every == 0:
                path = run.folder.dir / "samples" / f"step_{step:07d}.png"
                sample_grid(run, path)
    if preempted:
        distributed.print0(f"stopped by signal at step {step}: wrote {run.last_ckpt}; continue "
                           f"with --resume {run.folder.dir if run.folder else ''}")
        return "preempted"
    return "finished" if finished else None


def log(run, step, lr, mean, steps, seconds, fid_value):
    """Rank 0: the interval's means and its peak memory (rank 0's) to stats.jsonl and a progress
    line; the FID, where computed."""
    cfg, elapsed = run.cfg, time.time() - run.start
    record = {"step": step, "loss": mean[0], "loss_branches": mean[1:-1], "lr": lr,
              "grad_norm": mean[-1], "images_per_s": cfg.batch_size * steps / seconds,
              "s_per_step": seconds / steps, "time": elapsed,
              "peak_memory": plan_lib.peak_memory(run.device)}
    run.folder.append(record)
    eta = (cfg.steps - step) * record["s_per_step"]
    if cfg.minutes:
        eta = min(eta, max(0.0, 60 * cfg.minutes - elapsed))
    print(f"step {step}/{cfg.steps}  loss {mean[0]:.4f} "
          f"({', '.join(f'{v:.4f}' for v in mean[1:-1])})  lr {lr:.2e}  |g| {mean[-1]:.3f}  "
          f"{record['images_per_s']:.1f} img/s  {record['s_per_step']:.3f} s/step  "
          f"peak {plan_lib.size(record['peak_memory'])}  ETA {format_seconds(eta)}", flush=True)
    if fid_value is not None:
        run.folder.append({"step": step, "fid": fid_value, "fid_images": cfg.fid_images})
        best = run.folder.new_fid(step, fid_value)
        print(f"step {step}: FID-{cfg.fid_images} {fid_value:.4f}{' (best)' * best}", flush=True)


def finish(run):
    """Rank 0 at the end: what was trained, the best FID, the data's own evaluation or a grid."""
    cfg, state, folder = run.cfg, run.state, run.folder
    trained = state.step - run.start_step
    print(f"trained {trained} step{'s' * (trained != 1)} (step {run.start_step} -> {state.step}) "
          f"in {format_seconds(time.time() - run.start)}; checkpoint: {run.last_ckpt}", flush=True)
    if folder.best_step is not None:
        print(f"best FID-{cfg.fid_images}: {folder.best_fid:.4f} at step {folder.best_step}: "
              f"{folder.checkpoint(folder.best_step)}", flush=True)
    if run.data.evaluate and cfg.eval_images:
        labels = sample.parse_classes("even", cfg.eval_images, run.model_config.num_classes, 0)
        x = sample.generate(state.ema, labels, range(len(labels)), steps=cfg.sample_steps,
                            guidance=run.guidance, batch_size=len(labels), device=run.device)
        print(run.data.evaluate(to_uint8(x), labels, folder.dir, state.step,
                                {"sampler_steps": cfg.sample_steps, "guidance": run.guidance}),
              flush=True)
    elif cfg.sample_every:
        path = folder.dir / "samples" / f"step_{state.step:07d}.png"
        if not path.is_file():
            sample_grid(run, path)
        print(f"samples: {path}", flush=True)


# ----------------------------------------------------------------------------------------------
# Data: each process's rows of the global batch, with their random draws

class GlobalBatches:
    """Step after step, this process's micro-batches of the global batch of G images.

    Epoch e visits the data in the order randperm(N) of seed + e, G images per step (the last
    partial batch is dropped). Each step draws n, eps, the class dropout and the flips of all G
    rows from `generator`, identically on every process; process p of P keeps the rows
    [p G / P, (p + 1) G / P), cut into micro-batches of `micro`.
    """

    def __init__(self, data, G, micro, start_step, generator, class_dropout, seed, workers):
        self.data, self.G, self.micro, self.generator = data, G, micro, generator
        self.class_dropout, self.seed, self.workers = class_dropout, seed, workers
        self.steps_per_epoch = len(data.dataset) // G
        if self.steps_per_epoch == 0:
            raise ValueError(f"the data has {len(data.dataset)} samples, fewer than one global "
                             f"batch of {G}")
        self.epoch, self.position = divmod(start_step, self.steps_per_epoch)
        share = G // distributed.world_size()
        self.rows = slice(distributed.rank() * share, (distributed.rank() + 1) * share)
        self.shape = data.dataset[0][0].shape
        self.loader = self.epoch_loader()

    def epoch_loader(self):
        """This process's images for the rest of the epoch, in micro-batches, in step order."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.data.dataset), generator=g)
        steps = order[:self.steps_per_epoch * self.G].view(self.steps_per_epoch, self.G)
        mine = steps[self.position:, self.rows].reshape(-1).tolist()
        workers = {}
        if self.workers:
            workers = dict(num_workers=self.workers, worker_init_fn=ignore_signals)
        return data_lib.batches(DataLoader(self.data.dataset, batch_size=self.micro, sampler=mine,
                                           pin_memory=self.generator.device.type == "cuda",
                                           **workers))

    def __iter__(self):
        return self

    def __next__(self):
        if self.position == self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
            self.loader = self.epoch_loader()
        self.position += 1
        g, G, rows = self.generator, self.G, self.rows
        n = torch.randint(1, diffusion.NUM_TIMESTEPS + 1, (G,), generator=g, device=g.device)[rows]
        eps = torch.randn((G, *self.shape), generator=g, device=g.device)[rows]
        drop = (torch.rand(G, generator=g, device=g.device) < self.class_dropout)[rows]
        flip = (torch.rand(G, generator=g, device=g.device) < 0.5)[rows] if self.data.flip else None
        batches = []
        for k in range(0, len(n), self.micro):
            x0, y = (v.to(g.device, non_blocking=True) for v in next(self.loader))
            part = slice(k, k + self.micro)
            if flip is not None:
                x0 = torch.where(flip[part, None, None, None], x0.flip(-1), x0)
            batches.append(Batch(x0, y, n[part], eps[part], drop[part]))
        return batches


def ignore_signals(worker_id):
    """DataLoader workers leave SIGTERM / SIGINT to the training process, which checkpoints."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ----------------------------------------------------------------------------------------------
# Samples: grids and FID

def grid_layout(num_classes):
    """The sample grids' classes and columns, one class per row: DiT's eight, 4 each, for
    ImageNet; else the first ten, 10 each."""
    if num_classes == data_lib.IMAGENET_CLASSES:
        return np.repeat(np.array(IMAGENET_GRID), 4), 4
    return np.repeat(np.arange(min(num_classes, 10)), 10), 10


def sample_grid(run, path):
    """EMA samples of the grid's classes from seeds 0..N-1, saved as a labelled grid."""
    ema = run.state.ema
    labels, ncol = grid_layout(ema.config.num_classes)
    x = sample.generate(ema, labels, range(len(labels)), steps=run.cfg.sample_steps,
                        guidance=run.guidance, batch_size=len(labels), device=run.device)
    images = sample.decode_to_uint8(x.to(run.device), ema.config, run.vae)
    save_grid(images, labels, path, ncol=ncol)


def compute_fid(ema, cfg, inception, ref, device, vae):
    """FID of cfg.fid_images EMA samples (evenly over the classes, seeds FID_SEED + i, without
    guidance, as the release's training-time FID). Every process samples and embeds its share;
    the features are gathered. Returns the FID on rank 0, None on the others."""
    labels = sample.parse_classes("even", cfg.fid_images, ema.config.num_classes, 0)
    mine = np.arange(distributed.rank(), cfg.fid_images, distributed.world_size())
    features = []
    for batch in np.array_split(mine, max(1, math.ceil(len(mine) / 64))):
        x = sample.generate(ema, labels[batch], FID_SEED + batch, steps=cfg.sample_steps,
                            guidance=0.0, batch_size=len(batch), device=device)
        images = sample.decode_to_uint8(x.to(device), ema.config, vae)
        features.append(fid.inception_features(images, inception))
    features = distributed.gather_rows(torch.from_numpy(np.concatenate(features)).to(device))
    if not distributed.is_main():
        return None
    return fid.frechet_distance(*fid.feature_statistics(features.cpu().numpy()), *ref)


# ----------------------------------------------------------------------------------------------
# Set-up, in named pieces

@dataclass
class Run:
    """What one invocation of train() works with."""
    cfg: TrainConfig
    device: torch.device
    data: data_lib.TrainingData
    model_config: dimr.DiMRConfig
    state: TrainState
    net: torch.nn.Module                # the model as trained: compiled and/or wrapped in DDP
    batches: GlobalBatches
    amp_dtype: torch.dtype | None
    guidance: float                     # s of the grids and the final evaluation
    vae: torch.nn.Module | None = None  # latent models: decodes grids and FID samples
    inception: torch.nn.Module | None = None  # --fid-every: the FID network and the reference
    fid_ref: tuple | None = None
    folder: RunFolder | None = None     # rank 0 only
    last_ckpt: Path | None = None
    schedule: diffusion.DiscreteSchedule = field(default_factory=diffusion.DiscreteSchedule)
    start: float = field(default_factory=time.time)
    start_step: int = 0

    def checkpoint(self):
        return checkpoint_of(self.model_config, self.cfg, self.state)

    def last_good(self):
        return f"last good checkpoint: {self.last_ckpt or 'none written yet'}"

    @contextlib.contextmanager
    def writing(self):
        """A write that fails (a full disk, a lost mount) also says what is safe."""
        try:
            yield
        except OSError as e:
            raise checkpoints.WriteError(f"{e}; {self.last_good()}") from None


def checkpoint_of(model_config, cfg, state):
    return {"config": dataclasses.asdict(model_config), "train_config": dataclasses.asdict(cfg),
            **state.state_dict()}


def setup(cfg, ckpt, ckpt_path):
    """Device, data, model, optimizer and what a checkpoint restores; rank 0 opens the folder."""
    device = open_device(cfg.threads)
    autocast = resolve_autocast(cfg.autocast, device)
    fid_ref = fid.load_statistics(cfg.fid_ref) if cfg.fid_every else None  # a bad file: at once
    data = open_training_data(cfg)
    model_config = build_model_config(cfg, data)
    micro, accum = split_batch(cfg.batch_size, distributed.world_size(), cfg.micro_batch)
    state = new_state(model_config, cfg, device, autocast)
    if ckpt is not None:
        restore(state, ckpt, ckpt_path, cfg, model_config)
    guidance, why = ((cfg.guidance, "given") if cfg.guidance is not None else
                     sample.default_guidance(model_config))
    run = Run(cfg=cfg, device=device, data=data, model_config=model_config, state=state,
              net=wrap(state.model, cfg, device),
              batches=GlobalBatches(data, cfg.batch_size, micro, state.step, state.generator,
                                    cfg.class_dropout, cfg.seed, workers_for(data, cfg.workers)),
              amp_dtype=sample.AUTOCAST[autocast], guidance=guidance, last_ckpt=ckpt_path,
              start_step=state.step)
    if vae_lib.is_latent(model_config) and (cfg.sample_every or cfg.fid_every):
        run.vae = vae_lib.load_vae(cfg.vae, device)
    if cfg.fid_every:
        run.inception, run.fid_ref = fid.load_inception(device=device), fid_ref
    # the plan before the run folder: a run that cannot start leaves none behind
    resume_dir = find_checkpoint(ckpt_path)[0] if ckpt else None
    lines, error, warning = (plan(state, cfg, model_config, distributed.world_size(), resume_dir)
                             if distributed.is_main() else (None,) * 3)
    distributed.raise_from_main(error)
    if distributed.is_main():
        run.folder = open_folder(run, resume=ckpt_path if ckpt else None, micro=micro,
                                 accum=accum, autocast=autocast, guidance_why=why)
        print_plan(lines, warning)
    return run


def plan(state, cfg, model_config, world_size, run_dir=None):
    """support/plan.py's lines, error and warning for this state on `world_size` processes, at
    the run folder (None: a new one under --results-dir)."""
    labels, ncol = grid_layout(model_config.num_classes)
    side = model_config.input_size * (vae_lib.DOWNSAMPLE if vae_lib.is_latent(model_config) else 1)
    grids = ((-(-cfg.steps // cfg.sample_every), plan_lib.grid_bytes(
        labels, side, ncol)) if cfg.sample_every else (0, 0))
    ckpt = {**checkpoint_of(model_config, cfg, state), "step": cfg.steps}  # the largest step
    if ckpt["scaler"]:  # fp16: the largest count of the GradScaler, too
        ckpt["scaler"] = {**ckpt["scaler"], "_growth_tracker": ckpt["scaler"]["growth_interval"]}
    return plan_lib.describe(plan_lib.memory(state, world_size), plan_lib.saved_bytes(ckpt), cfg,
                             grids, run_dir or cfg.results_dir,
                             plan_lib.on_disk(run_dir) if run_dir else 0)


def print_plan(lines, warning):
    print("\n".join(lines), flush=True)
    if warning:
        print(warning, file=sys.stderr, flush=True)


def open_training_data(cfg):
    """--data for the variant: its size and classes where the data do not fix them; latents are
    an error for the ImageNet 64 variants, which work on RGB pixels (the small DiMR-S/2R takes
    whatever data it is given)."""
    variant = dimr.get_config(cfg.variant)
    return data_lib.open_data(cfg.data, cfg.image_size, cfg.num_classes, variant.input_size,
                              variant.num_classes,
                              pixel_model=cfg.variant if variant.in_channels == 3 else None)


def open_device(threads):
    """Join the process group (under torchrun) and set the threads; this process's device."""
    device = distributed.init()
    distributed.set_threads(threads)
    if device.type == "cuda":  # TF32 matmuls for the fp32 parts, as DiT
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return device


def open_folder(run, resume, micro, accum, autocast, guidance_why):
    """Rank 0: the run folder (new, or the resumed run's) with config.json, and a summary."""
    cfg, model_config, data, step = run.cfg, run.model_config, run.data, run.state.step
    params = sum(p.numel() for p in run.state.model.parameters())
    folder = RunFolder(cfg.results_dir, cfg.variant, find_checkpoint(resume)[0] if resume else None,
                       step, {"train_config": dataclasses.asdict(cfg),
                              "model": dataclasses.asdict(model_config), "parameters": params,
                              "data": data.description, "class_names": data.class_names,
                              "world_size": distributed.world_size(), "micro_batch": micro,
                              "accumulation": accum, "device": str(run.device),
                              "threads": torch.get_num_threads(), "torch": torch.__version__},
                       cfg.keep)
    print(f"{f'resuming {resume} at step {step}' if resume else 'new run'}: {folder.dir}\n"
          f"model: {cfg.variant} {model_config}, {params:,} parameters\n"
          f"data: {data.description}\n"
          f"batch {cfg.batch_size} = {distributed.world_size()} process(es) x {micro} x {accum} "
          f"accumulation step(s); {cfg.steps} steps"
          f"{', at most %g minutes' % cfg.minutes if cfg.minutes else ''}; lr {cfg.lr}, "
          f"warm-up {cfg.warmup}, EMA {cfg.ema}, {autocast} on {run.device}, "
          f"{torch.get_num_threads()} CPU thread(s)\n"
          f"samples: guidance s = {run.guidance:g} ({guidance_why}), {cfg.sample_steps} steps",
          flush=True)
    return folder


def workers_for(data, workers):
    """DataLoader workers decode image files; arrays (memory-mapped or not) read faster without
    them (docs/data.md)."""
    return workers if isinstance(data.dataset, data_lib.ImageFolderDataset) else 0


def resolve_autocast(autocast, device):
    """--precision: 'auto' is bf16 on CUDA, fp32 elsewhere."""
    if autocast != "auto":
        return autocast
    return "bf16" if device.type == "cuda" else "fp32"


def build_model_config(cfg, data):
    """The variant's config with the --arch overrides and the data's size, channels, classes
    (data None: the variant's own)."""
    shape = {} if data is None else dict(input_size=data.image_size, in_channels=data.channels,
                                         num_classes=data.num_classes)
    return dimr.get_config(cfg.variant, **parse_overrides(cfg.arch, dimr.DiMRConfig, ARCH_KEYS),
                           **shape)


def plan_only(cfg, ckpt_path, processes):
    """--plan: the plan of the run on `processes` processes, from the same state as FakeTensors
    (shapes without memory), on this machine's device; no run folder, no step."""
    device = open_device(cfg.threads)
    autocast = resolve_autocast(cfg.autocast, device)
    data = open_training_data(cfg) if cfg.data else None
    model_config = build_model_config(cfg, data)
    micro, accum = split_batch(cfg.batch_size, processes, cfg.micro_batch)
    with warnings.catch_warnings():  # deepcopy asks FakeTensors for a data pointer (None)
        warnings.filterwarnings("ignore", "Accessing the data pointer of FakeTensor")
        state = new_state(model_config, cfg, device, autocast, fake=True)
    lines, error, warning = plan(state, cfg, model_config, processes,
                                 find_checkpoint(ckpt_path)[0] if ckpt_path else None)
    params = sum(p.numel() for p in state.model.parameters())
    print(f"{cfg.variant} {model_config}, {params:,} parameters; batch {cfg.batch_size} = "
          f"{processes} process(es) x {micro} x {accum} accumulation step(s); {cfg.steps} steps, "
          f"{autocast} on {device}", flush=True)
    if error:
        raise ValueError(error)
    print_plan(lines, warning)


def split_batch(batch_size, world_size, micro_batch=None):
    """Global batch -> (images per process per forward pass, accumulation steps)."""
    if batch_size % world_size:
        raise ValueError(f"--batch-size {batch_size} is not divisible by the {world_size} "
                         "processes")
    per_process = batch_size // world_size
    micro = micro_batch or per_process
    if per_process % micro:
        raise ValueError(f"--batch-size {batch_size} over {world_size} processes is {per_process} "
                         f"per process, not a multiple of --micro-batch {micro}")
    return micro, per_process // micro


def new_state(model_config, cfg, device, autocast, fake=False):
    """A fresh model (the same initial weights on every process), its EMA, AdamW (fused on
    CUDA) with its state, the fp16 gradient scaler and the data generator. fake (--plan): the
    same tensors as FakeTensors, without memory or values (the model is built on the meta device,
    as its initialisation reads values; operations on FakeTensors give FakeTensors)."""
    torch.manual_seed(cfg.seed)
    with torch.device("meta") if fake else contextlib.nullcontext():
        model = dimr.DiMR(model_config)
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext():
        model = depthwise.channels_last_kernels(model.to_empty(device=device) if fake else
                                                model.to(device))
    if cfg.cpu_conv_kernel and device.type == "cpu":
        depthwise.use_fast_depthwise_backward(model)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                  betas=cfg.betas, fused=device.type == "cuda")
    create_adamw_state(optimizer)
    return TrainState(model, copy.deepcopy(model).requires_grad_(False).eval(), optimizer,
                      torch.amp.GradScaler(device.type, enabled=autocast == "fp16"),
                      torch.Generator(device).manual_seed(cfg.seed))


def restore(state, ckpt, ckpt_path, cfg, model_config):
    """Load a checkpoint into a fresh state, after checking that it is this run's."""
    stored = dimr.config_from_dict(ckpt["config"])
    if stored != model_config:
        raise ValueError(f"{ckpt_path} holds a model {stored}, but the options and data give "
                         f"{model_config}")
    state.load_state_dict(ckpt, str(ckpt_path))
    if state.step >= cfg.steps:
        raise ValueError(f"{ckpt_path} is at step {state.step}, the run's --steps is "
                         f"{cfg.steps}: give a larger --steps to continue")
    threads = ckpt.get("threads", torch.get_num_threads())
    if threads != torch.get_num_threads() and state.generator.device.type == "cpu":
        distributed.print0(f"note: the run used {threads} CPU threads per process and continues "
                           f"with {torch.get_num_threads()}: float sums split differently, so the "
                           "results will differ from an uninterrupted run in the last digits")


def wrap(model, cfg, device):
    """The model as trained: gradient checkpointing, torch.compile and DDP where asked."""
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    net = torch.compile(model) if cfg.compile else model
    if distributed.world_size() > 1:
        net = DistributedDataParallel(net, device_ids=None if device.index is None else
                                      [device.index])
    return net


# ----------------------------------------------------------------------------------------------
# Command line

def build_parser():
    differs = {name: ", ".join(f"{k} {v}" for k, v in dataclasses.asdict(r).items()
                               if k != "variant" and v != getattr(PAPER, k))
               for name, r in RECIPES.items() if r is not DEMO}
    p = Parser(
        description="Train DiMR, as one process or under torchrun. Without arguments: the digits "
                    "demo (DiMR-S/2R on scikit-learn's 8x8 digits, CPU). Defaults are the "
                    "release's recipe, or the demo's where they differ; with --resume, the run's.",
        epilog="The paper variants take the defaults, except "
               + "; ".join(f"{name}: {d}" for name, d in differs.items() if d) + ".",
        usage="%(prog)s [--resume RUN_DIR_OR_CKPT] [--OPTION VALUE ...]",
        argument_default=argparse.SUPPRESS,
        formatter_class=lambda prog: argparse.HelpFormatter(prog, max_help_position=30, width=100))
    p.add_argument("--resume", metavar="RUN_DIR_OR_CKPT",
                   help="continue a run from its last checkpoint (or the given one)")
    p.add_argument("--plan", metavar="PROCESSES", type=number(int, 1),
                   help="print what the run needs on this many processes (memory, checkpoint "
                        "size, disk) and exit, without training or the model's memory; --data "
                        "is optional (default: the variant's input)")
    add_dataclass_flags(p, TrainConfig, shown=DEMO,
                        variant=dict(choices=dimr.VARIANT_CHOICES, metavar="NAME"))
    return p


def parse_config(argv=None):
    """TrainConfig from the command line: the variant's recipe, or with --resume the run's stored
    config, updated by the flags given. Returns (config, checkpoint or None, its path or None,
    --plan's processes or None)."""
    given = vars(build_parser().parse_args(argv))
    resume, processes = given.pop("resume", None), given.pop("plan", None)
    if "variant" in given:
        given["variant"] = dimr.ALIASES.get(given["variant"], given["variant"])
    if given.get("data") not in (None, "digits"):  # a run resumed elsewhere still finds its data
        given["data"] = str(Path(given["data"]).resolve())
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
    check_fields(replace(PAPER, **given))  # the flags' ranges, before reading anything
    ckpt, ckpt_path = None, None
    if resume:
        ckpt_path = find_checkpoint(resume)[1]
        ckpt = checkpoints.load(ckpt_path)
        missing = {"train_config", "config", "step", *TrainState.KEYS} - set(ckpt)
        if missing:
            raise ValueError(f"{ckpt_path}: not a train.py checkpoint (missing {sorted(missing)})")
        base = TrainConfig(**{RENAMED.get(k, k): tuple(v) if isinstance(v, list) else v
                              for k, v in ckpt["train_config"].items()})
        changed = [k for k in RUN_KEYS if k in given and given[k] != getattr(base, k)]
        if changed:
            raise ValueError(f"{flag(changed[0], TrainConfig)} {given[changed[0]]} differs from "
                             f"the run's {getattr(base, changed[0])} ({ckpt_path}); a resumed run "
                             "keeps the options it was started with")
    else:
        base = RECIPES[given.get("variant", DEMO.variant)]
        if base is not DEMO and "data" not in given and not processes:
            raise ValueError(f"{base.variant} trains on {PAPER_DATA[base.variant]}: give --data "
                             "(or --data digits for the demo data)")
    cfg = replace(base, **given)
    check_config(cfg)
    return cfg, ckpt, ckpt_path, processes


def check_config(c):
    """The fields' constraints (opt(...), support/cli.py), and --fid-ref with --fid-every."""
    check_fields(c)
    if c.fid_every and not c.fid_ref:
        raise ValueError("--fid-every needs --fid-ref (reference statistics, from `fid.py ref`)")


def main(argv=None):
    def work():
        cfg, ckpt, ckpt_path, processes = parse_config(argv)
        if processes:
            plan_only(cfg, ckpt_path, processes)
        else:
            train(cfg, ckpt, ckpt_path)
    distributed.run_main(work)


if __name__ == "__main__":
    main()
