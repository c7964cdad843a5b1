"""docs/analyses.md from its template docs/analyses.md.in: every table and number of the page is a
{{field}} that `fields` fills from the records in docs/data (table5.json, analysis.json,
fid_every.json, sampler_error_*.json), so the page says what its records say. tools/figures.py
renders it last; tests/test_page.py checks the page against the records.
"""
import json
import re
from pathlib import Path

from tools.analyses import PCA_COMPONENTS
from tools.table5 import COMPARISONS, ROWS

TD_MULTI, ADALN_MULTI = "TD-LN + multi-branch", "adaLN-Zero + multi-branch"  # differ in the norm
FIELD = re.compile(r"\{\{([^{}]+)\}\}")
PCA_SERIES = ("layers", "random readout of c(t)", "untrained, random modulation", "c(t)",
              "untrained c(t)")
PCA_LABELS = {"layers": "trained layers", "random readout of c(t)":
              "trained c(t), random readout weights (mean of 5 draws)",
              "untrained, random modulation": "untrained, random modulation weights (5 draws)",
              "c(t)": "trained c(t) itself", "untrained c(t)": "untrained c(t) itself"}
METRICS = (("fid", "FID", "{:.2f}"), ("accuracy", "class accuracy", "{:.1%}"),
           ("low_confidence", "low-confidence share", "{:.1%}"), ("loss", "final loss", "{:.4f}"))


def render(template, fields):
    """template with every {{name}} replaced by fields[name]; a name without a value is an
    error, so the page never shows a stale or empty number."""
    missing = sorted(set(FIELD.findall(template)) - set(fields))
    if missing:
        raise KeyError(f"the template names fields that no record fills: {missing}")
    return FIELD.sub(lambda m: fields[m.group(1)], template)


def records(data_dir):
    return {name: json.loads((Path(data_dir) / f"{name}.json").read_text())
            for name in ("table5", "analysis", "fid_every")}


def fields(data_dir):
    """{field name: its text} of every number and generated table of the page."""
    r = records(data_dir)
    return {**table5_fields(r["table5"]), **distortion_fields(r["table5"]),
            **pca_fields(r["analysis"]), **td_fields(r["analysis"]),
            **fid_every_fields(r["fid_every"]), **sampler_fields(Path(data_dir))}


# ----------------------------------------------------------------------------------------------
# Formats

def duration(seconds):
    """'2 h 01 min', '12 min 21 s', '48 s'."""
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


def mean_sd(summary, key, fmt):
    """'20.76 +- 0.49' (percentages as '80.6% +- 0.1')."""
    mean, sd, _ = summary[key]
    if fmt.endswith("%}"):
        return f"{100 * mean:.1f}% +- {100 * sd:.1f}"
    return f"{fmt.format(mean)} +- {fmt.format(sd)}"


def p_value(p):
    return "p n/a" if p is None else "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def span(values, fmt="{:.3f}"):
    """'0.948-0.974', or one number when they agree at fmt."""
    lo, hi = fmt.format(min(values)), fmt.format(max(values))
    return lo if lo == hi else f"{lo}-{hi}"


# ----------------------------------------------------------------------------------------------
# Table 5 and its distortion

def table5_fields(t5):
    rows = [row for row in ROWS if row[0] in t5["summary"]]
    seeds = sorted({run["seed"] for runs in t5["results"].values() for run in runs})
    alpha = t5["rule_levels"]["significant"]
    body = [[name, paper or "-", "-" if m is None else f"{m}M",
             *[mean_sd(t5["summary"][name], key, fmt) for key, _, fmt in METRICS
               if key != "low_confidence"],
             f"{t5['results'][name][0]['parameters']:,}"] for name, _, _, paper, m in rows]
    fields = {"t5.table": table(["model", "FID (paper)", "parameters (paper)",
                                 f"FID-{t5['samples']} here", "class accuracy", "final loss",
                                 "parameters here"], body),
              "t5.comparisons": comparisons_table(t5), "t5.rule": t5["rule"],
              "t5.n_tests": str(len(t5["comparisons"]) * len(METRICS)),
              "t5.alpha": f"{alpha:g}",
              "t5.chance_hits": f"{alpha * len(t5['comparisons']) * len(METRICS):.1f}",
              "t5.seeds": ", ".join(map(str, seeds)), "t5.n_seeds": str(len(seeds)),
              "t5.samples": f"{t5['samples']:,}", "t5.sampler_steps": str(t5["sampler_steps"]),
              "t5.threshold": f"{t5['low_confidence_threshold']:g}",
              **{f"t5.recipe.{k}": f"{v:,}" if isinstance(v, int) else f"{v:g}"
                 for k, v in t5["recipe"].items()}}
    for change, *_ in COMPARISONS:  # a comparison whose rows are not there yet
        for key, _, _ in METRICS:
            fields[f"t5.verdict.{change}.{key}"] = "not run"
    for c in t5["comparisons"]:
        for key, _, fmt in METRICS:
            v = c[key]
            fields[f"t5.verdict.{c['change']}.{key}"] = (
                f"{v['verdict']} ({fmt.format(v['from'])} -> {fmt.format(v['to'])}, "
                f"{p_value(v['p'])})")
    return {**fields, **cost_fields(t5["cost"])}


def paper_direction(t5, c):
    """What the paper's Table 5 says of the same change (lower FID is better), and whether the
    verdict on FID here goes the same way."""
    a, b = t5["paper"][c["from"]]["fid"], t5["paper"][c["to"]]["fid"]
    if a is None or b is None:
        return "not in the paper"
    paper, here = "better" if b < a else "worse", c["fid"]["verdict"]
    relation = ("no verdict here" if here == "no difference shown" else
                "the same way" if here.endswith(paper) else "the opposite way")
    return f"{paper} ({a} -> {b}): {relation}"


def comparisons_table(t5):
    rows = []
    for c in t5["comparisons"]:
        cells = [f"{fmt.format(c[key]['from'])} -> {fmt.format(c[key]['to'])}, "
                 f"{p_value(c[key]['p'])}: **{c[key]['verdict']}**" for key, _, fmt in METRICS]
        rows.append([f"{c['change']} ({c['from']} -> {c['to']})", *cells,
                     paper_direction(t5, c)])
    return table(["change (from -> to)", *[label for _, label, _ in METRICS],
                  "the paper's FID"], rows)


def cost_fields(cost):
    calls = "\n".join(f"    {c['command']}    # {duration(c['wall_seconds'])}, from "
                      f"{c['started']}, commit {c['commit'][:7]}" for c in cost["invocations"])
    return {"t5.cost.runs": str(cost["runs"]), "t5.cost.invocations": calls,
            "t5.cost.n_invocations": str(len(cost["invocations"])),
            "t5.cost.wall": duration(cost["wall_seconds"]) if cost["wall_seconds"] else "n/a",
            "t5.cost.started": min((c["started"] for c in cost["invocations"]), default="n/a"),
            "t5.cost.finished": str(cost["finished"]),
            "t5.cost.train_sum": duration(cost["train_wall_seconds_sum"]),
            "t5.cost.eval_sum": duration(cost["eval_wall_seconds_sum"]),
            "t5.cost.train_range": "-".join(f"{s:.0f}" for s in cost["train_wall_seconds_range"]),
            "t5.cost.eval_range": "-".join(f"{s:.0f}" for s in cost["eval_wall_seconds_range"])}


def distortion_fields(t5):
    paper = {row: (model, share) for model, share, row in t5["paper_distortion"]}
    body = [[name, mean_sd(t5["summary"][name], "low_confidence", "{:.1%}"),
             mean_sd(t5["summary"][name], "mean_confidence", "{:.3f}"),
             f"{paper[name][0]}: {paper[name][1]}%" if name in paper else "-"]
            for name, *_ in ROWS if name in t5["summary"]]
    real = t5["real_digits"]
    body.append([f"the real digits ({real['folds']}-fold cross-validated)",
                 f"{100 * real['low_confidence']:.1f}% (folds: " + ", ".join(
                     f"{100 * v:.1f}%" for v in real["low_confidence_by_fold"]) + ")",
                 f"{real['mean_confidence']:.3f}", "-"])
    first = {name: runs[0] for name, runs in t5["results"].items()}
    return {**{f"d.paper.{model}": f"{share}%" for model, share, _ in t5["paper_distortion"]},
            "d.picks": str(len(next(iter(first.values()))["picks"])),
            "d.picks_seed": ", ".join(sorted({str(r["seed"]) for r in first.values()})),
            "d.table": table(["model", f"share below {t5['low_confidence_threshold']:g}, "
                              "mean +- sd over seeds", "mean confidence",
                              "the paper: share of the picks people judged distorted"], body),
            "d.real": f"{100 * real['low_confidence']:.1f}%", "d.folds": str(real["folds"]),
            "d.real_vs_rows": ("below" if real["low_confidence"] < min(
                v["low_confidence"][0] for v in t5["summary"].values()) else "not below")
            + " every row's mean share",
            "d.digits": f"{real['digits']:,}"}


# ----------------------------------------------------------------------------------------------
# The PCA and TD-LN's time use

def pca_fields(analysis):
    summary = analysis["pca_summary"]
    body = []
    for row, by_class in summary.items():
        for label, series in by_class.items():
            for name in PCA_SERIES:
                cells = [f"{m:.3f} ({lo:.3f})" for m, lo in series[name].values()]
                body.append([row, label, PCA_LABELS[name], *cells])
    header = ["model", "class", "series", *[f"first {k}: mean (min)" for k in PCA_COMPONENTS]]
    fields = {"pca.table": table(header, body)}
    cases = [series for by_class in summary.values() for series in by_class.values()]
    for name in PCA_SERIES:
        for k in cases[0][name]:
            key = k.split()[1]
            fields[f"pca.{name}.k{key}"] = span([s[name][k][0] for s in cases])
            fields[f"pca.{name}.k{key}.min"] = span([s[name][k][1] for s in cases])
            fields[f"pca.{name}.k{key}.residual"] = span([1 - s[name][k][0] for s in cases],
                                                         "{:.1%}")
    ratios = [(1 - s["random readout of c(t)"]["first 2"][0]) / (1 - s["layers"]["first 2"][0])
              for s in cases]
    fields["pca.readout_over_trained.k2"] = span(ratios, "{:.1f}")
    fields["pca.seeds"] = str(len(next(iter(analysis["pca"].values()))))
    fields["pca.draws"] = str(analysis["draws"])
    for row, seeds in analysis["pca"].items():
        first = next(iter(next(iter(seeds.values())).values()))  # a seed's, a class's series
        fields[f"pca.layers.{row}"] = str(len(first["layers"]))
    return fields


def td_fields(analysis):
    """The TD-LN table (relative gap and range, mean (min-max) per model and branch) and each
    cell as a field td.<model>.<group>.<gap|range>."""
    body, fields = [], {}
    for model, groups in analysis["td_summary"].items():
        for group, keys in groups.items():
            cells = []
            for key in ("gap", "range", "weight_change"):
                v = keys.get(key)
                text = "-" if v is None else f"{v[0]:.3f} ({v[1]:.3f}-{v[2]:.3f})"
                fields[f"td.{model}.{group}.{key}"] = "-" if v is None else f"{v[0]:.3f}"
                cells.append(text if key in keys else "-")
            body.append([model, group, *cells])
    summary = analysis["td_summary"]
    trained = [g["range"][1] for model, groups in summary.items() for name, g in groups.items()
               if name.endswith("gamma") and model != "untrained" and "gap" in g]
    fields["td.gain_range_min"] = f"{min(trained):.3f}"  # the least time-dependent trained gain
    td, adaln = summary.get(TD_MULTI, {}), summary.get(f"adaLN-Zero: {ADALN_MULTI}", {})
    for r in (1, 2):
        group = f"branch {r}, gamma"
        if group in td and group in adaln:  # adaLN-Zero's time dependence / TD-LN's
            ratio = adaln[group]["range"][0] / td[group]["range"][0]
            fields[f"td.adaln_over_td.{r}"] = f"{ratio:.1f}"
    two = [g for model, g in summary.items() if model != "untrained" and "gap" in g.get(
        "branch 2, gamma", {})]  # the trained TD-LN models with two branches
    more = sum(g["branch 1, gamma"]["range"][0] > g["branch 2, gamma"]["range"][0] for g in two)
    fields["td.branch_order"] = (f"In {more} of the {len(two)} two-branch TD-LN models the "
                                 "Transformer branch's gains move more on average than the "
                                 "ConvNeXt branch's.")
    init = next(iter(analysis["td"]["untrained_weight"].values()))  # sigmoid(t~), n = 0..1000
    fields["td.init_from"], fields["td.init_to"] = f"{init[0]:.2f}", f"{init[-1]:.2f}"
    fields["td.table"] = table(["model", "branch, parameter", "relative gap of p0, p1: mean "
                                "(min-max)", "relative range over n: mean (min-max)",
                                "weight curve's largest distance from sigmoid(t~): mean "
                                "(min-max)"], body)
    return fields


# ----------------------------------------------------------------------------------------------
# The --fid-every run and the samplers

def fid_every_fields(fe):
    fids = fe["fid"]
    fields = {"fe.fid_images": str(fe["fid_images"]), "fe.first_step": f"{fids[0][0]:,}",
              "fe.first": f"{fids[0][1]:.2f}", "fe.last_step": f"{fids[-1][0]:,}",
              "fe.last": f"{fids[-1][1]:.2f}",
              "fe.middle": ", ".join(f"{f:.2f}" for _, f in fids[1:-1]),
              "fe.each_best": "each the best so far" if all(
                  b[1] < a[1] for a, b in zip(fids, fids[1:])) else "not each the best so far",
              "fe.train_time": duration(fe["train_seconds"]), "fe.checkpoint": fe["checkpoint"],
              "fe.run": fe["run"], "fe.steps": f"{fe['settings']['steps']:,}",
              "fe.branches": ", ".join(f"{s}x{s} with loss weight {w:g}" for s, w in
                                       zip(fe["branch_sizes"], fe["loss_weights"]))}
    ev = fe["eval"]
    fields["fe.eval"] = "no final evaluation recorded" if ev is None else (
        f"a class accuracy of {100 * ev['accuracy']:.1f}% ({ev['samples']} samples, "
        f"s = {ev['guidance']:g})")
    return fields


def sampler_fields(data_dir):
    """Whether the default sampler beats the release's at every number of evaluations measured,
    in each sampler_error_*.json."""
    worse = []
    files = sorted(data_dir.glob("sampler_error_*.json"))
    files = [f for f in files if "fid_setting" not in f.name]
    for path in files:
        record = json.loads(path.read_text())
        errors = record["errors"]
        release = next(v for k, v in errors.items() if k.startswith("release"))
        worse += [f"{path.stem} at {e}" for e, a, b in zip(record["evals"], errors["**default**"],
                                                              release) if not a < b]
    verdict = (f"more accurate than the release's sampler at every number of evaluations measured,"
               f" on all {len(files)} panels") if not worse else (
        "not more accurate than the release's at " + ", ".join(worse))
    return {"sampler.verdict": verdict}
