"""Every figure of docs/analyses.md, its numbers and the page itself, from a digits run, the Table 5
runs and the numbers in docs/data.

    python -m tools.figures runs/fid_every/000-DiMR-S-2R --table5 runs/table5  # -> docs/figures/

RUN_DIR is a `train.py` run on the digits with FID during training (`--fid-every`, docs/
analyses.md has the command); --table5 the folder of `python -m tools.table5`, whose record
--data/table5.json is. Written to --data:
- analysis.json: adaLN-Zero's PCA with its controls and TD-LN's time use (tools/analyses.py) on
  every seed of the Table 5 rows, and on RUN_DIR's model;
- fid_every.json: RUN_DIR's numbers the page quotes (FID records, branch sizes, loss weights);
each with this command's record (support/provenance.py). Written to --out, each figure drawn from
those records:
- branch_predictions.png: what each branch of RUN_DIR's model predicts of a clean digit from x_n,
  given the digit's true class;
- branch_losses.png, fid_over_training.png: RUN_DIR's loss terms and FID against the step;
- sampler_error.png: error against evaluations (docs/data/sampler_error_*.json);
- adaln_pca.png, tdln_weights.png: the PCA and TD-LN's time use;
- table5.png, distortion_picks.png: Table 5 in miniature, and each row's least trusted samples.
Last, the page: --template with its {{fields}} filled from the records (tools/page.py) -> --page.
Plotting needs matplotlib (requirements-figures.txt), and only this script does.
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import dimr
from diffusion import NUM_TIMESTEPS, DiscreteSchedule, loss_weights
from support import checkpoints, digits, distributed, provenance
from support.cli import Parser, add_threads_flag
from support.run_folder import read_stats
from tools import analyses, page
from tools.table5 import ROWS, slug

NOISE_LEVELS = (1000, 700, 400, 200, 100, 30)  # DDPM steps n of branch_predictions.png
EXAMPLE_DIGITS = (0, 3, 7)                     # the real digits it shows (their first example)
SAMPLER_ROWS = ("release (its dpm_solver.py 'fast')", "DPM-Solver++(3S)", "**default**")


def plt():
    """matplotlib's pyplot, non-interactive, or a one-line error without it."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the figures need matplotlib: pip install -r requirements-figures.txt"
                          ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot
    return pyplot


def save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt().close(fig)


def last_checkpoint(run_dir):
    return checkpoints.load_model(checkpoint_path(run_dir))[0]


def run_stats(run_dir):
    if not (Path(run_dir) / "stats.jsonl").is_file():
        raise FileNotFoundError(f"{run_dir}: not a train.py run folder (no stats.jsonl)")
    return read_stats(run_dir)


# ----------------------------------------------------------------------------------------------
# What each branch predicts

@torch.no_grad()
def branch_predictions(model, checkpoint, out):
    """Rows per example digit: x_n, then each branch's prediction of x_0 at its own resolution,
    (avgpool_k(x_n) - sigma_n eps_r / k) / alpha_n with k = full size / the branch's (branch r
    predicts sumpool_k(eps) / k); columns: the noise levels, then the clean digit pooled alike."""
    schedule, pyplot = DiscreteSchedule(), plt()
    images, labels = digits.load_real_digits()
    index = [int(np.flatnonzero(labels == c)[0]) for c in EXAMPLE_DIGITS]
    x0 = torch.from_numpy(2 * images[index] - 1).float()[:, None]       # (E, 1, 8, 8)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    size, R = x0.shape[-1], model.config.num_branches
    ks = [model.config.patch_sizes[r] if r < R - 1 else 1 for r in range(R)]  # branch r's pooling
    rows, cols = len(index) * (R + 1), len(NOISE_LEVELS) + 1
    fig, axes = pyplot.subplots(rows, cols, figsize=(1.2 * cols, 1.2 * rows))
    for j, n in enumerate([*NOISE_LEVELS, None]):
        if n is None:  # the clean digit, as each branch sees it
            shown = [x0] + [F.avg_pool2d(x0, k) for k in ks]
        else:
            steps = torch.full((len(index),), n)
            x_n = schedule.q_sample(x0, steps, eps)
            a = float(schedule.alphas_cumprod[n - 1].sqrt())
            s = float((1 - schedule.alphas_cumprod[n - 1]).sqrt())
            preds = model(x_n, steps.float(), torch.tensor(EXAMPLE_DIGITS))
            shown = [x_n] + [(F.avg_pool2d(x_n, k) - s * p / k) / a for p, k in zip(preds, ks)]
        for e in range(len(index)):
            for r, image in enumerate(shown):
                ax = axes[e * (R + 1) + r, j]
                ax.imshow(image[e, 0].clamp(-1, 1).numpy(), cmap="gray", vmin=-1, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                if j == 0:
                    ax.set_ylabel(f"x_n, class {EXAMPLE_DIGITS[e]}" if r == 0 else
                                  f"branch {r}, {size // ks[r - 1]}px",
                                  fontsize=7)
        axes[0, j].set_title("clean x_0" if n is None else f"n = {n}", fontsize=8)
    fig.suptitle(f"the noisy input and each branch's prediction of the clean digit, given its "
                 f"true class\n({checkpoint})", fontsize=8)
    save(fig, out / "branch_predictions.png")


# ----------------------------------------------------------------------------------------------
# Curves of a run: fid_every.json, the numbers of the --fid-every run the page quotes

def fid_every_record(run_dir, model):
    """The --fid-every run's numbers: its FID records, each branch's size and loss weight, the
    settings it recorded (config.json), its training time and the final evaluation (eval.json)."""
    run_dir, stats = Path(run_dir), run_stats(run_dir)
    cfg = json.loads((run_dir / "config.json").read_text())["train_config"]
    fids = [s for s in stats if "fid" in s]
    if not fids:
        raise ValueError("the run has no FID records: train it with --fid-every")
    evaluation = run_dir / "eval.json"
    return {"run": str(run_dir), "checkpoint": str(checkpoint_path(run_dir)),
            "settings": {k: cfg[k] for k in ("variant", "steps", "batch_size", "lr", "ema", "seed",
                                             "fid_every", "fid_images", "multiscale_loss")},
            "branch_sizes": branch_sizes(model.config),
            "loss_weights": loss_weights(model.config.num_branches, cfg["multiscale_loss"]),
            "fid": [[s["step"], s["fid"]] for s in fids], "fid_images": fids[0]["fid_images"],
            "train_seconds": [s for s in stats if "time" in s][-1]["time"],
            "eval": json.loads(evaluation.read_text()) if evaluation.is_file() else None}


def checkpoint_path(run_dir):
    found = sorted((Path(run_dir) / "checkpoints").glob("ckpt_*.pt"))
    if not found:
        raise FileNotFoundError(f"{run_dir}: no checkpoints/ckpt_*.pt")
    return found[-1]


def branch_sizes(config):
    """Each branch's output size, lowest resolution first (a lone branch outputs full size)."""
    R = config.num_branches
    return [config.input_size // (config.patch_sizes[r] if r < R - 1 else 1) for r in range(R)]


def branch_losses(stats, record, out):
    pyplot = plt()
    logged = [s for s in stats if "loss_branches" in s]
    fig, ax = pyplot.subplots(figsize=(6, 3.5))
    steps = [s["step"] for s in logged]
    for r, (size, weight) in enumerate(zip(record["branch_sizes"], record["loss_weights"])):
        ax.plot(steps, [s["loss_branches"][r] for s in logged],
                label=f"branch {r + 1}, {size}x{size}, loss weight {weight:g}")
    ax.plot(steps, [s["loss"] for s in logged], "k--", label="the weighted sum (the loss)")
    ax.set(xlabel="training step", ylabel="mean squared error (log scale)", yscale="log",
           title="each branch's term of the multi-scale loss")
    ax.legend(fontsize=8)
    save(fig, out / "branch_losses.png")


def fid_over_training(record, out):
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(6, 3.5))
    steps, fids = zip(*record["fid"])
    ax.plot(steps, fids, "o-")
    ax.set(xlabel="training step", ylabel=f"FID-{record['fid_images']}",
           title="FID of EMA samples during training (no guidance)")
    save(fig, out / "fid_over_training.png")
    return ax


def sampler_error(data_dir, out):
    """One log-log panel per sampler_error_*.json of data_dir (the Gaussian, s = 0, 1, 3)."""
    pyplot = plt()
    panels = [("gaussian", "Gaussian (exact solution)")] + [
        (f"s{s}", f"trained digits model, s = {s}") for s in (0, 1, 3)]
    panels = [(name, title) for name, title in panels
              if (data_dir / f"sampler_error_{name}.json").is_file()]
    if not panels:
        raise FileNotFoundError(f"{data_dir}: no sampler_error_*.json (tools/sampler_error.py "
                                "--json)")
    fig, axes = pyplot.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.3), squeeze=False)
    for ax, (name, title) in zip(axes[0], panels):
        record = json.loads((data_dir / f"sampler_error_{name}.json").read_text())
        for row in SAMPLER_ROWS:
            if row in record["errors"]:
                ax.loglog(record["evals"], record["errors"][row], "o-", markersize=3,
                          label=row.strip("*").replace(" (its dpm_solver.py 'fast')", ""))
        ticks = [e for e in (5, 10, 20, 50, 100, 250) if min(record["evals"]) <= e
                 <= max(record["evals"])]
        ax.set_xticks(ticks, [str(e) for e in ticks], minor=False)
        ax.set_xticks([], minor=True)
        ax.set(title=title, xlabel="model evaluations", ylabel="RMS error")
        ax.title.set_fontsize(9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    save(fig, out / "sampler_error.png")


# ----------------------------------------------------------------------------------------------
# adaLN-Zero's PCA with its controls, and TD-LN's time use (the numbers: tools/analyses.py)

def row_models(runs, row):
    """{"seed0": model, ...}: the last checkpoint of every seed of a Table 5 row."""
    models = {}
    for folder in sorted((runs / slug(row)).glob("seed*")):
        found = sorted(folder.glob("*/checkpoints"))
        if found:
            models[folder.name] = last_checkpoint(found[-1].parent).eval()
    if not models:
        raise FileNotFoundError(f"{runs}: no run of {row!r} (python -m tools.table5 --out {runs})")
    return models


def pca_record(runs, pca_class):
    """{row: {seed: {class: analyses.adaln_pca's series}}} for the adaLN-Zero rows."""
    record = {}
    for row in ADALN_ROWS:
        models = row_models(runs, row)
        config = next(iter(models.values())).config
        untrained = [analyses.untrained(config, draw) for draw in range(analyses.DRAWS)]
        classes = {f"class {pca_class}": pca_class, "null class": config.num_classes}
        record[row] = {seed: {label: analyses.adaln_pca(model, c, untrained)
                              for label, c in classes.items()} for seed, model in models.items()}
    return record


def pca_summary(pca):
    """{row: {class: {series: {"first k": [mean, min]}}}} over the seeds and the layers."""
    pooled = {}
    for row, seeds in pca.items():
        for classes in seeds.values():
            for label, series in classes.items():
                for name, values in series.items():
                    ratios = list(values.values()) if isinstance(values, dict) else [values]
                    pooled.setdefault(row, {}).setdefault(label, {}).setdefault(name, []).extend(
                        ratios)
    return {row: {label: {name: {f"first {k}": [float(np.mean(a[:, i])), float(np.min(a[:, i]))]
                                 for i, k in enumerate(analyses.PCA_COMPONENTS)}
                          for name, ratios in series.items() for a in [np.array(ratios)]}
                  for label, series in by_class.items()} for row, by_class in pooled.items()}


def td_record(runs, model):
    """TD-LN's time use: per parameter of every seed of the TD-LN rows and of the --fid-every
    run's model (with its weight curves), an untrained model, and adaLN-Zero's gain and shift."""
    def keep(use):  # the weight curves of the --fid-every run's model only, for the figure
        return {name: {k: v for k, v in u.items() if k != "weight"} for name, u in use.items()}
    models = {row: row_models(runs, row) for row in TD_ROWS
              if any((runs / slug(row)).glob("seed*/*/checkpoints/ckpt_*.pt"))}
    return {"rows": {row: {seed: keep(analyses.td_time_use(m)) for seed, m in ms.items()}
                     for row, ms in models.items()},
            "fid_every_run": analyses.td_time_use(model),
            "untrained": keep(analyses.td_time_use(dimr.DiMR(model.config), trained=False)),
            "adaln_zero": {row: {seed: analyses.adaln_time_use(m, 0)
                                 for seed, m in row_models(runs, row).items()}
                           for row in ADALN_ROWS}}


def td_summary(td):
    """{model: {"branch r, gamma": {"gap"/"range"/"weight_change": [mean, min, max]}}} over
    seeds and parameters (None: 0 / 0, a shift still at zero)."""
    models = {**{row: list(seeds.values()) for row, seeds in td["rows"].items()},
              "--fid-every run": [td["fid_every_run"]], "untrained": [td["untrained"]],
              **{f"adaLN-Zero: {row}": list(seeds.values())
                 for row, seeds in td["adaln_zero"].items()}}
    summary = {}
    for model, uses in models.items():
        for use in uses:
            for key in ("gap", "range", "weight_change"):
                for group, values in analyses.by_branch(use, key).items():
                    summary.setdefault(model, {}).setdefault(group, {}).setdefault(
                        key, []).extend(values)
    return {model: {group: {key: spread(v) for key, v in keys.items()}
                    for group, keys in groups.items()} for model, groups in summary.items()}


def spread(values):
    """[mean, min, max] of the values that are defined; None where none is."""
    values = [v for v in values if v is not None]
    return [float(np.mean(values)), min(values), max(values)] if values else None


PCA_SERIES = {"layers": ("C0", "trained layers"),
              "random readout of c(t)": ("C1", "trained c(t), random readout weights"),
              "untrained, random modulation": ("C2", "untrained, random modulation weights"),
              "c(t)": ("C0", "trained c(t) itself"), "untrained c(t)": ("C2", "untrained c(t)")}
SEED_MARKERS = "os^v"


def pca_figure(pca, out):
    """Per adaLN-Zero row (rows) and number of components k (columns): 1 - the explained
    variance of each layer (log), every seed, class 0 filled and the null class hollow; the
    common input c(t) as lines."""
    pyplot = plt()
    K = analyses.PCA_COMPONENTS
    fig, axes = pyplot.subplots(len(pca), len(K), figsize=(5 * len(K), 3.8 * len(pca)),
                                squeeze=False)
    for axes_row, (row, seeds) in zip(axes, pca.items()):
        for i, ax in enumerate(axes_row):
            for s, (seed, classes) in enumerate(seeds.items()):
                for filled, (label, series) in zip((True, False), classes.items()):
                    for name, (color, _) in PCA_SERIES.items():
                        values = series[name]
                        if isinstance(values, dict):  # seeds side by side, then classes
                            x = np.arange(len(values)) + 0.11 * s - 0.3 + 0.35 * (not filled)
                            ax.scatter(x, [1 - v[i] for v in values.values()], s=12, lw=0.8,
                                       marker=SEED_MARKERS[s], edgecolors=color,
                                       facecolors=color if filled else "none")
                        else:
                            ax.axhline(1 - values[i], color=color, lw=0.8,
                                       ls="--" if name == "c(t)" else ":")
            layers = list(next(iter(seeds.values()))[label]["layers"])
            ax.set_xticks(np.arange(len(layers)), [short(n) for n in layers], rotation=90,
                          fontsize=6)
            ax.set(yscale="log", ylabel=f"1 - variance in the first {K[i]}",
                   title=f"{row}: first {K[i]} component{'s' * (K[i] > 1)}")
            ax.title.set_fontsize(9)
    handles = [pyplot.Line2D([], [], color=c, marker="o", ls="", label=l)
               for name, (c, l) in PCA_SERIES.items() if "c(t)" not in name or "readout" in name]
    handles += [pyplot.Line2D([], [], color=c, ls="--" if name == "c(t)" else ":", label=l)
                for name, (c, l) in PCA_SERIES.items() if name in ("c(t)", "untrained c(t)")]
    handles += [pyplot.Line2D([], [], color="k", marker=m, ls="", label=f"seed {s}")
                for s, m in enumerate(SEED_MARKERS[:len(next(iter(pca.values())))])]
    handles += [pyplot.Line2D([], [], color="k", marker="o", ls="", mfc="none",
                              label="null class (filled: class 0)")]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=7)
    fig.suptitle("PCA of each adaLN layer's (shift, scale) over n = 1..1000: the variance left "
                 "outside the first k components (log scale; lower = closer to rank k)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    fig.savefig(out / "adaln_pca.png", dpi=110)
    plt().close(fig)
    return axes


def td_figure(td, out):
    """Left: the --fid-every run's interpolation weights over n, with the initial curve
    sigmoid(t~); right: the relative range over n of every gain, TD-LN's of every TD-LN row and
    seed and the --fid-every run, and adaLN-Zero's 1 + scale."""
    pyplot = plt()
    fig, (left, right) = pyplot.subplots(1, 2, figsize=(12, 4.2))
    n = np.arange(0, NUM_TIMESTEPS + 1, analyses.CURVE_EVERY)
    for name, use in td["fid_every_run"].items():
        left.plot(n, use["weight"], lw=1, color=f"C{analyses.branch_of(name)}")
    init = next(iter(td["untrained"]))
    left.plot(n, td["untrained_weight"][init], "k--", lw=2, label="initialisation (w = b = 0)")
    left.plot([], [], color="C0", label="Transformer branch (branch 1)")
    left.plot([], [], color="C1", label="ConvNeXt branch (branch 2)")
    left.set(xlabel="DDPM step n", ylabel="sigmoid((1 + w) t~ + b), mean over channels",
             title="--fid-every run: each TD parameter's interpolation weight")
    left.legend(fontsize=7)
    columns = [*td["rows"].items(), ("--fid-every run", {"": td["fid_every_run"]}),
               *[(f"adaLN-Zero: {row}", seeds) for row, seeds in td["adaln_zero"].items()]]
    for x, (label, seeds) in enumerate(columns):
        for s, use in enumerate(seeds.values()):
            for name, u in use.items():
                if name.endswith("gamma") and u["range"] is not None:
                    r = analyses.branch_of(name)
                    right.scatter(x + 0.1 * (s - 1) + 0.3 * r - 0.15, u["range"], s=8,
                                  color=f"C{r}", marker=SEED_MARKERS[s])
    right.set_xticks(range(len(columns)), [c[0] for c in columns], rotation=25, ha="right",
                     fontsize=7)
    right.set(yscale="log", ylabel="relative range of the gain over n (log)",
              title="how much each gain moves over n = 0..1000, relative to its size\n(every "
                    "seed; TD-LN's gains: 0 at initialisation; adaLN-Zero: 1 + scale, class 0)")
    right.title.set_fontsize(8)
    left.title.set_fontsize(9)
    save(fig, out / "tdln_weights.png")
    return left, right


def short(name):
    return name.replace("branches.", "b").replace("blocks.", "")


# ----------------------------------------------------------------------------------------------
# Table 5 in miniature, and its distortion in miniature

TABLE5_PANELS = (("fid", "FID-{samples} against the real digits", 1),
                 ("accuracy", "class accuracy (%)", 100),
                 ("low_confidence", "share below confidence {threshold:g} (%)", 100))


def table5_figure(record, out):
    """FID, class accuracy and the low-confidence share here (mean, and each seed as a point),
    beside the paper's FID."""
    pyplot = plt()
    rows = [r[0] for r in ROWS if r[0] in record["results"]]
    seeds = max(len(record["results"][r]) for r in rows)
    fig, axes = pyplot.subplots(1, len(TABLE5_PANELS) + 1, figsize=(17, 4.2))
    x = np.arange(len(rows))
    for ax, (key, label, scale) in zip(axes, TABLE5_PANELS):
        ax.bar(x, [scale * record["summary"][r][key][0] for r in rows], color="C1", alpha=0.6)
        for i, r in enumerate(rows):
            values = [scale * run[key] for run in record["results"][r]]
            ax.plot(np.full(len(values), i), values, "k.", ms=5)
        ax.set(ylabel=label.format(samples=record["samples"],
                                   threshold=record["low_confidence_threshold"]),
               title=f"here: digits, {record['train_steps']:,} steps, n = {seeds} seeds "
                     "(bar: mean, dots: seeds)")
    axes[2].axhline(100 * record["real_digits"]["low_confidence"], color="C2", ls="--",
                    label=f"the real digits ({record['real_digits']['folds']}-fold)")
    axes[2].set_ylim(0, 1.25 * axes[2].get_ylim()[1])  # room for the legend above the bars
    axes[2].legend(fontsize=7, loc="upper right")
    paper = [record["paper"][r]["fid"] for r in rows]
    axes[-1].bar(x, [np.nan if f is None else f for f in paper], color="C0")
    axes[-1].set(ylabel="FID-50K", title="the paper: ImageNet 64, 300K steps")
    for ax in axes:
        ax.set_xticks(x, rows, rotation=30, ha="right", fontsize=7)
        ax.title.set_fontsize(8)
    save(fig, out / "table5.png")
    return axes


def distortion_figure(record, runs, out):
    """Each row's PICKS lowest-confidence samples (seed 0), as the paper's Fig. 1 shows a
    classifier's low-fidelity picks, and the real digits' own (cross-validated)."""
    pyplot = plt()
    rows = [r[0] for r in ROWS if r[0] in record["results"]]
    grids = []
    for row in rows:
        run = record["results"][row][0]
        with np.load(sorted((runs / slug(row) / f"seed{run['seed']}").glob("*/samples.npz"))[-1]
                     ) as samples:
            images, labels = samples["arr_0"], samples["labels"]
        grids.append((f"{row} (seed {run['seed']}): {100 * run['low_confidence']:.1f}% of its "
                      f"samples below {record['low_confidence_threshold']:g}",
                      images[run["picks"]], labels[run["picks"]], run["pick_confidences"]))
    real = record["real_digits"]
    images, labels = digits.real_digits_uint8()
    grids.append((f"the real digits ({real['folds']}-fold): {100 * real['low_confidence']:.1f}% "
                  f"below {record['low_confidence_threshold']:g}",
                  images[real["picks"]], labels[real["picks"]], real["pick_confidences"]))
    cols = len(grids[0][1])
    fig, axes = pyplot.subplots(len(grids), cols, figsize=(0.6 * cols, 0.95 * len(grids)))
    for ax_row, (title, images, labels, confidences) in zip(axes, grids):
        for ax, image, label, p in zip(ax_row, images, labels, confidences):
            ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(f"{label}: {p:.2f}", fontsize=6, labelpad=1)
        ax_row[0].set_title(title, fontsize=7, loc="left")
    fig.suptitle(f"each model's {cols} samples whose conditioned class (below each: class: "
                 "probability) the real digits' classifier trusts least", fontsize=8)
    # no tight_layout: the row titles run over the first image's width, on purpose
    fig.subplots_adjust(left=0.02, right=0.98, top=1 - 0.5 / len(grids), bottom=0.03,
                        hspace=0.9, wspace=0.1)
    fig.savefig(out / "distortion_picks.png", dpi=110)
    plt().close(fig)


# ----------------------------------------------------------------------------------------------

ADALN_ROWS = ("+ adaLN-Zero", "adaLN-Zero + multi-branch")
TD_ROWS = ("TD-LN, one branch", "TD-LN + multi-branch", "+ GLU",
           "+ multi-scale loss (= DiMR-S/2R)")


def run(args, argv):
    start = time.time()
    distributed.set_threads(args.threads)
    out, data_dir, runs = Path(args.out), Path(args.data), Path(args.table5)
    if not (data_dir / "table5.json").is_file():
        raise FileNotFoundError(f"{data_dir}: no table5.json (python -m tools.table5 --out {runs}"
                                f" --json {data_dir / 'table5.json'})")
    table5 = json.loads((data_dir / "table5.json").read_text())
    stats, model = run_stats(args.run_dir), last_checkpoint(args.run_dir)
    fid_every = fid_every_record(args.run_dir, model)
    pca, td = pca_record(runs, args.pca_class), td_record(runs, model)
    td["untrained_weight"] = {name: u["weight"] for name, u in analyses.td_time_use(
        dimr.DiMR(model.config), trained=False).items()}
    analysis = {"draws": analyses.DRAWS, "pca": pca, "pca_summary": pca_summary(pca), "td": td,
                "td_summary": td_summary(td),
                "this_call": provenance.record("python -m tools.figures", argv, start)}
    fid_every["this_call"] = analysis["this_call"]
    checkpoints.write_text(data_dir / "analysis.json", json.dumps(analysis, indent=1) + "\n")
    checkpoints.write_text(data_dir / "fid_every.json", json.dumps(fid_every, indent=1) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    branch_predictions(model, fid_every["checkpoint"], out)
    branch_losses(stats, fid_every, out)
    fid_over_training(fid_every, out)
    sampler_error(data_dir, out)
    table5_figure(table5, out)
    distortion_figure(table5, runs, out)
    pca_figure(pca, out)
    td_figure(td, out)
    text = page.render(Path(args.template).read_text(), page.fields(data_dir))
    checkpoints.write_text(args.page, text)
    print(f"wrote {len(list(out.glob('*.png')))} figures to {out}, {data_dir / 'analysis.json'}, "
          f"{data_dir / 'fid_every.json'} and {args.page}")


def main(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a train.py run on the digits, trained with --fid-every")
    p.add_argument("--table5", default="runs/table5", help="python -m tools.table5's --out")
    p.add_argument("--data", default="docs/data", help="the numbers: table5.json and "
                   "sampler_error_*.json in, analysis.json and fid_every.json out")
    p.add_argument("--out", default="docs/figures", help="where the figures go")
    p.add_argument("--template", default="docs/analyses.md.in", help="the page's template")
    p.add_argument("--page", default="docs/analyses.md", help="the page rendered from it")
    p.add_argument("--pca-class", type=int, default=0, help="the fixed class of the PCA")
    add_threads_flag(p)
    args = p.parse_args(argv)
    distributed.run_main(lambda: run(args, sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
