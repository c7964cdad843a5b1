"""What a training run will need, said before its first step: train.py's rank 0 prints it, and
`python train.py --plan P ...` prints it for P processes without training and without memory for
the model (its tensors are then FakeTensors: shapes and dtypes, no data).

- Memory of each process: the weights, their gradients (the first backward pass allocates them),
  AdamW's state (two moments and a step count per parameter tensor, created before the first
  step: train.create_adamw_state), the EMA, and under DDP its gradient buckets (one more copy of
  the gradients): the bytes of those very tensors.
- One checkpoint: the bytes that checkpoints.save writes for train.py's checkpoint, counted by
  torch.save itself under torch.serialization.skip_data (the zip records, their alignment and the
  pickle as they will be; the tensors' bytes skipped) into a file that keeps nothing. It is
  counted at the run's last step: an earlier step number pickles into as many bytes or fewer.
- The most the run holds on disk at once: --keep checkpoints, the best-FID one (--fid-every) and
  the one being written (the oldest goes only once it is complete), and the sample grids, each
  at most the PNG of a grid of noise, which PNG cannot compress. stats.jsonl (a few hundred bytes
  a log line) and the digits' evaluation are left out.
- The free space of the results directory: less than one checkpoint stops the run before its
  first step, with these numbers; less than the most it holds is a warning.
"""
import io
import pickle
import shutil
import sys
import tempfile
import types
import warnings
from pathlib import Path

import numpy as np
import torch

from support.images import save_grid


class _Nowhere(io.RawIOBase):
    """A file that keeps no bytes, only its size. Seekable: under skip_data, torch's zip writer
    seeks past each tensor's bytes instead of writing them."""

    def __init__(self):
        super().__init__()
        self.pos = self.size = 0

    def writable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, offset, whence=io.SEEK_SET):
        self.pos = (0, self.pos, self.size)[whence] + offset
        return self.pos

    def write(self, b):
        n = memoryview(b).nbytes
        self.pos += n
        self.size = max(self.size, self.pos)
        return n


class _Pickler(pickle.Pickler):
    """torch.save's pickler, with one difference that makes FakeTensors pickle as real CPU tensors:
    torch tags a real CPU storage's location with one constant string "cpu", which pickle writes
    once and then refers to, but a FakeTensor's with str(device), a new string each time. (CUDA
    locations, "cuda:0", are new strings in both cases and are left alone.)"""

    def __getattribute__(self, name):
        attr = super().__getattribute__(name)
        if name != "persistent_id":
            return attr

        def persistent_id(obj):
            pid = attr(obj)  # a storage: ("storage", type, key, location, size)
            if pid is not None and pid[3] == "cpu":
                pid = (*pid[:3], sys.intern(pid[3]), *pid[4:])
            return pid
        return persistent_id


_PICKLE = types.SimpleNamespace(Pickler=_Pickler, __name__="pickle")


def saved_bytes(obj):
    """The size of the file that checkpoints.save(obj, path) writes; tensors real or fake."""
    sink = _Nowhere()
    with torch.serialization.skip_data(materialize_fake_tensors=True), \
            warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Accessing the data pointer of FakeTensor")
        torch.save(obj, sink, pickle_module=_PICKLE)
    return sink.size


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def memory(state, world_size):
    """[(what, bytes)] that each process holds through the run (a train.TrainState)."""
    params = list(state.model.parameters())
    grads = nbytes(p for p in params if p.requires_grad)
    adamw = nbytes(v for s in state.optimizer.state.values() for v in s.values()
                   if isinstance(v, torch.Tensor))
    parts = [("weights", nbytes(params)), ("gradients", grads), ("AdamW state", adamw),
             ("EMA", nbytes(state.ema.parameters()))]
    return parts + [("DDP's gradient buckets", grads)] * (world_size > 1)


def grid_bytes(labels, side, ncol):
    """The most a sample grid of len(labels) images side x side can take: the PNG of noise."""
    noise = np.random.default_rng(0).integers(0, 256, (len(labels), side, side, 3), np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        save_grid(noise, labels, Path(tmp) / "grid.png", ncol)
        return (Path(tmp) / "grid.png").stat().st_size


def checkpoints_held(cfg):
    """The most checkpoints on disk at once: --keep, the best FID, the one being written; no more
    than the run writes (every --ckpt-every steps and at its last step)."""
    return min(cfg.keep + bool(cfg.fid_every) + 1, -(-cfg.steps // cfg.ckpt_every))


def free_bytes(path):
    """Free bytes of the file system of `path`, or of its nearest parent that exists."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def on_disk(run_dir):
    """Bytes of a run folder's checkpoints and grids (a resumed run holds some already)."""
    return sum(p.stat().st_size for pattern in ("checkpoints/ckpt_*.pt", "samples/*.png")
               for p in Path(run_dir).glob(pattern))


def describe(parts, ckpt_bytes, cfg, grids, where, already=0):
    """(the plan's lines, the error where the disk cannot hold one checkpoint, the warning where
    it cannot hold what the run asks; None where not). parts: memory(); grids: (number, bytes at
    most each); where: the run folder or, before it exists, the results directory; already:
    on_disk() of a resumed run."""
    held = checkpoints_held(cfg)
    why = (f"the run writes {held}" if held < cfg.keep + bool(cfg.fid_every) + 1 else
           f"--keep {cfg.keep}{', the best FID' * bool(cfg.fid_every)}, the one being written")
    most, free = held * ckpt_bytes + grids[0] * grids[1], free_bytes(where)
    lines = [f"plan, per process: {' + '.join(f'{what} {n:,}' for what, n in parts)} = "
             f"{sum(n for _, n in parts):,} bytes ({size(sum(n for _, n in parts))})",
             f"plan, disk: one checkpoint {ckpt_bytes:,} bytes; at most {held} at once ({why})"
             + (f" and {grids[0]} sample grids of at most {grids[1]:,} bytes" if grids[0] else "")
             + f": {size(most)}; free in {where}: {size(free)} ({free:,} bytes)"]
    error = warning = None
    if free < ckpt_bytes:
        error = (f"{where} has {free:,} bytes free, less than one checkpoint ({ckpt_bytes:,} "
                 "bytes): free some space or give another --results-dir")
    elif free < most - already:
        warning = (f"warning: {where} has {size(free)} free, less than the {size(most - already)} "
                   "more that the run will hold at most: it will stop when the disk is full; "
                   "lower --keep or free some space")
    return lines, error, warning


def size(n):
    """Bytes in decimal units, as disks are sold."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 1e3:.2f} kB"


def peak_memory(device):
    """This process's peak memory so far, bytes: the CUDA allocator's on CUDA, else the peak
    resident size (ru_maxrss: KiB on Linux, bytes on macOS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (
        1 if sys.platform == "darwin" else 1024)
