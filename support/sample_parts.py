"""Resumable sampling (sample.py): the finished batches of a run on disk, in OUT/parts/.

Each finished batch of images is saved atomically as parts/batch_NNNNNN.npy; parts/settings.json
records the arguments of the run that started them. A run killed or preempted and started again
with the same arguments, on any number of processes, samples only the missing batches; other
arguments are refused (the parts would not belong to one run). sample.py merges the parts into
samples.npz at the end and removes them.
"""
import json

from support import checkpoints, distributed


def batch_file(parts, b):
    return parts / f"batch_{b:06d}.npy"


def check_settings(parts, settings):
    """A ValueError if DIR/parts holds an unfinished run sampled with other settings
    (parts/settings.json, written by the first run)."""
    record = parts / "settings.json"
    stored = json.loads(record.read_text()) if record.is_file() else settings
    changed = [f"{k} {stored.get(k)!r} there, {v!r} here" for k, v in settings.items()
               if stored.get(k) != v]
    if changed:
        raise ValueError(f"{parts} holds an unfinished run with other settings "
                         f"({'; '.join(changed)}): rerun with its arguments to continue it, "
                         f"or remove {parts}")


def finished_batches(parts, settings):
    """The finished batches of DIR/parts (its settings checked by check_settings). Rank 0 creates
    the folder and removes what a killed process left half-written; every rank then reads the
    same state."""
    record = parts / "settings.json"
    if distributed.is_main():
        parts.mkdir(parents=True, exist_ok=True)
        for stale in parts.glob(".batch_*"):  # temporary files of an interrupted write
            stale.unlink()
        if not record.is_file():
            checkpoints.write_text(record, json.dumps(settings, indent=2) + "\n")
    distributed.barrier()
    check_settings(parts, settings)  # a run started at the same time with other settings
    done = {int(p.stem.split("_")[1]) for p in parts.glob("batch_*.npy")}
    distributed.barrier()  # every rank has seen the same finished batches before any writes one
    return done
