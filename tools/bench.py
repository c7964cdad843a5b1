"""Speed and memory of DiMR, measured: training and sampling throughput, TFLOP/s, MFU, peak memory.

    python -m tools.bench --variant s                                  # the demo variant, CPU
    python -m tools.bench --variant xl --batch 32 64 --precision bf16  # a GPU
    python -m tools.bench --variant xl --arch depths=5,5 widths=256,128 num_heads=4   # smaller

Training: train.train_step, the step train.py runs (forward, multi-scale loss, backward, AdamW,
EMA), on a synthetic micro-batch of the model's input shape; --warmup steps are excluded and
--steps are timed. Sampling: sample.generate with its default sampler at --sample-steps model
evaluations, with guidance (the conditional and null-class halves in one batch of 2x the images).

FLOPs are counted as in the README's cost estimate: 2 FLOPs per multiply-accumulate, the MACs of one
forward pass from `tools.count.count` (batch 1, as `python -m tools.count` prints it), and a
training
image costs 3 forward passes (forward, backward = 2 forwards), 4 with gradient checkpointing (the
forward is recomputed). MFU is the achieved training TFLOP/s over --peak-tflops, by default the
card's bf16 dense peak when its name is in PEAK_TFLOPS. Peak memory: on CUDA the most the
allocator held during a configuration (torch.cuda.max_memory_allocated); on the CPU the process's
maximum resident set so far (it never goes down, so later rows include earlier ones).

One markdown table row per configuration: every combination of --batch and --precision.
"""
import argparse
import dataclasses
import resource
import time

import torch
from torch.utils.data import DataLoader

import diffusion
import dimr
import sample
import train
from support import data as data_lib, distributed
from support.cli import Parser, add_threads_flag, number, parse_overrides
from tools.count import count

PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0}  # bf16 dense, per the data sheets
FORWARDS_PER_TRAINING_IMAGE = 3       # forward + backward (= 2 forward passes)
FORWARDS_RECOMPUTED = 1               # gradient checkpointing runs each block's forward again
GUIDANCE = 0.4  # sampling is timed with guidance: each evaluation runs a doubled batch
COLUMNS = ("variant", "device", "precision", "micro-batch", "grad. ckpt", "compile",
           "train img/s", "GFLOP/img", "TFLOP/s", "MFU", "peak memory", "sample img/s")


def forward_passes_per_training_image(grad_checkpointing):
    return FORWARDS_PER_TRAINING_IMAGE + FORWARDS_RECOMPUTED * grad_checkpointing


def training_flops_per_image(macs, grad_checkpointing):
    """FLOPs of one training image from the forward MACs at batch 1 (README, cost estimate)."""
    return 2 * macs * forward_passes_per_training_image(grad_checkpointing)


def peak_tflops(device, given):
    if given is not None:
        return given
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return None


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_bytes(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def synthetic_batch(config, batch, device, generator, class_dropout):
    """One micro-batch of the model's input shape, drawn as GlobalBatches draws its noise."""
    shape = (batch, config.in_channels, config.input_size, config.input_size)
    return train.Batch(
        x0=torch.randn(shape, generator=generator, device=device),
        y=torch.randint(0, config.num_classes, (batch,), generator=generator, device=device),
        n=torch.randint(1, diffusion.NUM_TIMESTEPS + 1, (batch,), generator=generator,
                        device=device),
        eps=torch.randn(shape, generator=generator, device=device),
        drop=torch.rand(batch, generator=generator, device=device) < class_dropout)


def time_training(net, state, batch, recipe, amp_dtype, warmup, steps, device):
    """Seconds per optimizer step over `steps` steps after `warmup` untimed ones."""
    schedule = diffusion.DiscreteSchedule()
    for _ in range(warmup):
        train.train_step(net, state, [batch], schedule, recipe, amp_dtype)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        train.train_step(net, state, [batch], schedule, recipe, amp_dtype)
    synchronize(device)
    return (time.perf_counter() - start) / steps


def time_sampling(net, config, batch, sample_steps, amp_dtype, device, warmup):
    """Seconds to sample `batch` images with guidance, after one untimed guided evaluation (a
    batch of 2 x `batch`) if warmup."""
    labels = torch.arange(batch) % config.num_classes
    if warmup:
        x = torch.zeros(2 * batch, config.in_channels, config.input_size, config.input_size,
                        device=device)
        with torch.no_grad(), torch.autocast(device.type, amp_dtype, enabled=amp_dtype is not None):
            net(x, torch.full((2 * batch,), 500.0, device=device), labels.repeat(2).to(device))
    synchronize(device)
    start = time.perf_counter()
    sample.generate(net, labels, range(batch), steps=sample_steps,
                    guidance=GUIDANCE, batch_size=batch, device=device,
                    amp_dtype=amp_dtype)
    synchronize(device)
    return time.perf_counter() - start


def measure(args, config, recipe, macs, device, batch, precision):
    """One configuration -> the values of COLUMNS (sampling uses the trained weights)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    kernel = recipe.cpu_conv_kernel if args.cpu_conv_kernel is None else args.cpu_conv_kernel
    state = train.new_state(config, dataclasses.replace(recipe, seed=args.seed,
                                                           cpu_conv_kernel=kernel),
                            device, precision)
    state.model.set_grad_checkpointing(args.grad_checkpointing)
    net = torch.compile(state.model) if args.compile else state.model
    amp_dtype = sample.AUTOCAST[precision]
    g = torch.Generator(device).manual_seed(args.seed)
    x = synthetic_batch(config, batch, device, g, recipe.class_dropout)
    step_s = time_training(net, state, x, recipe, amp_dtype, args.warmup, args.steps, device)
    train_ips = batch / step_s
    flops = training_flops_per_image(macs, args.grad_checkpointing)
    tflops = flops * train_ips / 1e12
    peak = peak_tflops(device, args.peak_tflops)
    sample_ips = "-"
    if args.sample_steps:
        seconds = time_sampling(net, config, batch, args.sample_steps, amp_dtype, device,
                                args.warmup > 0)
        sample_ips = f"{batch / seconds:.4g} ({args.sample_steps} evals)"
    return (label(args), device_name(device), precision, batch,
            "on" if args.grad_checkpointing else "off", "on" if args.compile else "off",
            f"{train_ips:.4g}", f"{flops / 1e9:.6g}", f"{tflops:.4g}",
            "-" if peak is None else f"{100 * tflops / peak:.1f}%",
            f"{peak_memory_bytes(device) / 2 ** 30:.2f} GiB", sample_ips)


def label(args):
    return " ".join([dimr.ALIASES.get(args.variant, args.variant), *args.arch])


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"CPU, {threads} thread" + "s" * (threads > 1)


def build_parser():
    p = Parser(description="Measure DiMR's training and sampling speed and memory; one markdown "
                           "table row per combination of --batch and --precision.")
    p.add_argument("--variant", choices=dimr.VARIANT_CHOICES, default="s", metavar="NAME",
                   help=f"{', '.join(dimr.ALIASES)} or the full name (default s)")
    p.add_argument("--arch", nargs="+", default=(), metavar="KEY=VALUE",
                   help="overrides of the variant, as train.py --arch: e.g. widths=256,128")
    p.add_argument("--batch", type=number(int, 1), nargs="+", default=[32],
                   help="micro-batches (images per forward pass) to measure (default 32)")
    p.add_argument("--precision", nargs="+", default=["auto"],
                   choices=("auto", *sample.AUTOCAST),
                   help="autocast precisions to measure; auto: bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="recompute each block in the backward pass (default off)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the model (default off)")
    p.add_argument("--cpu-conv-kernel", action=argparse.BooleanOptionalAction, default=None,
                   help="the CPU depthwise-convolution kernel (support/depthwise.py; default: as "
                        "the variant's recipe in train.py, on for the demo variant s)")
    p.add_argument("--warmup", type=number(int, 0), default=3,
                   help="untimed steps first (default 3)")
    p.add_argument("--steps", type=number(int, 1), default=10,
                   help="timed training steps (default 10)")
    p.add_argument("--sample-steps", type=number(int, 0), default=sample.DEFAULT_STEPS,
                   help=f"sampler evaluations, 0: no sampling (default {sample.DEFAULT_STEPS})")
    p.add_argument("--peak-tflops", type=number(float, above=0), default=None,
                   help="the device's peak for MFU (default: bf16 dense of a known card: "
                        + ", ".join(f"{k} {v:g}" for k, v in PEAK_TFLOPS.items()) + ")")
    add_threads_flag(p)
    p.add_argument("--seed", type=number(int, 0), default=0)
    p.add_argument("--data", default=None,
                   help="instead: time the loader alone on this training data (train.py --data), "
                        "micro-batches of --batch in random order, for each of --workers")
    p.add_argument("--workers", type=number(int, 0), nargs="+", default=[0],
                   help="DataLoader workers to time the loader with (default 0)")
    return p


def time_loader(args):
    """Images/s of the DataLoader alone on args.data, micro-batches of each --batch in a random
    order of the data (the first is not timed), for each --workers."""
    data = data_lib.open_data(args.data)
    print(f"{data.description}: the loader alone, {args.steps * 10} micro-batches timed")
    for batch in args.batch:
        for workers in args.workers:
            order = torch.randperm(len(data.dataset),
                                   generator=torch.Generator().manual_seed(args.seed)).tolist()
            loader = iter(DataLoader(data.dataset, batch_size=batch, sampler=order,
                                     num_workers=workers))
            next(loader)
            start = time.perf_counter()
            for _ in range(args.steps * 10):
                next(loader)
            seconds = (time.perf_counter() - start) / (args.steps * 10)
            print(f"micro-batch {batch}, {workers} workers: {batch / seconds:.0f} images/s "
                  f"({1e3 * seconds:.1f} ms per micro-batch)", flush=True)


def run(args):
    device = distributed.init()
    distributed.set_threads(args.threads)
    if args.data:
        return time_loader(args)
    if device.type == "cuda":  # as train.py: TF32 matmuls for the fp32 parts
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    name = dimr.ALIASES.get(args.variant, args.variant)
    config = dimr.get_config(name, **parse_overrides(args.arch, dimr.DiMRConfig,
                                                        train.ARCH_KEYS))
    recipe = train.RECIPES[name]
    macs = sum(row[2] for row in count(config))
    forwards = forward_passes_per_training_image(args.grad_checkpointing)
    print(f"{name} {config}: {macs / 1e9:.6g} GMACs per forward pass (tools/count.py, batch "
          f"1); a training image = 2 FLOPs/MAC x {forwards} forward passes (README, cost "
          "estimate)", flush=True)
    print("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS), flush=True)
    for precision in args.precision:
        for batch in args.batch:
            try:
                row = measure(args, config, recipe, macs, device, batch,
                              train.resolve_autocast(precision, device))
            except torch.OutOfMemoryError:
                row = (label(args), device_name(device), precision, batch, "", "",
                       "out of memory", *[""] * 5)
            print("| " + " | ".join(map(str, row)) + " |", flush=True)


def main(argv=None):
    args = build_parser().parse_args(argv)
    distributed.run_main(lambda: run(args))


if __name__ == "__main__":
    main()
