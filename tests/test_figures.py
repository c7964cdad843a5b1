"""tools/figures.py on a tiny run: a few training steps with FID during training, every row of
Table 5 for a few steps, a small sampler table. Every figure is written, each figure's data is its
record's (docs/data/*.json), the page is its template filled from the records
(test_page.check_page), and the PCA's numbers are those of numpy's SVD of a layer's parameters."""
import json

import numpy as np
import pytest
import torch

import dimr
import fid
import train
from support import checkpoints
from test_page import TEMPLATE, check_page
from tools import figures, sampler_error, table5

FIGURES = ("branch_predictions.png", "branch_losses.png", "fid_over_training.png",
           "sampler_error.png", "adaln_pca.png", "tdln_weights.png", "table5.png",
           "distortion_picks.png")


class _Moments(torch.nn.Module):
    """A stand-in Inception (the figures are under test, not the features): 4 moments."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        pool = torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3)), x.amax((1, 2, 3)),
                            x[:, 0].mean((1, 2))], 1)
        return fid.Activations(pool, pool, None)


def test_every_figure_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fid, "load_inception", lambda *args, **kwargs: _Moments())
    ref = tmp_path / "ref.npz"
    fid.save_statistics(ref, *fid.feature_statistics(np.random.default_rng(0).normal(
        size=(20, 4))))
    data = tmp_path / "data"
    threads = torch.get_num_threads()
    try:
        train.main(["--arch", "depths=2,2", "widths=32,16", "num_heads=2", "--steps", "6",
                    "--log-every", "2", "--ckpt-every", "2", "--fid-every", "2", "--fid-ref",
                    str(ref), "--fid-images", "6", "--sample-every", "0", "--eval-images", "0",
                    "--results-dir", str(tmp_path / "runs"), "--threads", "1"])
        table5.main(["--out", str(tmp_path / "table5"), "--seeds", "0", "--samples", "4",
                     "--steps", "2", "--fid-ref", str(ref), "--threads", "1",
                     "--json", str(data / "table5.json")])
    finally:
        torch.set_num_threads(threads)
    sampler_error.main(["gaussian", "--side", "4", "--batch", "2", "--evals", "3", "4", "--rows",
                        "release", "dpm-3s", "default", "--json",
                        str(data / "sampler_error_gaussian.json")])
    capsys.readouterr()
    figures.main([str(tmp_path / "runs" / "000-DiMR-S-2R"), "--table5", str(tmp_path / "table5"),
                  "--data", str(data), "--out", str(tmp_path / "figures"), "--template",
                  str(TEMPLATE), "--page", str(tmp_path / "analyses.md"), "--threads", "1"])
    for name in FIGURES:
        assert (tmp_path / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert "wrote 8 figures" in capsys.readouterr().out
    check_page((tmp_path / "analyses.md").read_text(), data)
    analysis = json.loads((data / "analysis.json").read_text())
    assert analysis["this_call"]["command"].startswith("python -m tools.figures ")
    check_figures_against_records(data, tmp_path / "again")

    # the PCA's numbers against numpy: the adaLN-Zero row's first norm over n = 1..1000, class 0
    path = sorted((tmp_path / "table5" / "adaln-zero" / "seed0").glob(
        "*/checkpoints/ckpt_*.pt"))[-1]
    model = checkpoints.load_model(path)[0]
    n = torch.arange(1, 1001, dtype=torch.float32)
    with torch.no_grad():
        c = torch.nn.functional.silu(model.time_embed(dimr.timestep_embedding(n, 256))
                                     + model.class_embed(torch.zeros(1000, dtype=torch.long)))
        params = model.branches[0].blocks[0].norm1.modulation(c).double().numpy()
    singular = np.linalg.svd(params - params.mean(0), compute_uv=False)
    expected = [(singular[:k] ** 2).sum() / (singular ** 2).sum() for k in (1, 2, 3)]
    got = analysis["pca"]["+ adaLN-Zero"]["seed0"]["class 0"]["layers"][
        "branches.0.blocks.0.norm1"]
    assert got == pytest.approx(expected, rel=1e-6)


def check_figures_against_records(data, out):
    """Each figure drawn again from its record: what it plots is the record's numbers."""
    out.mkdir()
    t5, analysis, fid_every = (json.loads((data / f"{name}.json").read_text())
                               for name in ("table5", "analysis", "fid_every"))
    axes = figures.table5_figure(t5, out)
    rows = [r[0] for r in table5.ROWS if r[0] in t5["results"]]
    assert [b.get_height() for b in axes[0].patches] == pytest.approx(
        [t5["summary"][r]["fid"][0] for r in rows])
    for line, r in zip(axes[1].lines, rows):
        assert list(line.get_ydata()) == pytest.approx(
            [100 * run["accuracy"] for run in t5["results"][r]])
    assert "n = 1 seeds" in axes[0].get_title()

    axes = figures.pca_figure(analysis["pca"], out)
    layers = analysis["pca"]["+ adaLN-Zero"]["seed0"]["class 0"]["layers"]
    for k, ax in enumerate(axes[0]):  # the first points drawn: seed 0, class 0, trained layers
        assert list(np.asarray(ax.collections[0].get_offsets())[:, 1]) == pytest.approx(
            [1 - v[k] for v in layers.values()])

    left, _ = figures.td_figure(analysis["td"], out)
    curves = analysis["td"]["fid_every_run"]
    for line, use in zip(left.lines, curves.values()):
        assert list(line.get_ydata()) == pytest.approx(use["weight"])
    t = 2 * np.arange(0, 1001, 10) / 1000 - 1
    assert left.lines[len(curves)].get_ydata() == pytest.approx(1 / (1 + np.exp(-t)), abs=1e-6)

    ax = figures.fid_over_training(fid_every, out)
    assert [list(ax.lines[0].get_xdata()), list(ax.lines[0].get_ydata())] == [
        [s for s, _ in fid_every["fid"]], [f for _, f in fid_every["fid"]]]
