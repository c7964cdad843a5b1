"""The numbers behind docs/analyses.md's sections 1 and 2, from trained models (tools/figures.py
draws them and writes them to docs/data/analysis.json):

- adaLN-Zero's PCA, the paper's argument for TD-LN, with its controls: per adaLN layer, the share
  of the variance of its (shift, scale) over n = 1..1000 in the first 1, 2, 3 principal
  components; beside it the same for the layers' common input c(t), for c(t) read out through
  random weights (nn.Linear's default initialisation) and for an untrained network whose
  modulation weights are random (adaLN-Zero starts them at zero: its untrained PCA is undefined);
- TD-LN's time use: how far each time-dependent parameter's two vectors p0, p1 lie apart, and how
  much its value moves over n, each relative to the parameter's size.
"""
import re

import torch
import torch.nn as nn

import dimr
from diffusion import NUM_TIMESTEPS
from td_ln import TimeDependentParameter, t_tilde

PCA_COMPONENTS = (1, 2, 3)
DRAWS = 5  # random readouts per trained model, and untrained networks per row
CURVE_EVERY = 10  # the weight curves are kept at n = 0, 10, ..., 1000 (the figure's points)


def explained_variance(rows):
    """The share of the variance of rows (T, D) (over time) in their first k principal components,
    for k in PCA_COMPONENTS. The variances along the components are the eigenvalues of the
    D x D scatter matrix (the squared singular values of the centred rows, at a fraction of an
    SVD's cost for T = 1000 >> D)."""
    x = rows.double() - rows.double().mean(0)
    var = torch.linalg.eigvalsh(x.T @ x).flip(0).clamp(min=0)  # descending
    return [float(var[:k].sum() / var.sum()) for k in PCA_COMPONENTS]


def steps():
    """n = 1..1000, the PCA's time points."""
    return torch.arange(1, NUM_TIMESTEPS + 1, dtype=torch.float32)


@torch.no_grad()
def condition(model, class_id):
    """c(t) (1000, D_1): what every adaLN layer of model reads, at class_id, for n = 1..1000."""
    return model.condition(steps(), torch.full((NUM_TIMESTEPS,), class_id))[0]


def adaln_layers(model):
    """{name: AdaLN} of the layers whose modulation was trained away from its zero start (the
    4x4 branch's output head is not, where no loss term reaches it)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, dimr.AdaLN) and m.modulation.weight.abs().max() > 0}


def random_linear(in_dim, out_dim, draw):
    """nn.Linear(in_dim, out_dim) as PyTorch initialises it, draw number `draw`."""
    with torch.random.fork_rng():
        torch.manual_seed(draw)
        return nn.Linear(in_dim, out_dim)


def untrained(config, draw):
    """An untrained network of config (the project's initialisation) whose adaLN modulation
    weights are drawn as nn.Linear's default initialisation instead of adaLN-Zero's zeros."""
    with torch.random.fork_rng():
        torch.manual_seed(draw)
        model = dimr.DiMR(config)
        for m in model.modules():
            if isinstance(m, dimr.AdaLN):
                m.modulation.reset_parameters()
    return model.eval()


def mean_over_draws(values):
    return [sum(v[k] for v in values) / len(values) for k in range(len(PCA_COMPONENTS))]


@torch.no_grad()
def adaln_pca(model, class_id, untrained_models):
    """The PCA's series for one trained model at class_id, each a list over PCA_COMPONENTS:
    layers / random readout / untrained: {layer: ratios} (the controls averaged over DRAWS);
    c(t), untrained c(t): ratios of the common input itself."""
    c, layers = condition(model, class_id), adaln_layers(model)
    readout = {name: mean_over_draws([explained_variance(random_linear(
        c.shape[1], m.modulation.out_features, DRAWS * i + draw)(c)) for draw in range(DRAWS)])
        for i, (name, m) in enumerate(layers.items())}  # draws of their own for every layer
    c0 = [condition(u, class_id) for u in untrained_models]
    random_modulation = {name: mean_over_draws([explained_variance(
        u.get_submodule(name).modulation(c)) for u, c in zip(untrained_models, c0)])
        for name in layers}
    return {"layers": {name: explained_variance(m.modulation(c)) for name, m in layers.items()},
            "random readout of c(t)": readout,
            "untrained, random modulation": random_modulation,
            "c(t)": explained_variance(c),
            "untrained c(t)": mean_over_draws([explained_variance(c) for c in c0])}


# ----------------------------------------------------------------------------------------------
# TD-LN's time use

def ratio(a, b):
    """a / b, None for 0 / 0 (a shift that starts at zero has no size to measure against)."""
    return float(a / b) if b > 0 else None


def relative_range(values):
    """values (T, C) of one parameter over time -> mean_c (max_t - min_t) / mean_{c,t} |value|:
    how far the parameter moves over time, relative to its size."""
    return ratio((values.amax(0) - values.amin(0)).mean(), values.abs().mean())


def relative_gap(p0, p1):
    """mean_c |p0 - p1| / mean_c (|p0| + |p1|) / 2: how far apart a TD parameter's two vectors
    lie, relative to their size. 0 at initialisation (p0 = p1) for a gain, 0 / 0 for a shift."""
    return ratio((p0 - p1).abs().mean(), ((p0.abs() + p1.abs()) / 2).mean())


def branch_of(name):
    """'branches.0.blocks.1.norm1.gamma' -> 0 (0: the Transformer branch; its cascade into
    branch 1 belongs to branch 1)."""
    return int(re.match(r"branches\.(\d+)\.", name).group(1))


@torch.no_grad()
def td_time_use(model, trained=True):
    """Per TD parameter of model: its relative gap |p0 - p1|, the relative range of its value over
    n = 0..1000, its interpolation weight sigmoid((1 + w) t~ + b) over n, the mean over its
    channels (the figure's curves), and how far that curve lies from its initial one, sigmoid(t~)
    (the largest difference over n). trained: leave out the parameters that no loss term reached
    (w and b still exactly zero, as they start and as weight decay leaves them: the 4x4 branch's
    output head without the multi-scale loss)."""
    n = torch.arange(0, NUM_TIMESTEPS + 1, dtype=torch.float32)
    use = {}
    for name, m in model.named_modules():
        if isinstance(m, TimeDependentParameter) and (m.w.any() or m.b.any() or not trained):
            weight = torch.sigmoid((1 + m.w) * t_tilde(n)[:, None] + m.b).mean(1)
            use[name] = {"gap": relative_gap(m.p0, m.p1), "range": relative_range(m(t_tilde(n))),
                         "weight_change": float((weight - torch.sigmoid(t_tilde(n))).abs().max()),
                         "weight": weight[::CURVE_EVERY].tolist()}
    return use


@torch.no_grad()
def adaln_time_use(model, class_id):
    """The same relative range for adaLN-Zero's gain 1 + scale(c(t)) and shift, per layer, at
    class_id and n = 1..1000: TD-LN's measure on the norm it replaces."""
    c, use = condition(model, class_id), {}
    for name, m in adaln_layers(model).items():
        shift, scale = m.modulation(c).chunk(2, dim=-1)
        use[f"{name}.gamma"] = {"range": relative_range(1 + scale)}
        use[f"{name}.beta"] = {"range": relative_range(shift)}
    return use


def by_branch(use, key):
    """{"branch r, gamma": [values of key over that branch's parameters], ...}."""
    groups = {}
    for name, u in use.items():
        if key in u:
            groups.setdefault(f"branch {branch_of(name) + 1}, {name.rsplit('.', 1)[1]}",
                              []).append(u[key])
    return groups
