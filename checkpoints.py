"""Files that must never be half-written, and checkpoints read without unpickling code.

Every file the project writes for later use (checkpoints, statistics, sample .npz, latent shards,
run logs) goes through `atomic_write`: it is written to a temporary file beside the target,
flushed to disk and renamed over it, so a crash or preemption mid-write leaves the previous file
intact. Checkpoints are plain dicts of tensors and Python values (config dict, step, RNG states)
read with weights_only=True.
"""
import contextlib
import os
import re
from pathlib import Path

import torch


@contextlib.contextmanager
def atomic_write(path, suffix=""):
    """Yield a temporary path beside `path`; when the block succeeds, fsync it and rename it over
    `path` (`suffix` keeps an extension that a writer such as np.savez insists on)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path, text):
    with atomic_write(path) as tmp:
        Path(tmp).write_text(text)


def save(obj, path):
    try:
        with atomic_write(path) as tmp:
            torch.save(obj, tmp)
    except (OSError, RuntimeError) as e:  # torch.save reports an unwritable path as RuntimeError
        raise OSError(f"cannot write checkpoint {path}: {str(e).splitlines()[0][:200]}") from None


def load(path, map_location="cpu"):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, random bytes, pickled code: all one line
        raise ValueError(f"cannot read checkpoint {path}: {why_unreadable(e)}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    return obj


def why_unreadable(error):
    """torch.load's reason in one line, without its advice to retry with weights_only=False,
    which would run whatever code the file carries."""
    text = str(error)
    code = re.search(r"GLOBAL (\S+)", text)                  # a class or function it would import
    if code:
        return (f"it carries pickled Python code ({code.group(1)}) besides tensors and plain "
                f"values, and checkpoints are only read in a way that runs no code")
    unpickler = re.search(r"WeightsUnpickler error:\s*(.+)", text)  # what follows is the hint
    detail = unpickler.group(1) if unpickler else text.split(". ")[0].split("\n")[0]
    reason = f"{type(error).__name__}: {detail[:200]}" if detail else type(error).__name__
    return f"not a PyTorch checkpoint, or a truncated or corrupted one ({reason})"
