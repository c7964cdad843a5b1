"""Every figure of the docs, from a digits run, the Table 5 runs and the numbers in docs/data.

    python -m tools.figures runs/NNN-DiMR-S-2R --table5 runs/table5     # -> docs/figures/

RUN_DIR is a `train.py` run on the digits with FID during training (`--fid-every`, docs/
analyses.md has the command); --table5 the folder of `python -m tools.table5`. Written to --out:

- branch_predictions.png: what each branch of RUN_DIR's model predicts of a clean digit from x_n;
- branch_losses.png: each branch's term of the multi-scale loss against the step (stats.jsonl);
- fid_over_training.png: FID against the step (stats.jsonl);
- sampler_error.png: error against evaluations (docs/data/sampler_error_*.json);
- adaln_pca.png: the paper's PCA of adaLN-Zero's scale and shift over time, per layer, on the
  adaLN-Zero rows of Table 5 (seed 0);
- tdln_weights.png: the interpolation weight sigmoid((1 + w) t~ + b) of every TD-LN layer of
  RUN_DIR's model against the step n;
- table5.png: Table 5 in miniature beside the paper's.
The numbers behind the PCA and the TD-LN curves go to --data/analysis.json and are printed.
Plotting needs matplotlib (requirements-figures.txt), and only this script does.
"""
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import dimr
from diffusion import NUM_TIMESTEPS, DiscreteSchedule
from support import checkpoints, digits, distributed
from support.cli import Parser
from td_ln import TimeDependentParameter, t_tilde
from support.run_folder import read_stats
from tools.table5 import ROWS, mean_and_spread, slug

NOISE_LEVELS = (1000, 700, 400, 200, 100, 30)  # DDPM steps n of branch_predictions.png
EXAMPLE_DIGITS = (0, 3, 7)                     # the real digits it shows (their first example)
PCA_COMPONENTS = (1, 2, 3)
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
    found = sorted((Path(run_dir) / "checkpoints").glob("ckpt_*.pt"))
    if not found:
        raise FileNotFoundError(f"{run_dir}: no checkpoints/ckpt_*.pt")
    return checkpoints.load_model(found[-1])[0]


def run_stats(run_dir):
    if not (Path(run_dir) / "stats.jsonl").is_file():
        raise FileNotFoundError(f"{run_dir}: not a train.py run folder (no stats.jsonl)")
    return read_stats(run_dir)


# ----------------------------------------------------------------------------------------------
# What each branch predicts

@torch.no_grad()
def branch_predictions(model, out):
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
                    ax.set_ylabel("x_n" if r == 0 else f"branch {r}, {size // ks[r - 1]}px",
                                  fontsize=7)
        axes[0, j].set_title("clean x_0" if n is None else f"n = {n}", fontsize=8)
    fig.suptitle("DiMR-S/2R: the noisy input and each branch's prediction of the clean digit",
                 fontsize=9)
    save(fig, out / "branch_predictions.png")


# ----------------------------------------------------------------------------------------------
# Curves of a run

def branch_losses(stats, out):
    pyplot = plt()
    logged = [s for s in stats if "loss_branches" in s]
    fig, ax = pyplot.subplots(figsize=(6, 3.5))
    steps = [s["step"] for s in logged]
    R = len(logged[0]["loss_branches"])
    for r in range(R):
        ax.plot(steps, [s["loss_branches"][r] for s in logged],
                label=f"branch {r + 1}" + (" (full resolution)" if r == R - 1 else ""))
    ax.plot(steps, [s["loss"] for s in logged], "k--", label="the weighted sum (the loss)")
    ax.set(xlabel="training step", ylabel="mean squared error (log scale)", yscale="log",
           title="each branch's term of the multi-scale loss")
    ax.legend(fontsize=8)
    save(fig, out / "branch_losses.png")


def fid_over_training(stats, out):
    pyplot = plt()
    fids = [s for s in stats if "fid" in s]
    if not fids:
        raise ValueError("the run has no FID records: train it with --fid-every")
    fig, ax = pyplot.subplots(figsize=(6, 3.5))
    ax.plot([s["step"] for s in fids], [s["fid"] for s in fids], "o-")
    ax.set(xlabel="training step", ylabel=f"FID-{fids[0]['fid_images']}",
           title="FID of EMA samples during training (no guidance)")
    save(fig, out / "fid_over_training.png")


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
# adaLN-Zero's PCA (the paper's argument for TD-LN) and TD-LN's learned curves

@torch.no_grad()
def adaln_pca(model, class_id):
    """Per adaLN layer: the explained-variance ratios of the first PCA_COMPONENTS principal
    components of its (shift, scale) over the steps n = 1..1000, at class_id. Layers whose
    parameters do not vary (still zero: a norm that no loss term reaches) are left out."""
    n = torch.arange(1, NUM_TIMESTEPS + 1, dtype=torch.float32)
    cond, _ = model.condition(n, torch.full((len(n),), class_id))          # (1000, D1)
    ratios = {"c(t), the input of every layer": explained_variance(cond)}
    for name, module in model.named_modules():
        if isinstance(module, dimr.AdaLN):
            params = module.modulation(cond)                               # (1000, 2D)
            if params.std(0).max() > 0:
                ratios[name] = explained_variance(params)
    return ratios


def explained_variance(rows):
    """The share of the variance of the rows (over time) in their first k principal components,
    for k in PCA_COMPONENTS."""
    var = torch.linalg.svdvals(rows.double() - rows.double().mean(0)) ** 2
    return [float(var[:k].sum() / var.sum()) for k in PCA_COMPONENTS]


@torch.no_grad()
def td_weights(model):
    """Per TD parameter: its interpolation weight sigmoid((1 + w) t~ + b) for n = 0..1000, the
    mean over its channels, and the fraction of its channels that change by > 0.5 over n."""
    n = torch.arange(0, NUM_TIMESTEPS + 1, dtype=torch.float32)
    curves = {}
    for name, module in model.named_modules():
        if isinstance(module, TimeDependentParameter):
            s = torch.sigmoid((1 + module.w) * t_tilde(n)[:, None] + module.b)  # (1001, dim)
            curves[name] = {"mean": s.mean(1).tolist(),
                            "changing": float(((s.amax(0) - s.amin(0)) > 0.5).float().mean())}
    return curves


def pca_figure(pca, out):
    pyplot = plt()
    fig, axes = pyplot.subplots(1, len(pca), figsize=(6 * len(pca), 3.8), squeeze=False)
    for ax, (row, by_class) in zip(axes[0], pca.items()):
        for offset, (label, ratios) in zip((-0.2, 0.2), by_class.items()):
            layers = list(ratios)
            for k in reversed(range(len(PCA_COMPONENTS))):
                ax.bar(np.arange(len(layers)) + offset, [ratios[l][k] for l in layers], width=0.4,
                       label=f"{label}: first {PCA_COMPONENTS[k]}", alpha=0.45 + 0.2 * k)
        ax.set_xticks(np.arange(len(layers)), [short(l) for l in layers], rotation=90, fontsize=6)
        ax.set(ylim=(0, 1.02), ylabel="explained variance ratio",
               title=f"{row}: PCA of each adaLN layer's (shift, scale), n = 1..1000")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=6, ncol=2, loc="lower right")
    save(fig, out / "adaln_pca.png")


def td_figure(curves, out):
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(7, 4))
    n = np.arange(0, NUM_TIMESTEPS + 1)
    for name, curve in curves.items():
        ax.plot(n, curve["mean"], lw=1, color="C0" if name.startswith("branches.0.") else "C1")
    ax.plot([], [], color="C0", label="Transformer branch")
    ax.plot([], [], color="C1", label="ConvNeXt branch, cascade, heads")
    ax.set(xlabel="DDPM step n", ylabel="sigmoid((1 + w) t~ + b), mean over channels",
           title="TD-LN: each layer's interpolation weight between its two vectors")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    save(fig, out / "tdln_weights.png")


def short(name):
    return "c(t)" if name.startswith("c(t)") else name.replace("branches.", "b").replace(
        "blocks.", "")


# ----------------------------------------------------------------------------------------------
# Table 5 in miniature

def table5_figure(record, out):
    pyplot = plt()
    rows = [r for r in ROWS if r[0] in record["results"]]
    fig, (left, right) = pyplot.subplots(1, 2, figsize=(11, 3.8))
    x = np.arange(len(rows))
    stats = [mean_and_spread([run["fid"] for run in record["results"][r[0]]]) for r in rows]
    left.bar(x, [m for m, _ in stats], yerr=[s for _, s in stats], capsize=3, color="C1")
    left.set(ylabel=f"FID-{record['samples']} against the real digits",
             title=f"here: digits, {record['train_steps']:,} steps (mean and std over seeds)")
    right.bar(x, [np.nan if r[3] is None else r[3] for r in rows], color="C0")
    right.set(ylabel="FID-50K", title="the paper: ImageNet 64, 300K steps")
    for ax in (left, right):
        ax.set_xticks(x, [r[0] for r in rows], rotation=30, ha="right", fontsize=7)
        ax.title.set_fontsize(9)
    save(fig, out / "table5.png")


# ----------------------------------------------------------------------------------------------

def run(args):
    out, data_dir, runs = Path(args.out), Path(args.data), Path(args.table5)
    stats, model = run_stats(args.run_dir), last_checkpoint(args.run_dir)
    if not (runs / "table5.json").is_file():
        raise FileNotFoundError(f"{runs}: no table5.json (python -m tools.table5 --out {runs})")
    record = json.loads((runs / "table5.json").read_text())
    adaln_runs = {row: sorted((runs / slug(row) / "seed0").glob("*/checkpoints"))
                  for row in ("+ adaLN-Zero", "adaLN-Zero + multi-branch")}
    missing = [row for row, found in adaln_runs.items() if not found]
    if missing:
        raise FileNotFoundError(f"{runs}: no seed-0 run of {missing[0]!r} (its adaLN-Zero "
                                "layers are the PCA's): run tools/table5.py with seed 0")
    out.mkdir(parents=True, exist_ok=True)
    branch_predictions(model, out)
    branch_losses(stats, out)
    fid_over_training(stats, out)
    sampler_error(data_dir, out)
    table5_figure(record, out)
    pca = {}
    for row, found in adaln_runs.items():
        adaln = last_checkpoint(found[-1].parent)
        pca[row] = {f"class {args.pca_class}": adaln_pca(adaln, args.pca_class),
                    "null class": adaln_pca(adaln, adaln.config.num_classes)}
    pca_figure(pca, out)
    curves = td_weights(model)
    td_figure(curves, out)
    summary = {row: {label: {f"first {k}": [float(np.mean(layers[:, i])),
                                             float(np.min(layers[:, i]))]
                             for i, k in enumerate(PCA_COMPONENTS)}
                     for label, ratios in by_class.items()
                     for layers in [np.array([r for name, r in ratios.items()
                                              if not name.startswith("c(t)")])]}
               for row, by_class in pca.items()}
    analysis = {"pca": pca, "pca_summary_mean_min": summary,
                "td_changing_channels": {k: v["changing"] for k, v in curves.items()}}
    checkpoints.write_text(data_dir / "analysis.json", json.dumps(analysis, indent=1) + "\n")
    for row, by_class in summary.items():
        for label, cells in by_class.items():
            print(f"adaLN-Zero PCA, {row}, {label}: explained variance, mean (min) over "
                  f"{len(pca[row][label]) - 1} layers: " + ", ".join(
                      f"{k} {m:.3f} ({lo:.3f})" for k, (m, lo) in cells.items()))
    print(f"wrote {len(list(out.glob('*.png')))} figures to {out} and {data_dir / 'analysis.json'}")


def main(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a train.py run on the digits, trained with --fid-every")
    p.add_argument("--table5", default="runs/table5", help="python -m tools.table5's --out")
    p.add_argument("--data", default="docs/data", help="the numbers: sampler_error_*.json in, "
                                                        "analysis.json out")
    p.add_argument("--out", default="docs/figures", help="where the figures go")
    p.add_argument("--pca-class", type=int, default=0, help="the fixed class of the PCA")
    args = p.parse_args(argv)
    distributed.run_main(lambda: run(args))


if __name__ == "__main__":
    main()
