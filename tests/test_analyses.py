"""tools/analyses.py against computations by hand: TD-LN's time-use measures on a tiny parameter
and a tiny model, and the PCA and its controls against numpy's SVD on a known low-rank case."""
import numpy as np
import pytest
import torch

import dimr
from tools import analyses


def numpy_ratios(rows):
    """The explained-variance ratios of the first 1, 2, 3 components, by numpy's SVD."""
    rows = np.asarray(rows, dtype=np.float64)
    s = np.linalg.svd(rows - rows.mean(0), compute_uv=False) ** 2
    return [s[:k].sum() / s.sum() for k in (1, 2, 3)]


def test_td_measures_by_hand():
    p = analyses.TimeDependentParameter(3, 1.0)
    with torch.no_grad():
        p.p0.copy_(torch.tensor([1.0, 2.0, -1.0]))
        p.p1.copy_(torch.tensor([1.0, 1.0, 1.0]))
        p.w.copy_(torch.tensor([0.0, 1.0, -0.5]))
        p.b.copy_(torch.tensor([0.0, 2.0, 0.3]))
    p0, p1, w, b = (np.array(v, dtype=np.float64) for v in ([1, 2, -1], [1, 1, 1],
                                                              [0, 1, -0.5], [0, 2, 0.3]))
    gap = np.abs(p0 - p1).mean() / ((np.abs(p0) + np.abs(p1)) / 2).mean()   # 1 / (7/6)
    t = 2 * np.arange(1001) / 1000 - 1
    value = p1 + (p0 - p1) / (1 + np.exp(-((1 + w) * t[:, None] + b)))    # (1001, 3)
    spread = (value.max(0) - value.min(0)).mean() / np.abs(value).mean()

    use = analyses.td_time_use(torch.nn.ModuleDict({"branches": torch.nn.ModuleList([
        torch.nn.ModuleDict({"gamma": p})])}))["branches.0.gamma"]  # w, b != 0: trained
    assert gap == pytest.approx(6 / 7)
    assert use["gap"] == pytest.approx(gap, rel=1e-6)
    assert use["range"] == pytest.approx(spread, rel=1e-5)
    weight = (1 / (1 + np.exp(-((1 + w) * t[:, None] + b)))).mean(1)     # mean over channels
    assert use["weight"] == pytest.approx(list(weight[::10]), abs=1e-6)      # n = 0, 10, ..
    assert use["weight_change"] == pytest.approx(
        np.abs(weight - 1 / (1 + np.exp(-t))).max(), abs=1e-6)


def test_td_measures_of_an_untrained_model_are_zero_or_undefined():
    config = dimr.DiMRConfig(8, 1, 10, 2, (2, 2), (32, 16), 2)
    model = dimr.DiMR(config)
    assert analyses.td_time_use(model) == {}  # no parameter was reached by a loss term yet
    use = analyses.td_time_use(model, trained=False)
    gains = [u for name, u in use.items() if name.endswith("gamma")]
    shifts = [u for name, u in use.items() if name.endswith("beta")]
    assert gains and all(u["gap"] == 0 and u["range"] == 0 for u in gains)
    assert shifts and all(u["gap"] is None and u["range"] is None for u in shifts)  # 0 / 0
    groups = analyses.by_branch(use, "gap")
    assert sorted(groups) == ["branch 1, beta", "branch 1, gamma", "branch 2, beta",
                              "branch 2, gamma"]


def test_explained_variance_and_the_random_readout_against_numpy():
    rng = np.random.default_rng(0)
    n = np.arange(1, 1001) / 1000
    plane = np.stack([np.sin(3 * n), n ** 2], 1) @ rng.normal(size=(2, 12))     # rank 2
    c = torch.from_numpy(plane + 1e-3 * rng.normal(size=plane.shape)).float()
    got = analyses.explained_variance(c)
    assert got == pytest.approx(numpy_ratios(c.numpy()), abs=1e-6)
    assert got[1] > 0.999                       # the known rank: 2 components carry it all

    readout = analyses.random_linear(12, 20, draw=3)
    weight = readout.weight.detach().numpy()
    assert np.abs(weight).max() <= 1 / np.sqrt(12)   # nn.Linear's default: U(-1/sqrt(in), ..)
    rows = c.numpy() @ weight.T + readout.bias.detach().numpy()
    assert analyses.explained_variance(readout(c).detach()) == pytest.approx(
        numpy_ratios(rows), abs=1e-6)
    assert analyses.random_linear(12, 20, draw=3).weight.equal(readout.weight)  # a fixed draw


def test_the_untrained_control_has_random_modulation_and_adaln_zero_none():
    config = dimr.DiMRConfig(8, 1, 10, 2, (2, 2), (32, 16), 2, norm="adaln_zero")
    assert analyses.adaln_layers(dimr.DiMR(config)) == {}     # zero init: nothing to analyse
    model = analyses.untrained(config, draw=0)
    layers = analyses.adaln_layers(model)
    assert len(layers) == sum(isinstance(m, dimr.AdaLN) for m in model.modules())
    pca = analyses.adaln_pca(model, 0, [analyses.untrained(config, d) for d in (1, 2)])
    c = analyses.condition(model, 0)
    name, layer = next(iter(layers.items()))
    with torch.no_grad():
        expected = numpy_ratios(layer.modulation(c).numpy())
    assert pca["layers"][name] == pytest.approx(expected, abs=1e-6)
    assert pca["c(t)"] == pytest.approx(numpy_ratios(c.numpy()), abs=1e-6)
