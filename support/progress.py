"""Progress lines of long work (sampling, feature extraction, latent encoding, training), shared by
the entry points sample.py, fid.py, train.py and the tools.

Lines go to stderr, so that stdout keeps only results: `sample: 128/50000 images, 3.21 images/s,
elapsed 0m40s, ETA 4h18m43s`.
"""
import math
import sys
import time


def format_seconds(s):
    """Seconds -> '4m05s' or '2h03m00s' ('?' when unknown, e.g. before the first item is done)."""
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return (f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600
            else f"{s // 60}m{s % 60:02d}s")


class Progress:
    """done/total, items/s, elapsed and ETA; at most one line per `every` seconds (and always
    the last)."""

    def __init__(self, prefix, total, unit="images", every=0.0):
        self.prefix, self.total, self.unit, self.every = prefix, total, unit, every
        self.done, self.start, self.last = 0, time.time(), -math.inf

    def update(self, n):
        self.done += n
        now = time.time()
        if now - self.last < self.every and self.done < self.total:
            return
        self.last = now
        elapsed = now - self.start
        rate = self.done / max(elapsed, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else math.inf
        print(f"{self.prefix}: {self.done}/{self.total} {self.unit}, {rate:.2f} {self.unit}/s, "
              f"elapsed {format_seconds(elapsed)}, ETA {format_seconds(eta)}",
              file=sys.stderr, flush=True)
