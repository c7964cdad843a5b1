"""The paper's Table 5 (which part of DiMR helps) in miniature, on the digits at the demo's budget.

    python -m tools.table5 --out runs/table5 --json docs/data/table5.json       # about 2 hours

Every row of Table 5 (ImageNet 64, 300K steps, U-ViT-M/4 -> DiMR-M/3R) is a switch of train.py
applied to the demo model, DiMR-S/2R, and trained with the demo's recipe (train.DEMO: 1,200 steps
of batch 64, lr 3e-3, EMA 0.993) without its time cap, so that every row gets the same steps:

  U-ViT baseline             one Transformer branch, LN + time token, 4x GELU MLP, 2 blocks
                             deeper than DiMR's Transformer branch (the paper: 17 against 15)
  + adaLN-Zero               the same with DiT's adaLN-Zero in place of LN + time token
  TD-LN, one branch          the same with TD-LN (not in the paper: the control that lets
                             "multi-branch helps" be judged for TD-LN as for adaLN-Zero)
  adaLN-Zero + multi-branch  DiMR-S/2R's branches with adaLN-Zero and GELU MLPs
  TD-LN + multi-branch       ... with TD-LN
  + GLU                      ... with GLU MLPs
  + multi-scale loss         DiMR-S/2R as the demo trains it (rows 3-5: the full-resolution
                             branch's loss term only, --no-multiscale-loss)

Each (row, seed) is evaluated on --samples EMA samples, evenly over the classes, seeds 0..N-1,
without guidance (as the paper's ImageNet 64 numbers), with the default sampler at 25 steps:
- FID against the 1,797 real digits, with the default `tf` preprocessing (fid.py);
- class accuracy by the SVM of the real digits (support/digits.py);
- the final loss: the full-resolution branch's term of the loss, averaged over the last 100 steps
  (the one term every row trains);
- distortion in miniature: the probability a classifier of the real digits (an SVM that never saw
  a generated digit, support/digits.class_confidence) gives each sample's conditioned class; the
  share below LOW_CONFIDENCE, a threshold fixed before any sample was scored, and the indices of
  the PICKS lowest (the paper has people judge a classifier's picks; here the classifier alone
  judges).
Each run folder keeps its samples (samples.npz) and result.json: the numbers, the training command,
the commit, and the wall time of its training and of its evaluation. Runs and their results are
kept in --out; a rerun skips what is done and resumes a run cut short. table5.json (and --json)
gathers every result with this command's own record (support/provenance.py), and what the page
reports of them: each row's mean and spread, every comparison of COMPARISONS judged by one RULE
(Welch's t-test over the seeds), the real digits' own low-confidence share (the control, once into
--out/real_digits.json) and the cost: the per-run wall times, and the records of the invocations
that trained the runs (each keeps its own in --out/calls/), from the first start to the last finish.
"""
import json
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import fid
import sample
import train
from support import checkpoints, digits, distributed, provenance
from support.images import to_uint8
from support.run_folder import read_stats
from support.cli import Parser, add_threads_flag, number

# (name, --arch overrides, multi-scale loss, the paper's FID and parameters in millions)
ROWS = [
    ("U-ViT baseline", ("depths=7", "widths=96", "norm=ln", "mlp=gelu"), True, 5.85, 130.9),
    ("+ adaLN-Zero", ("depths=7", "widths=96", "norm=adaln_zero", "mlp=gelu"), True, 5.44, 202.4),
    ("TD-LN, one branch", ("depths=7", "widths=96", "mlp=gelu"), True, None, None),
    ("adaLN-Zero + multi-branch", ("norm=adaln_zero", "mlp=gelu"), False, 7.91, 217.9),
    ("TD-LN + multi-branch", ("mlp=gelu",), False, 5.21, 154.0),
    ("+ GLU", (), False, 4.86, 132.9),
    ("+ multi-scale loss (= DiMR-S/2R)", (), True, 3.65, 132.9),
]
SAMPLER_STEPS = sample.DEFAULT_STEPS
LOW_CONFIDENCE = 0.5  # a sample whose conditioned class gets a lower probability is a pick
PICKS = 16            # the lowest-confidence samples kept per run, for the figure
# The paper's distortion study (its Fig. 1): the share of a classifier's low-fidelity picks that
# people judged distorted, and the row here that stands for each model.
PAPER_DISTORTION = [("U-ViT-H/2", 63.5, "U-ViT baseline"), ("DiT-XL/2", 71.0, "+ adaLN-Zero"),
                    ("DiMR-XL/2R", 29.2, "+ multi-scale loss (= DiMR-S/2R)")]

# One rule for every sentence that says two rows differ: Welch's t-test over the seeds.
SIGNIFICANT, MARGINAL = 0.05, 0.10
RULE = ("two rows differ when Welch's t-test over their seeds (two-sided, "
        "scipy.stats.ttest_ind(equal_var=False)) gives p < 0.05; 0.05 <= p < 0.10 is marginal; "
        "otherwise no difference is shown")
LOWER_IS_BETTER = {"fid": True, "accuracy": False, "low_confidence": True, "loss": True}
COMPARISONS = [  # (what changes, from this row, to this row)
    ("adaLN-Zero for LN + time token", "U-ViT baseline", "+ adaLN-Zero"),
    ("TD-LN for adaLN-Zero, one branch", "+ adaLN-Zero", "TD-LN, one branch"),
    ("multi-branch, with adaLN-Zero", "+ adaLN-Zero", "adaLN-Zero + multi-branch"),
    ("multi-branch, with TD-LN", "TD-LN, one branch", "TD-LN + multi-branch"),
    ("TD-LN for adaLN-Zero, multi-branch", "adaLN-Zero + multi-branch", "TD-LN + multi-branch"),
    ("GLU for the GELU MLP", "TD-LN + multi-branch", "+ GLU"),
    ("the multi-scale loss", "+ GLU", "+ multi-scale loss (= DiMR-S/2R)"),
    ("all of DiMR-S/2R against U-ViT", "U-ViT baseline", "+ multi-scale loss (= DiMR-S/2R)"),
    ("all of DiMR-S/2R against adaLN-Zero", "+ adaLN-Zero", "+ multi-scale loss (= DiMR-S/2R)"),
]
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"  # provenance.record's "started"


def slug(name):
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def trained_run(root, arch, multiscale, seed, steps, threads):
    """Train one row and seed under root (resuming a run cut short). Returns its run folder and
    the train.py command of this call (None when it was already trained)."""
    found = sorted(root.glob("*/checkpoints/ckpt_*.pt"))
    threads = ["--threads", str(threads)] if threads else []
    if found and int(found[-1].stem.split("_")[1]) == steps:
        return found[-1].parent.parent, None
    if found:
        argv = ["--resume", str(found[-1]), "--steps", str(steps), *threads]
    else:
        argv = ["--variant", "s", "--seed", str(seed), "--steps", str(steps), "--minutes", "0",
                "--eval-images", "0", "--results-dir", str(root),
                "--multiscale-loss" if multiscale else "--no-multiscale-loss",
                *(["--arch", *arch] if arch else []), *threads]
    train.main(argv)
    run_dir = sorted(root.glob("*/checkpoints"))[-1].parent
    return run_dir, provenance.command("python train.py", argv)


def train_seconds(stats):
    """The training time of a run, over all its invocations: the seconds per step of each log
    interval times its steps."""
    logged = [s for s in stats if "s_per_step" in s]
    return sum(s["s_per_step"] * (s["step"] - prev["step"])
               for prev, s in zip([{"step": 0}] + logged, logged))


def evaluate(run_dir, num_samples, reference, inception, confidence_classifier):
    """FID, class accuracy, final loss, parameters and the low-confidence share of a finished
    run; its samples go to run_dir/samples.npz (arr_0 uint8 [N, 8, 8, 3], labels)."""
    path = sorted((run_dir / "checkpoints").glob("ckpt_*.pt"))[-1]
    model, _ = checkpoints.load_model(path)
    labels = sample.parse_classes("even", num_samples, model.config.num_classes, 0)
    x = sample.generate(model, labels, range(num_samples), steps=SAMPLER_STEPS, guidance=0.0)
    images = to_uint8(x)
    with checkpoints.atomic_write(run_dir / "samples.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, arr_0=images, labels=labels)
    features = fid.inception_features(images, inception, label=f"table5: {run_dir}")
    last = [s for s in read_stats(run_dir) if "loss" in s][-1]
    confidence = digits.class_confidence(images, labels, confidence_classifier)
    return {"fid": fid.frechet_distance(*fid.feature_statistics(features), *reference),
            "accuracy": digits.digit_class_accuracy(images, labels)["accuracy"],
            "loss": last["loss_branches"][-1],
            "parameters": sum(v.numel() for v in model.state_dict().values()),
            **distortion(confidence)}


def distortion(confidence):
    """The share of samples below LOW_CONFIDENCE, the mean confidence, and the PICKS least
    trusted samples with their confidences."""
    picks = np.argsort(confidence, kind="stable")[:PICKS]
    return {"low_confidence": float(np.mean(confidence < LOW_CONFIDENCE)),
            "mean_confidence": float(np.mean(confidence)),
            "picks": picks.tolist(), "pick_confidences": confidence[picks].tolist()}


def mean_and_spread(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summary(results):
    """Per row and metric: [mean, standard deviation, seeds]."""
    return {name: {key: [*mean_and_spread([r[key] for r in runs]), len(runs)]
                   for key in (*LOWER_IS_BETTER, "mean_confidence")}
            for name, runs in results.items()}


def compare(before, after, lower_is_better):
    """RULE applied to one metric's seeds of two rows: their means, p and the verdict on `after`."""
    from scipy.stats import ttest_ind
    p = None
    if min(len(before), len(after)) > 1 and (np.std(before) > 0 or np.std(after) > 0):
        p = float(ttest_ind(after, before, equal_var=False).pvalue)
    better = (statistics.mean(after) < statistics.mean(before)) == lower_is_better
    verdict = "no difference shown"
    if p is not None and p < MARGINAL:
        verdict = ("" if p < SIGNIFICANT else "marginally ") + ("better" if better else "worse")
    return {"from": statistics.mean(before), "to": statistics.mean(after), "p": p,
            "verdict": verdict}


def comparisons(results):
    """Every comparison of COMPARISONS whose rows are both there, on every metric."""
    return [{"change": change, "from": a, "to": b,
             **{key: compare([r[key] for r in results[a]], [r[key] for r in results[b]], lower)
                for key, lower in LOWER_IS_BETTER.items()}}
            for change, a, b in COMPARISONS if a in results and b in results]


def real_digits_control(out):
    """The distortion measure on the real digits themselves (cross-validated, so scored by a
    classifier that did not see them), computed once into out/real_digits.json."""
    path = out / "real_digits.json"
    if not path.is_file():
        confidence, fold = digits.real_digits_confidence()
        low = confidence < LOW_CONFIDENCE
        record = {"digits": len(confidence), "folds": int(fold.max()) + 1,
                  **distortion(confidence),
                  "low_confidence_by_fold": [float(low[fold == k].mean())
                                             for k in range(fold.max() + 1)]}
        checkpoints.write_text(path, json.dumps(record, indent=1) + "\n")
    return json.loads(path.read_text())


def cost(results, calls):
    """What the runs cost: the per-run wall times, and the invocations that trained them (their
    own provenance records, out/calls/) from the first start to the last finish."""
    runs = [r for rs in results.values() for r in rs]
    calls = sorted((c for c in calls if c.get("trained")), key=lambda c: c["started"])
    starts = [time.mktime(time.strptime(c["started"], TIME_FORMAT)) for c in calls]
    ends = [s + c["wall_seconds"] for s, c in zip(starts, calls)]
    per_run = {key: [r[key] for r in runs] for key in ("train_wall_seconds", "eval_wall_seconds")}
    return {"runs": len(runs), "invocations": calls,
            **{f"{key}_sum": round(sum(v), 1) for key, v in per_run.items()},
            **{f"{key}_range": [min(v), max(v)] for key, v in per_run.items() if v},
            "wall_seconds": round(max(ends) - min(starts), 1) if calls else None,
            "finished": time.strftime(TIME_FORMAT, time.localtime(max(ends))) if calls else None}


def recipe(out):
    """The training settings every run recorded (the first run's config.json)."""
    found = sorted(out.glob("*/seed*/*/config.json"))
    cfg = json.loads(found[0].read_text())["train_config"] if found else {}
    return {k: cfg[k] for k in ("steps", "batch_size", "lr", "warmup", "ema") if k in cfg}


def read_calls(out):
    """The provenance records of the invocations that trained runs in out (out/calls/*.json; a
    whole table5.json there counts by its this_call)."""
    return [record.get("this_call", record) for path in sorted((out / "calls").glob("*.json"))
            for record in [json.loads(path.read_text())]]


def table(results):
    """Markdown: each row's mean +- standard deviation over the seeds, beside the paper's."""
    lines = ["| model | FID (paper) | parameters (paper) | FID here | class accuracy | final loss "
             "| parameters here | seeds |", "|---|---|---|---|---|---|---|---|"]
    for name, _, _, paper_fid, paper_params in ROWS:
        runs = results.get(name, [])
        if not runs:
            continue
        cells = [mean_and_spread([r[key] for r in runs]) for key in ("fid", "accuracy", "loss")]
        paper_params = "-" if paper_params is None else f"{paper_params}M"
        lines.append(f"| {name} | {paper_fid or '-'} | {paper_params} | {cells[0][0]:.2f} +- "
                     f"{cells[0][1]:.2f} | {100 * cells[1][0]:.1f}% +- {100 * cells[1][1]:.1f} | "
                     f"{cells[2][0]:.4f} +- {cells[2][1]:.4f} | {runs[0]['parameters']:,} | "
                     f"{len(runs)} |")
    return "\n".join(lines)


def run(args, argv):
    start = time.time()
    distributed.set_threads(args.threads)
    out = Path(args.out)
    inception = fid.load_inception()
    if args.fid_ref:
        reference = fid.load_statistics(args.fid_ref)
    else:
        ref = fid.reference_batch(digits.reference_batch_path(), lambda: inception)
        reference = ref["mu"], ref["sigma"]
    classifier = digits.train_digit_classifier(probability=True)
    results, trained_here = {}, []
    for name, arch, multiscale, _, _ in ROWS[:args.rows]:
        for seed in args.seeds:
            root = out / slug(name) / f"seed{seed}"
            done = root / "result.json"
            if not done.is_file():
                began = time.time()
                run_dir, command = trained_run(root, arch, multiscale, seed, args.steps,
                                               args.threads)
                trained = time.time()
                result = {"seed": seed, "run": str(run_dir),
                          **evaluate(run_dir, args.samples, reference, inception, classifier),
                          "train_command": command, "commit": provenance.commit(),
                          "train_wall_seconds": round(trained - began, 1),
                          "eval_wall_seconds": round(time.time() - trained, 1),
                          "train_seconds_logged": round(train_seconds(read_stats(run_dir)), 1)}
                checkpoints.write_text(done, json.dumps(result, indent=1) + "\n")
                trained_here.append(f"{slug(name)}/seed{seed}")
            results.setdefault(name, []).append(json.loads(done.read_text()))
    this_call = provenance.record("python -m tools.table5", argv, start)
    if trained_here:  # this call's record, for the cost of the runs it trained
        checkpoints.write_text(out / "calls" / f"{this_call['started'].replace(' ', 'T')}.json",
                               json.dumps({**this_call, "trained": trained_here}, indent=1) + "\n")
    record = {"samples": args.samples, "sampler_steps": SAMPLER_STEPS, "guidance": 0.0,
              "fid_reference": args.fid_ref or "the 1,797 real digits",
              "train_steps": args.steps, "low_confidence_threshold": LOW_CONFIDENCE,
              "paper": {name: {"fid": f, "parameters_m": m} for name, _, _, f, m in ROWS},
              "paper_distortion": PAPER_DISTORTION, "rule": RULE, "recipe": recipe(out),
              "rule_levels": {"significant": SIGNIFICANT, "marginal": MARGINAL},
              "summary": summary(results), "comparisons": comparisons(results),
              "real_digits": real_digits_control(out), "cost": cost(results, read_calls(out)),
              "results": results, "this_call": this_call}
    checkpoints.write_text(out / "table5.json", json.dumps(record, indent=1) + "\n")
    if args.json:
        checkpoints.write_text(args.json, json.dumps(record, indent=1) + "\n")
    print(table(results))


def main(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/table5", help="folder of the runs and their results")
    p.add_argument("--seeds", type=number(int, 0), nargs="+", default=[0, 1, 2],
                   help="seeds of every row (default 0 1 2)")
    p.add_argument("--samples", type=number(int, 2), default=1000,
                   help="samples per run for FID and class accuracy (default 1000)")
    p.add_argument("--rows", type=number(int, 1, len(ROWS) + 1), default=len(ROWS),
                   help="the first ROWS rows only (default all)")
    p.add_argument("--steps", type=number(int, 1), default=train.DEMO.steps,
                   help=f"training steps of every run (default the demo's, {train.DEMO.steps})")
    p.add_argument("--fid-ref", default=None,
                   help="reference statistics .npz (default: the real digits)")
    p.add_argument("--json", default=None, help="also write the results here (docs/data/)")
    add_threads_flag(p)
    args = p.parse_args(argv)
    distributed.run_main(lambda: run(args, sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
