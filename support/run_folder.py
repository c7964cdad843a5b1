"""The folder of one training run (rank 0 writes it), as EDM keeps it:

    runs/000-DiMR-S-2R/
      config.json                   the TrainConfig, model config, data, processes x micro-batch
      stats.jsonl                   per log interval: step, loss, loss_branches, lr, grad_norm,
                                    images_per_s, s_per_step, time, peak_memory (rank 0's bytes:
                                    CUDA's max allocated, else the peak resident size); per FID:
                                    step, fid, fid_images
      samples/step_NNNNNNN.png      EMA samples, fixed seeds and classes
      checkpoints/ckpt_NNNNNNN.pt   the last --keep, and the best FID

A resumed run reopens its folder and cuts stats.jsonl back to the step it resumes from. Every
write is atomic or, for the appended stats, undone on failure: a full disk loses nothing written
before.
"""
import json
import math
from pathlib import Path

from support import checkpoints


def find_checkpoint(path):
    """--resume RUN_DIR (its newest checkpoint) or a checkpoint file -> (run dir, checkpoint)."""
    path = Path(path)
    if path.is_file():
        return path.parent.parent, path
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {path}: no such run folder or checkpoint")
    found = sorted((path / "checkpoints").glob("ckpt_*.pt"))
    if not found:
        raise FileNotFoundError(f"--resume {path}: no checkpoints/ckpt_*.pt in this run folder")
    return path, found[-1]


def read_stats(run_dir):
    """The records of a run's stats.jsonl, oldest first ([] before the first)."""
    path = Path(run_dir) / "stats.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


class RunFolder:
    """A new numbered run folder under `results_dir`, or the resumed one `resume_dir` with
    stats.jsonl cut back to `step`; config.json gets `config`."""

    def __init__(self, results_dir, name, resume_dir, step, config, keep):
        if resume_dir is None:
            results = Path(results_dir)
            results.mkdir(parents=True, exist_ok=True)
            taken = [int(p.name[:3]) for p in results.iterdir() if p.name[:3].isdigit()]
            resume_dir = results / f"{max(taken, default=-1) + 1:03d}-{name.replace('/', '-')}"
            resume_dir.mkdir()
        self.dir, self.keep = Path(resume_dir), keep
        self.stats_path = self.dir / "stats.jsonl"
        kept = [s for s in self.stats() if s["step"] <= step]  # records past the step are redone
        checkpoints.write_text(self.stats_path, "".join(json.dumps(s) + "\n" for s in kept))
        checkpoints.write_text(self.dir / "config.json", json.dumps(config, indent=2) + "\n")
        self.best_fid, self.best_step = min(((s["fid"], s["step"]) for s in kept if "fid" in s),
                                            default=(math.inf, None))

    def stats(self):
        return read_stats(self.dir)

    def append(self, record):
        """One line more in stats.jsonl; on a failed write the file is cut back as it was."""
        data = (json.dumps(record) + "\n").encode()
        with open(self.stats_path, "ab", buffering=0) as f:
            size = f.tell()
            try:
                while data:
                    data = data[f.write(data):]
            except OSError as e:
                f.truncate(size)
                raise checkpoints.WriteError(f"cannot write {self.stats_path}: "
                                             f"{checkpoints.plain_cause(e)}") from None

    def checkpoint(self, step):
        return self.dir / "checkpoints" / f"ckpt_{step:07d}.pt"

    def save(self, ckpt, step):
        """ckpt_NNNNNNN.pt, atomically; then keeps the last `keep` up to this step and the best-FID
        one (checkpoints past this step, left by a run resumed from an earlier one, are
        overwritten as the run gets there)."""
        path = self.checkpoint(step)
        checkpoints.save(ckpt, path)
        older = [p for p in sorted(path.parent.glob("ckpt_*.pt")) if p.name <= path.name]
        for old in older[:-self.keep]:
            if self.best_step is None or old != self.checkpoint(self.best_step):
                old.unlink()
        return path

    def new_fid(self, step, value):
        """Record a FID; True if it is the best so far."""
        best = value < self.best_fid
        if best:
            self.best_fid, self.best_step = value, step
        return best
