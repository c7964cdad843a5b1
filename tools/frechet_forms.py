"""The Fréchet distance two ways, side by side: scipy's sqrtm of the product (pytorch-fid's and
ADM's form, with pytorch-fid's retry) and fid.frechet_distance (two symmetric eigendecompositions).

    python -m tools.frechet_forms ~/.cache/dimr/digits_ref.features-tf.npz

On random 2048-d statistics of N = 5000 and N = 1000 samples (full rank, singular), and, given a
feature cache (`pool` of REF.features-tf.npz), on 1,000 of its rows against all of them: each
form's value and its best time of --repeats, alternating (docs/evaluation.md).
"""
import time

import numpy as np
import scipy.linalg

import fid
from support import distributed
from support.cli import Parser, add_threads_flag, number


def sqrtm_form(mu1, s1, mu2, s2, eps=1e-6):
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = eps * np.eye(len(s1))
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def cases(features):
    rng = np.random.default_rng(0)
    for n in (5000, 1000):
        a = rng.normal(size=(n, 2048)) @ (rng.normal(size=(2048, 2048)) / 45)
        b = rng.normal(size=(n, 2048)) @ (rng.normal(size=(2048, 2048)) / 45) + 0.05
        yield f"random 2048-d, N = {n}", (*fid.feature_statistics(a), *fid.feature_statistics(b))
    if features:
        pool = np.load(features)["pool"]
        subset = np.random.default_rng(0).choice(len(pool), 1000, replace=False)
        yield (f"1000 of {features}'s rows against all {len(pool)}",
               (*fid.feature_statistics(pool[subset]), *fid.feature_statistics(pool)))


def run(args):
    distributed.set_threads(args.threads)
    for name, stats in cases(args.features):
        seconds = {"sqrtm": [], "eigh": []}
        for _ in range(args.repeats):
            for form, f in (("sqrtm", sqrtm_form), ("eigh", fid.frechet_distance)):
                start = time.perf_counter()
                value = f(*stats)
                seconds[form].append(time.perf_counter() - start)
                seconds[form + " value"] = value
        a, b = seconds["sqrtm value"], seconds["eigh value"]
        print(f"{name}: sqrtm {a:.10f} in {min(seconds['sqrtm']):.2f} s; eigh {b:.10f} in "
              f"{min(seconds['eigh']):.2f} s; difference {abs(a - b):.2e} "
              f"({abs(a - b) / abs(a):.1e} relative)", flush=True)


def main(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("features", nargs="?", help="a feature cache .npz with `pool` (optional)")
    p.add_argument("--repeats", type=number(int, 1), default=3)
    add_threads_flag(p)
    args = p.parse_args(argv)
    distributed.run_main(lambda: run(args))


if __name__ == "__main__":
    main()
