"""Checkpoint files: atomic writes and safe reads (shared by train.py, sample.py and dimr.py).

A checkpoint is a plain dict of tensors and Python values (config dict, step, RNG states, ...),
written to a temporary file beside the target and renamed over it, so a crash or preemption
mid-write never leaves a truncated checkpoint; it is read with weights_only=True (no pickled code).
"""
import os
from pathlib import Path

import torch


def save(obj, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path, map_location="cpu"):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, random bytes, pickled code: all one message
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    return obj
