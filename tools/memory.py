"""Device memory of a training step, predicted on the CPU: which micro-batch fits which card.

    python -m tools.memory                             # m, l, xl, g, xl_3r; checkpointing on, off
    python -m tools.memory m --checkpointing on        # one variant, one setting
    python -m tools.memory g --fake                    # G/2R: more RAM than this machine has
    python -m tools.memory --table                     # the stored table (--json's file), no step

What it predicts: `torch.cuda.max_memory_allocated` of one training step of train.py on a CUDA card,
in bytes, as a function of the micro-batch b (images per process per forward pass): bf16 autocast
(train.py's default on CUDA), fused AdamW, EMA, gradient checkpointing on (train.py's default) or
off, and for world size > 1 DDP's gradient buckets.

How. One real step, `train.train_step` itself, runs on the CPU with the model, EMA and AdamW built
as train.new_state builds them (AdamW fused, as on CUDA, with its state created before the step),
under bf16 autocast, inside `LiveBytes`: a TorchDispatchMode that sees every tensor an
aten op returns and counts its storage once, from its creation until its weakref finalizer runs,
rounded up to the 512-byte blocks of CUDA's caching allocator. What exists before the step, the
parameters, the EMA's copy and AdamW's exp_avg, exp_avg_sq and step, is the static part; the
gradients, autocast's bf16 copies of the weights (kept until the autocast region ends, after the
backward pass), the batch and the activations are the step's. Two CPU-versus-CUDA differences of
the ops this model runs are applied (`cuda_rules`): CUDA's autocast runs layer_norm in float32
(CPU's in the input's dtype: the cascade's output norm), and CUDA's flash attention pads a head
dimension to a multiple of 8 (XL's 60 -> 64). We know of no other difference in what the ops DiMR
runs allocate; none of this has been checked on a card (docs/speed.md says how to).

Why two micro-batches are enough. The step runs the same ops in the same order whatever b, and
every tensor either has the batch dimension or not, so the live bytes after the k-th allocation
are c_k + s_k b: the timelines of two micro-batches give every c_k and s_k, and the peak is
peak(b) = static + max_k (c_k + s_k b), kept as its upper envelope, a few lines (`Coefficients`).
It is not one line: at small b the peak is the end of the backward pass (all gradients and the
bf16 weights, no activations), at large b a point inside it; a straight line through b = 1 and 2
misses the large-b peak badly (tests/test_memory.py). `--fake` runs the same step on FakeTensors
(no memory, no arithmetic): the same ops, so the same timeline, byte for byte (tested); it is how
a model too large for this machine's RAM is measured.

Not counted, and left to the headroom (--headroom-gib, 2 by default, subtracted from the card's
nominal capacity taken as 10^9 bytes per GB, a little less than CUDA reports):
- the CUDA context (0.5-1 GB, outside the allocator) and NCCL's buffers under torchrun;
- the caching allocator's reserved but unallocated memory (fragmentation: max_memory_reserved
  minus max_memory_allocated; PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True keeps it small)
  and its rounding of large blocks past 512 bytes;
- memory a kernel allocates for itself: cuBLAS and cuDNN workspaces, flash attention's float32
  gradient accumulator in its backward pass (one layer at a time);
- what train.py holds besides the step: GlobalBatches draws the noise of the whole global batch
  on every process (batch-size x one image: 48 MiB for M/3R at 1024), sample grids and FID
  evaluations (no gradients, between steps), torch.compile's buffers (--compile).
Counted explicitly for world size > 1: DDP's gradient buckets, one more float32 copy of the
gradients (train.py leaves gradient_as_bucket_view off), allocated when DDP wraps the model.
"""
import contextlib
import copy
import dataclasses
import gc
import json
import math
import sys
import time
import types
import warnings
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import diffusion
import dimr
import train
from support import checkpoints, depthwise, distributed, provenance
from support.cli import Parser, add_threads_flag, number

ROOT = Path(__file__).resolve().parents[1]
TABLE_JSON = ROOT / "docs" / "data" / "memory.json"
PAPER_VARIANTS = ("m", "l", "xl", "g", "xl_3r")
CUDA_BLOCK_BYTES = 512          # the caching allocator rounds every allocation up to this
GiB = 2 ** 30
CARDS_BYTES = {"A100 40GB": 40e9, "A100 80GB": 80e9, "H100 80GB": 80e9, "H200 141GB": 141e9}
MICRO_BATCHES = (1, 2)
AUTOCAST_DTYPE = torch.bfloat16  # train.py's autocast on CUDA


# ----------------------------------------------------------------------------------------------
# Counting live tensor bytes

def block_bytes(nbytes, round_to=CUDA_BLOCK_BYTES):
    """What an allocation of `nbytes` adds to max_memory_allocated (round_to 0: nbytes)."""
    return max(round_to, -(-nbytes // round_to) * round_to) if round_to else nbytes


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages that ops create inside the mode and that are still alive:
    `now`, its maximum `peak`, and `timeline`, `now` after each new storage. Tensors that existed
    before (parameters, optimizer state) are not counted, nor their views."""

    def __init__(self, round_to=CUDA_BLOCK_BYTES):
        super().__init__()
        self.round_to, self.sizes, self.now, self.peak, self.timeline = round_to, {}, 0, 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # a view or an in-place result shares an input's storage: that memory is not new, and
        # where the input existed before the mode (a parameter's `t()`), it is not the step's
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in inputs:
                self.add(t.untyped_storage())
        return out

    def add(self, storage):
        key = storage._cdata  # the C++ StorageImpl: one per allocation, whatever the views
        if key in self.sizes:
            return
        self.sizes[key] = block_bytes(storage.nbytes(), self.round_to)
        self.now += self.sizes[key]
        self.peak = max(self.peak, self.now)
        self.timeline.append(self.now)
        # storages keep their Python object while alive, so this runs when the memory is freed
        weakref.finalize(storage, self.free, key).atexit = False

    def free(self, key):
        self.now -= self.sizes.pop(key)


def storage_bytes(tensors, round_to=CUDA_BLOCK_BYTES):
    """Bytes of the distinct storages of `tensors`, each rounded as LiveBytes rounds."""
    sizes = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}
    return sum(block_bytes(n, round_to) for n in sizes.values())


@contextlib.contextmanager
def cuda_rules():
    """Where CUDA runs this model's ops differently from the CPU, in what they allocate, do it as
    CUDA does (the rest of the autocast lists agree for the ops DiMR calls), by swapping the
    functions of torch.nn.functional that the model calls for the duration:
    - autocast: CUDA runs layer_norm and group_norm in float32 (its fp32 list), the CPU in the
      input's dtype (TDLayerNorm of the cascade's bf16 projection);
    - attention: CUDA's flash attention, its first choice for bf16, pads the head dimension to a
      multiple of 8 and saves the padded q, k, v and output (XL's 60 -> 64).
    (Not a TorchFunctionMode: the backward pass, which recomputes checkpointed blocks, would run
    outside it.)"""
    names = ("layer_norm", "group_norm", "scaled_dot_product_attention")
    original = {name: getattr(F, name) for name in names}

    def float32(name):
        def norm(x, *args, **kwargs):
            if torch.is_autocast_enabled("cpu") and x.dtype == AUTOCAST_DTYPE:
                x = x.float()  # the weights and biases are float32 parameters already
            return original[name](x, *args, **kwargs)
        return norm

    def attention(q, k, v, *args, **kwargs):
        d = q.shape[-1]
        if not (torch.is_autocast_enabled("cpu") and d % 8):
            return original["scaled_dot_product_attention"](q, k, v, *args, **kwargs)
        kwargs.setdefault("scale", 1 / math.sqrt(d))
        q, k, v = (F.pad(a.to(AUTOCAST_DTYPE), (0, -d % 8)) for a in (q, k, v))
        return original["scaled_dot_product_attention"](q, k, v, *args, **kwargs)[..., :d]

    F.layer_norm, F.group_norm = float32("layer_norm"), float32("group_norm")
    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        for name, function in original.items():
            setattr(F, name, function)


# ----------------------------------------------------------------------------------------------
# One step, measured

@dataclasses.dataclass
class Step:
    static_bytes: int   # parameters, EMA, AdamW state: alive before the step and after it
    param_bytes: int    # the float32 parameters, unrounded: DDP's buckets are one more copy
    timeline: list      # live bytes of the step after each allocation
    seconds: float

    @property
    def peak_bytes(self):
        return self.static_bytes + max(self.timeline)


def new_state(model_config, recipe, fake):
    """train.new_state's model, EMA and AdamW with its state (train.create_adamw_state), AdamW
    fused as on CUDA. fake: every tensor
    a FakeTensor (the model is built on the meta device, then given fake CPU parameters)."""
    torch.manual_seed(recipe.seed)
    with torch.device("meta") if fake else contextlib.nullcontext():
        model = dimr.DiMR(model_config)
    if fake:
        for m in model.modules():
            for name, p in m.named_parameters(recurse=False):
                setattr(m, name, torch.nn.Parameter(torch.empty_strided(p.shape, p.stride())))
    model = depthwise.channels_last_kernels(model)
    optimizer = torch.optim.AdamW(train.param_groups(model, recipe.weight_decay), lr=recipe.lr,
                                  betas=recipe.betas, fused=True)
    train.create_adamw_state(optimizer)
    return types.SimpleNamespace(  # what train.train_step reads of a train.TrainState
        model=model, ema=copy.deepcopy(model).requires_grad_(False).eval(), optimizer=optimizer,
        scaler=torch.amp.GradScaler("cpu", enabled=False), step=0)


def measure_step(model_config, micro_batch, grad_checkpointing, fake=False, recipe=train.PAPER):
    """The live bytes of one train.train_step at `micro_batch` images (a Step)."""
    gc.collect()  # the previous measurement's model, before this one's is built
    start = time.time()
    with fake_tensor_mode() if fake else contextlib.nullcontext(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Accessing the data pointer of FakeTensor")
        state = new_state(model_config, recipe, fake)
        state.model.set_grad_checkpointing(grad_checkpointing)
        params = list(state.model.parameters())
        opt_state = [v for s in state.optimizer.state.values() for v in s.values()
                     if isinstance(v, torch.Tensor)]
        static = storage_bytes([*params, *state.ema.parameters(), *opt_state])
        shape = (micro_batch, model_config.in_channels, model_config.input_size,
                 model_config.input_size)
        with cuda_rules(), LiveBytes() as live:
            b, classes = micro_batch, model_config.num_classes
            batch = train.Batch(torch.randn(shape), torch.randint(0, classes, (b,)),  # x0, y
                                torch.randint(1, diffusion.NUM_TIMESTEPS + 1, (b,)),  # n
                                torch.randn(shape), torch.rand(b) < recipe.class_dropout)
            train.train_step(state.model, state, [batch], diffusion.DiscreteSchedule(), recipe,
                             AUTOCAST_DTYPE)
    return Step(static, storage_bytes(params, round_to=0), live.timeline, time.time() - start)


def fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode
    return FakeTensorMode(allow_non_fake_inputs=True)  # the schedule's tables are real tensors


# ----------------------------------------------------------------------------------------------
# Two steps -> peak(b) for every b

@dataclasses.dataclass
class Coefficients:
    """peak(b) = static_bytes + max over lines of (intercept + bytes_per_image b), for b >= 1,
    plus param_bytes for DDP's buckets where world_size > 1."""
    static_bytes: int
    param_bytes: int
    lines: list  # [(intercept bytes, bytes per image)], by increasing slope: the upper envelope

    def fixed_bytes(self, world_size=1):
        """Before the step: the static part, and DDP's buckets where world_size > 1."""
        return self.static_bytes + (self.param_bytes if world_size > 1 else 0)

    def peak_bytes(self, micro_batch, world_size=1):
        return self.fixed_bytes(world_size) + max(c + s * micro_batch for c, s in self.lines)

    def largest_micro_batch(self, capacity_bytes, world_size=1):
        """The largest b >= 1 with peak_bytes(b) <= capacity_bytes; 0 where none."""
        room = capacity_bytes - self.fixed_bytes(world_size)  # every line must stay below it
        if any(c + s > room for c, s in self.lines):
            return 0
        return min((math.floor((room - c) / s) for c, s in self.lines if s > 0),
                   default=math.inf)


def upper_envelope(lines, b_min=1):
    """The lines (intercept, slope) that are the maximum somewhere on b >= b_min, by slope."""
    best = {}
    for c, s in lines:
        best[s] = max(c, best.get(s, c))

    def overtakes(low, high):  # the b where the steeper line `high` reaches `low`
        return (low[0] - high[0]) / (high[1] - low[1])

    hull = []
    for line in sorted(((c, s) for s, c in best.items()), key=lambda l: l[1]):
        while hull and overtakes(hull[-1], line) <= (overtakes(hull[-2], hull[-1])
                                                     if len(hull) > 1 else b_min):
            hull.pop()
        hull.append(line)
    return hull


def fit(a, b, batch_a, batch_b):
    """Coefficients from the Steps of micro-batches batch_a < batch_b."""
    if len(a.timeline) != len(b.timeline) or a.static_bytes != b.static_bytes:
        raise RuntimeError(f"the step allocated differently at micro-batches {batch_a} and "
                           f"{batch_b}; peak(b) cannot be extrapolated")
    slopes = [(y - x) / (batch_b - batch_a) for x, y in zip(a.timeline, b.timeline)]
    lines = [(x - s * batch_a, s) for x, s in zip(a.timeline, slopes)]
    return Coefficients(a.static_bytes, a.param_bytes, upper_envelope(lines))


def measure(model_config, grad_checkpointing, fake=False, recipe=train.PAPER,
            micro_batches=MICRO_BATCHES, log=print):
    """Coefficients of a model from two measured steps (the heavy part)."""
    steps = []
    for b in micro_batches:
        steps.append(measure_step(model_config, b, grad_checkpointing, fake, recipe))
        log(f"  micro-batch {b}: peak {steps[-1].peak_bytes / GiB:.3f} GiB (one process) "
            f"({steps[-1].seconds:.1f} s)")
    return fit(*steps, *micro_batches)


def predict(model_config, micro_batch, grad_checkpointing=True, world_size=1,
            coefficients=None, path=TABLE_JSON):
    """Predicted max_memory_allocated of a training step, bytes: cheap, from `coefficients` or
    from the measured row of the file at `path` (docs/data/memory.json) with this config."""
    if coefficients is None:
        coefficients = stored_coefficients(model_config, grad_checkpointing, path)
    return coefficients.peak_bytes(micro_batch, world_size)


def stored_coefficients(model_config, grad_checkpointing, path=TABLE_JSON):
    for row in load_rows(path):
        if (row["grad_checkpointing"] == grad_checkpointing
                and dimr.config_from_dict(row["config"]) == model_config):
            return coefficients_of(row)
    raise ValueError(f"{path} has no measurement of {model_config} with gradient "
                     f"checkpointing {'on' if grad_checkpointing else 'off'}: run python -m "
                     "tools.memory --json")


def coefficients_of(row):
    return Coefficients(row["static_bytes"], row["param_bytes"],
                        [tuple(line) for line in row["lines"]])


def load_rows(path):
    path = Path(path)
    return json.loads(path.read_text())["rows"] if path.is_file() else []


# ----------------------------------------------------------------------------------------------
# Command line

def table(rows, world_size, headroom_bytes, per_gpu=128):
    """Markdown, one line per measured (variant, checkpointing): peak(b) = static + step +
    per image x b at large b (the envelope's last line), peak(per_gpu), and the largest
    micro-batch of each card."""
    lines = [f"| variant | grad. ckpt | static GiB | + step GiB | + GiB per image | GiB at "
             f"{per_gpu} | " + " | ".join(CARDS_BYTES) + " | measured |",
             "|---" * (7 + len(CARDS_BYTES)) + "|"]
    for row in rows:
        coef = coefficients_of(row)
        intercept, slope = coef.lines[-1]
        fits = [coef.largest_micro_batch(capacity - headroom_bytes, world_size)
                for capacity in CARDS_BYTES.values()]
        lines.append(f"| {row['variant']} | {'on' if row['grad_checkpointing'] else 'off'} | "
                     f"{coef.fixed_bytes(world_size) / GiB:.2f} | {intercept / GiB:.2f} | "
                     f"{slope / GiB:.4f} | {coef.peak_bytes(per_gpu, world_size) / GiB:.1f} | "
                     + " | ".join(map(str, fits)) + f" | {row['method']} |")
    return "\n".join(lines)


def caption(world_size, headroom_gib):
    ddp = "DDP's buckets included" if world_size > 1 else "no DDP"
    return (f"{world_size} process{'es' * (world_size > 1)} ({ddp}); a card's capacity is its "
            f"nominal GB as 10^9 bytes, less {headroom_gib:g} GiB of headroom")


def check_ram(needed_bytes):
    """Say so, before the machine runs out, when a real step would need more than 90% of the RAM
    that is free or held by this process (freed memory it may reuse)."""
    gc.collect()  # the previous measurement's model

    def kib(path, field):
        lines = Path(path).read_text().splitlines()
        return int(next(line for line in lines if line.startswith(field + ":")).split()[1])
    available = 1024 * (kib("/proc/meminfo", "MemAvailable") + kib("/proc/self/status", "VmRSS"))
    if needed_bytes > 0.9 * available:
        raise ValueError(f"a real step of this model needs more than {needed_bytes / 1e9:.1f} GB "
                         f"of RAM, {available / 1e9:.1f} GB are available: use --fake")


def parameters(model_config):
    with torch.device("meta"):
        return sum(p.numel() for p in dimr.DiMR(model_config).parameters())


def run(args, argv, started):
    distributed.set_threads(args.threads)
    headroom = args.headroom_gib * GiB
    if args.table:
        print(caption(args.world_size, args.headroom_gib))
        print(table(load_rows(args.json or TABLE_JSON), args.world_size, headroom))
        return
    rows = []
    for variant in args.variants:
        name = dimr.ALIASES.get(variant, variant)
        model_config = dimr.get_config(name)
        for ckpt in {"on": [True], "off": [False], "both": [True, False]}[args.checkpointing]:
            print(f"{name}, gradient checkpointing {'on' if ckpt else 'off'}, "
                  f"{'fake tensors' if args.fake else 'a real step on the CPU'}:", flush=True)
            if not args.fake:  # weights, EMA, AdamW, gradients, bf16 copies: 22 bytes each
                check_ram(22 * parameters(model_config))
            row_start = time.time()
            recipe = train.RECIPES.get(name, train.PAPER)
            coef = measure(model_config, ckpt, args.fake, recipe, args.micro_batches,
                           log=lambda s: print(s, flush=True))
            if args.check:
                check(coef, model_config, ckpt, args.fake, recipe, args.check)
            rows.append({"variant": name, "config": dataclasses.asdict(model_config),
                         "grad_checkpointing": ckpt,
                         "method": "fake" if args.fake else "CPU",
                         "micro_batches": list(args.micro_batches),
                         **dataclasses.asdict(coef),
                         "measured_by": provenance.record("python -m tools.memory", argv,
                                                          row_start)})
            if args.json:  # after each row: a long run cut short keeps what it measured
                save_rows(args.json, rows, argv, started)
    print(caption(args.world_size, args.headroom_gib))
    print(table(rows, args.world_size, headroom))


def check(coef, model_config, grad_checkpointing, fake, recipe, micro_batch):
    """A third micro-batch, measured, against the prediction from the first two."""
    if not fake:
        check_ram(coef.peak_bytes(micro_batch))
    measured = measure_step(model_config, micro_batch, grad_checkpointing, fake, recipe)
    predicted = coef.peak_bytes(micro_batch)
    print(f"  micro-batch {micro_batch}: peak {measured.peak_bytes / GiB:.4f} GiB (one process), "
          f"predicted {predicted / GiB:.4f} GiB, error "
          f"{(predicted - measured.peak_bytes) / measured.peak_bytes:+.4%}", flush=True)


def save_rows(path, rows, argv, started):
    """Add `rows` to the JSON file at `path`, replacing its rows of the same variant and
    setting, in the order of PAPER_VARIANTS, checkpointing on first."""
    keys = {(r["variant"], r["grad_checkpointing"]) for r in rows}
    kept = [r for r in load_rows(path) if (r["variant"], r["grad_checkpointing"]) not in keys]
    order = {dimr.ALIASES[v]: i for i, v in enumerate(PAPER_VARIANTS)}
    merged = sorted(kept + rows, key=lambda r: (order.get(r["variant"], len(order)),
                                                not r["grad_checkpointing"]))
    record = {"what": "peak(b) = static_bytes + max over lines (intercept + slope b) bytes of "
                      "torch.cuda.max_memory_allocated in a training step at micro-batch b "
                      "(tools/memory.py); + param_bytes for DDP at world size > 1",
              "rows": merged,
              "this_call": provenance.record("python -m tools.memory", argv, started)}
    checkpoints.write_text(path, json.dumps(record, indent=1) + "\n")


def build_parser():
    p = Parser(description="Predict the device memory of a training step (bf16 autocast, fused "
                           "AdamW, EMA, DDP) from steps measured on the CPU; the largest "
                           "micro-batch per card.")
    p.add_argument("variants", nargs="*", metavar="VARIANT",  # checked in main
                   help=f"{', '.join(dimr.ALIASES)} or full names (default "
                        f"{' '.join(PAPER_VARIANTS)})")
    p.add_argument("--checkpointing", choices=("on", "off", "both"), default="both",
                   help="gradient checkpointing (train.py: on) (default both)")
    p.add_argument("--micro-batches", type=number(int, 1), nargs=2, default=list(MICRO_BATCHES),
                   metavar="B", help="the two measured micro-batches (default 1 2)")
    p.add_argument("--check", type=number(int, 1), default=None, metavar="B",
                   help="also measure micro-batch B and print the prediction's error")
    p.add_argument("--fake", action="store_true",
                   help="measure on FakeTensors: no memory, no arithmetic, the same bytes")
    p.add_argument("--world-size", type=number(int, 1), default=8,
                   help="processes of the run: > 1 adds DDP's buckets (default 8)")
    p.add_argument("--headroom-gib", type=number(float, 0), default=2.0,
                   help="left free on each card for the CUDA context and fragmentation "
                        "(default 2)")
    p.add_argument("--json", default=None,
                   help="add the rows to this file (docs/data/memory.json), replacing rows of the "
                        "same variant and setting")
    p.add_argument("--table", action="store_true",
                   help="print the table of --json's file (default docs/data/memory.json) "
                        "without measuring")
    add_threads_flag(p)
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    started = time.time()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.micro_batches[0] == args.micro_batches[1]:
        parser.error("--micro-batches: give two different micro-batches")
    args.micro_batches.sort()
    args.variants = args.variants or list(PAPER_VARIANTS)
    for v in args.variants:  # argparse's choices fails nargs="*" when none is given
        if v not in dimr.VARIANT_CHOICES:
            parser.error(f"argument VARIANT: invalid choice: {v!r} (choose from "
                         f"{', '.join(dimr.VARIANT_CHOICES)})")
    distributed.run_main(lambda: run(args, argv, started))


if __name__ == "__main__":
    main()
