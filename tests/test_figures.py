"""tools/figures.py on a tiny run: a few training steps with FID during training, Table 5's first
three rows for a few steps, a small sampler table; every figure file is written, and the numbers
behind the PCA are those of an independent computation (numpy's SVD of the layer's parameters)."""
import json

import numpy as np
import pytest
import torch

import dimr
import fid
import train
from support import checkpoints
from tools import figures, sampler_error, table5

FIGURES = ("branch_predictions.png", "branch_losses.png", "fid_over_training.png",
           "sampler_error.png", "adaln_pca.png", "tdln_weights.png", "table5.png")


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
    threads = torch.get_num_threads()
    try:
        train.main(["--arch", "depths=2,2", "widths=32,16", "num_heads=2", "--steps", "6",
                    "--log-every", "2", "--ckpt-every", "2", "--fid-every", "2", "--fid-ref",
                    str(ref), "--fid-images", "6", "--sample-every", "0", "--eval-images", "0",
                    "--results-dir", str(tmp_path / "runs"), "--threads", "1"])
        table5.main(["--out", str(tmp_path / "table5"), "--seeds", "0", "--samples", "4",
                     "--steps", "2", "--rows", "4", "--fid-ref", str(ref), "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    data = tmp_path / "data"
    sampler_error.main(["gaussian", "--side", "4", "--batch", "2", "--evals", "3", "4", "--rows",
                        "release", "dpm-3s", "default", "--json",
                        str(data / "sampler_error_gaussian.json")])
    capsys.readouterr()
    figures.main([str(tmp_path / "runs" / "000-DiMR-S-2R"), "--table5", str(tmp_path / "table5"),
                  "--data", str(data), "--out", str(tmp_path / "figures")])
    for name in FIGURES:
        assert (tmp_path / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert "adaLN-Zero PCA, + adaLN-Zero, class 0: explained variance" in capsys.readouterr().out

    # the PCA's numbers against numpy: the adaLN-Zero row's first norm over n = 1..1000, class 0
    analysis = json.loads((data / "analysis.json").read_text())
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
    got = analysis["pca"]["+ adaLN-Zero"]["class 0"]["branches.0.blocks.0.norm1"]
    assert got == pytest.approx(expected, rel=1e-9)
