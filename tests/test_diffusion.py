"""Tests for diffusion.py, each against a closed form or a hand-written reference.

The schedule is recomputed here in numpy from its definition (betas, alpha_bar, log alpha
piecewise linear in t = n / 1000), independently of diffusion.py. The sampler tests use Gaussian
data x0 ~ N(mu, diag(s^2)), for which the optimal noise predictor and the exact solution of the
probability-flow ODE are known in closed form, and fixtures of the outputs of the release's sampler
and of the official UniPC, made by running their own code.
"""
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import diffusion
from support import checkpoints
from release_reference import release_state_dict

# -- the schedule from its definition (numpy, float64) -----------------------------------------
BETAS = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
ALPHA_BAR = np.cumprod(1.0 - BETAS)  # alpha_bar_n at index n - 1
T_GRID = np.arange(1, 1001) / 1000.0  # t_n = n / 1000
LOG_ALPHA = 0.5 * np.log(ALPHA_BAR)


def alpha(t):
    return np.exp(np.interp(t, T_GRID, LOG_ALPHA))


def sigma(t):
    return np.sqrt(1.0 - alpha(t) ** 2)


def lam(t):
    return np.log(alpha(t) / sigma(t))


def t_of_lambda(lmb):
    """Invert lambda_t: log alpha = -log(1 + e^{-2 lambda}) / 2, then read t off the table."""
    log_alpha = -0.5 * np.log1p(np.exp(-2.0 * np.asarray(lmb)))
    return np.interp(log_alpha, LOG_ALPHA[::-1], T_GRID[::-1])


# -- Gaussian data -----------------------------------------------------------------------------
S = np.array([0.5, 2.0] * 4)  # per-dimension data standard deviation
MU = np.array([0.3, -0.7, 1.1, 0.0, -0.2, 0.9, -1.3, 0.5])


def optimal_eps_fn(mu, s):
    """Optimal noise predictor sigma_t (x - alpha_t mu) / (alpha_t^2 s^2 + sigma_t^2),
    t = n / 1000."""
    def eps_fn(x, n):
        t = n.numpy() / 1000.0
        a, sg = alpha(t)[:, None], sigma(t)[:, None]
        return torch.from_numpy(sg * (x.numpy() - a * mu) / (a ** 2 * s ** 2 + sg ** 2))
    return eps_fn


gaussian_eps = optimal_eps_fn(MU, S)


def x_T_samples(batch=64, seed=0, mu=MU, s=S):
    """Samples of x at t = 1: N(alpha_1 mu, alpha_1^2 s^2 + sigma_1^2)."""
    rng = np.random.default_rng(seed)
    a, sg = alpha(1.0), sigma(1.0)
    return torch.from_numpy(a * mu + np.sqrt(a ** 2 * s ** 2 + sg ** 2)
                            * rng.standard_normal((batch, len(s))))


def exact_solution(x_T, mu=MU, s=S):
    """The PF-ODE keeps z = (x_t - alpha_t mu) / sqrt(alpha_t^2 s^2 + sigma_t^2): map
    t = 1 -> 1/1000."""
    def scale(t):
        return np.sqrt(alpha(t) ** 2 * s ** 2 + sigma(t) ** 2)
    z = (x_T.numpy() - alpha(1.0) * mu) / scale(1.0)
    return alpha(0.001) * mu + z * scale(0.001)


def solver_error(steps, x_T=None, **solver):
    x_T = x_T_samples() if x_T is None else x_T
    x = diffusion.ode_sample(gaussian_eps, x_T, steps, **solver)
    return float(np.sqrt(np.mean((x.numpy() - exact_solution(x_T)) ** 2)))


# -- schedule ----------------------------------------------------------------------------------

def test_constants_and_tables():
    assert (diffusion.NUM_TIMESTEPS, diffusion.BETA_START, diffusion.BETA_END) \
        == (1000, 0.00085, 0.012)
    schedule = diffusion.DiscreteSchedule()
    assert schedule.betas.dtype == schedule.alphas_cumprod.dtype == torch.float64
    np.testing.assert_allclose(schedule.betas.numpy(), BETAS, rtol=1e-12)
    np.testing.assert_allclose(schedule.alphas_cumprod.numpy(), ALPHA_BAR, rtol=1e-12)
    # alpha_bar_n = prod_{i <= n} (1 - beta_i), written out for n = 3
    b = [(0.00085 ** 0.5 + i * (0.012 ** 0.5 - 0.00085 ** 0.5) / 999) ** 2 for i in range(3)]
    assert float(schedule.alphas_cumprod[2]) == pytest.approx((1 - b[0]) * (1 - b[1]) * (1 - b[2]),
                                                        rel=1e-12)


def test_q_sample():
    schedule = diffusion.DiscreteSchedule()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    n = torch.tensor([1, 500, 1000])
    expected = np.sqrt(ALPHA_BAR[n - 1])[:, None, None, None] * x0.numpy() \
        + np.sqrt(1 - ALPHA_BAR[n - 1])[:, None, None, None] * eps.numpy()
    np.testing.assert_allclose(schedule.q_sample(x0, n, eps).numpy(), expected, rtol=1e-5,
                               atol=1e-6)
    # float64 data after a float32 call: the coefficient tables are kept per dtype, not rounded
    # to float32
    out64 = schedule.q_sample(x0.double(), n, eps.double())
    assert out64.dtype == torch.float64
    np.testing.assert_allclose(out64.numpy(), expected, rtol=1e-12, atol=1e-14)


def test_continuous_time_view():
    schedule = diffusion.DiscreteSchedule()
    n = np.array([1, 2, 37, 500, 999, 1000])
    np.testing.assert_allclose(schedule.alpha_t(torch.from_numpy(n / 1000)).numpy(),
                               np.sqrt(ALPHA_BAR[n - 1]), rtol=1e-12)
    # halfway between t_n and t_{n+1}, log alpha is the mean of the two ends
    mid = (n[:-1] + 0.5) / 1000
    expected = np.exp(0.5 * (LOG_ALPHA[n[:-1] - 1] + LOG_ALPHA[n[:-1]]))
    np.testing.assert_allclose(schedule.alpha_t(torch.from_numpy(mid)).numpy(), expected,
                               rtol=1e-12)
    t = np.random.default_rng(0).uniform(0.001, 1.0, 100)
    tt = torch.from_numpy(t)
    np.testing.assert_allclose(schedule.sigma_t(tt).numpy(), sigma(t), rtol=1e-10)
    np.testing.assert_allclose(schedule.lambda_t(tt).numpy(), lam(t), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(schedule.inverse_lambda(torch.from_numpy(lam(t))).numpy(), t,
                               rtol=1e-9)


# -- multi-scale loss --------------------------------------------------------------------------

def test_multiscale_targets_keep_unit_variance():
    eps = torch.randn(64, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    targets = diffusion.multiscale_targets(eps, [8, 16, 32])
    assert [tuple(y.shape) for y in targets] == [(64, 4, 8, 8), (64, 4, 16, 16), (64, 4, 32, 32)]
    for y in targets:  # at least 16384 values each: standard error of the variance < 0.011
        assert abs(y.var().item() - 1.0) < 0.05
    # sum-pool over 4 x 4, divided by 4
    assert targets[0][1, 2, 3, 5].item() \
        == pytest.approx(eps[1, 2, 12:16, 20:24].sum().item() / 4, rel=1e-5)
    assert torch.equal(targets[2], eps)


def test_multiscale_loss_by_hand():
    eps = torch.arange(16, dtype=torch.float64).reshape(1, 1, 4, 4) / 10  # [[0, .1, .2, .3], ...]
    low = torch.tensor([[[[0.1, -0.2], [0.3, 0.4]]]], dtype=torch.float64)
    full = torch.full((1, 1, 4, 4), 0.5, dtype=torch.float64)
    # low-resolution target: each 2 x 2 block summed, divided by 2
    e = eps[0, 0].tolist()
    blocks = [[(e[2 * i][2 * j] + e[2 * i][2 * j + 1] + e[2 * i + 1][2 * j]
                + e[2 * i + 1][2 * j + 1]) / 2
               for j in range(2)] for i in range(2)]
    p = low[0, 0].tolist()
    term_low = sum((p[i][j] - blocks[i][j]) ** 2 for i in range(2) for j in range(2)) / 4
    term_full = sum((0.5 - e[i][j]) ** 2 for i in range(4) for j in range(4)) / 16
    total, terms = diffusion.multiscale_loss([low, full], eps)
    assert [t.item() for t in terms] == pytest.approx([term_low, term_full], rel=1e-12)
    assert total.item() == pytest.approx(term_low / 4 + term_full, rel=1e-12)
    total, _ = diffusion.multiscale_loss([low, full], eps, weights=[2.0, 3.0])
    assert total.item() == pytest.approx(2 * term_low + 3 * term_full, rel=1e-12)
    with pytest.raises(ValueError, match="weights"):
        diffusion.multiscale_loss([low, full], eps, weights=[1.0])


def test_loss_weights_are_the_papers():
    assert diffusion.loss_weights(1) == [1.0]
    assert diffusion.loss_weights(2) == [0.25, 1.0]
    assert diffusion.loss_weights(3) == [1 / 16, 0.25, 1.0]
    assert diffusion.loss_weights(3, multiscale=False) == [0.0, 0.0, 1.0]


# -- classifier-free guidance ------------------------------------------------------------------

class ToyModel:
    """Per-branch outputs [low, full]; full = x * (y + 1) + n / 1000; records the batch sizes."""
    NULL = 10

    def __init__(self):
        self.batches = []

    def __call__(self, x, n, y):
        self.batches.append(x.shape[0])
        full = x * (y + 1.0).view(-1, 1, 1, 1) + (n / 1000).view(-1, 1, 1, 1)
        return [full[..., ::2, ::2], full]


def toy_inputs():
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return x, torch.tensor([2, 0, 7])


def test_guidance_scale_zero_is_conditional_with_one_forward():
    model, (x, y) = ToyModel(), toy_inputs()
    n = torch.tensor([1000.0, 500.0, 3.0], dtype=torch.float64)
    out = diffusion.guided_eps_fn(model, y, 0.0, ToyModel.NULL)(x, n)
    torch.testing.assert_close(
        out, x * torch.tensor([3.0, 1.0, 8.0], dtype=torch.float64).view(-1, 1, 1, 1)
        + (n / 1000).view(-1, 1, 1, 1))
    assert model.batches == [3]


def test_guidance_release_convention():
    model, (x, y) = ToyModel(), toy_inputs()
    n = torch.tensor([1000.0, 500.0, 3.0], dtype=torch.float64)
    out = diffusion.guided_eps_fn(model, y, 0.4, ToyModel.NULL)(x, n)
    eps_c = x * torch.tensor([3.0, 1.0, 8.0], dtype=torch.float64).view(-1, 1, 1, 1) \
        + (n / 1000).view(-1, 1, 1, 1)
    eps_u = x * 11.0 + (n / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(out, eps_c + 0.4 * (eps_c - eps_u))
    torch.testing.assert_close(out, eps_u + 1.4 * (eps_c - eps_u))  # the usual w = 1 + s
    assert model.batches == [6]  # one batched forward for both halves


def test_guidance_combines_low_precision_outputs_in_float32():
    """Under bf16 autocast the network returns bf16; eps_c + s (eps_c - eps_u) is formed in float32
    from those bf16 values (in bf16, the difference and the sum would each round to 8 bits)."""
    g = torch.Generator().manual_seed(0)
    eps_c, eps_u = (1 + 0.01 * torch.randn(2, 3, 4, 4, generator=g)).bfloat16().chunk(2)

    def model(x, n, y):
        return [torch.cat([eps_c, eps_u])]

    out = diffusion.guided_eps_fn(model, torch.tensor([0]), 0.4, 5)(torch.zeros(1, 3, 4, 4),
                                                                    torch.tensor([500.0]))
    expected = eps_c.float() + 0.4 * (eps_c.float() - eps_u.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-7)
    assert (expected.bfloat16().float() != expected).any()  # bf16 could not have held the result


def test_power_cosine_schedule_endpoints():
    model, (x, y) = ToyModel(), toy_inputs()
    eps_c = x * torch.tensor([3.0, 1.0, 8.0], dtype=torch.float64).view(-1, 1, 1, 1)
    eps_u = x * 11.0
    fn = diffusion.guided_eps_fn(model, y, 2.0, ToyModel.NULL, decay_power=1.0)
    # n = 1000: w = 1 (conditional only); n = 0: w = 1 + s = 3; n = 500, pow 1: w = 1 + s/2 = 2
    n = torch.tensor([1000.0, 0.0, 500.0], dtype=torch.float64)
    w = torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64).view(-1, 1, 1, 1)
    torch.testing.assert_close(fn(x, n), eps_u + w * (eps_c - eps_u) + (n / 1000).view(-1, 1, 1, 1))
    # pow 2 at n = 500: w = 1 + 2 (1 - cos(pi / 4)) / 2
    fn = diffusion.guided_eps_fn(model, y, 2.0, ToyModel.NULL, decay_power=2.0)
    n = torch.full((3,), 500.0, dtype=torch.float64)
    w = 1 + (1 - math.cos(math.pi / 4))
    torch.testing.assert_close(fn(x, n), eps_u + w * (eps_c - eps_u) + 0.5)


def test_guidance_rejects_bad_settings():
    with pytest.raises(ValueError, match="guidance s must be finite"):
        diffusion.guided_eps_fn(ToyModel(), toy_inputs()[1], -1.0, ToyModel.NULL)
    with pytest.raises(ValueError, match="decay_power"):
        diffusion.guided_eps_fn(ToyModel(), toy_inputs()[1], 1.0, ToyModel.NULL, decay_power=0.0)


# -- DPM-Solver --------------------------------------------------------------------------------

def grid(skip, num):
    """The step boundaries from their definitions, t = 1 -> 1/1000."""
    if skip == "time_uniform":
        return np.linspace(1.0, 0.001, num + 1)
    if skip == "time_quadratic":
        return np.linspace(1.0, 0.001 ** 0.5, num + 1) ** 2
    return t_of_lambda(np.linspace(lam(1.0), lam(0.001), num + 1))


@pytest.mark.parametrize("skip", ["time_uniform", "time_quadratic", "logSNR"])
def test_order_one_is_ddim_step_by_step(skip):
    """DDIM: x_{i+1} = alpha_{i+1} x0_i + sigma_{i+1} eps_i with
    x0_i = (x_i - sigma_i eps_i) / alpha_i."""
    def eps_fn(x, n):  # any smooth nonlinear predictor
        return torch.tanh(x) * (n / 1000).view(-1, 1) + 0.1 * x

    seen = []

    def recording_eps_fn(x, n):
        seen.append((x.clone(), n.clone()))
        return eps_fn(x, n)

    x_T = x_T_samples(batch=4)
    out = diffusion.ode_sample(recording_eps_fn, x_T, 7, order=1, method="singlestep",
                                spacing=skip)
    ts, x = grid(skip, 7), x_T
    assert len(seen) == 7
    for i in range(7):
        np.testing.assert_allclose(seen[i][1].numpy(), 1000 * ts[i], rtol=1e-10)
        torch.testing.assert_close(seen[i][0], x, rtol=1e-10, atol=1e-12)
        eps = eps_fn(x, torch.full((4,), 1000 * ts[i], dtype=torch.float64))
        x0 = (x - sigma(ts[i]) * eps) / alpha(ts[i])
        x = alpha(ts[i + 1]) * x0 + sigma(ts[i + 1]) * eps
    torch.testing.assert_close(out, x, rtol=1e-10, atol=1e-12)


def release_grid(steps):
    """The release's 'fast' sampler as its dpm_solver.py computes it (not as its docstring says):
    a time-uniform grid of `steps` intervals; segments of DPM-Solver-fast's orders, a segment of
    order k running from grid point i to i + k and evaluating at grid points i .. i + k - 1.
    Returns [(i, k)] per segment and the grid."""
    K = steps // 3 + 1
    orders = {0: [3] * (K - 2) + [2, 1], 1: [3] * (K - 1) + [1], 2: [3] * (K - 1) + [2]}[steps % 3]
    starts = np.cumsum([0] + orders[:-1])
    return list(zip(starts, orders)), np.linspace(1.0, 0.001, steps + 1)


def release_reference(eps_fn, x, steps):
    """The release's DPM_Solver.sample(method='fast', predict_x0=True, solver_type='dpm_solver')
    restated on release_grid, with r1, r2 the logSNR fractions of the inner grid points."""
    segments, ts = release_grid(steps)

    def x0_of(x, t):
        return (x - sigma(t) * eps_fn(x, torch.full((x.shape[0],), 1000 * t,
                                                    dtype=torch.float64))) / alpha(t)

    def ddim(x, s, t, x0):  # (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) x0
        return sigma(t) / sigma(s) * x - alpha(t) * np.expm1(lam(s) - lam(t)) * x0

    for i, k in segments:
        s, t = ts[i], ts[i + k]
        h = lam(t) - lam(s)
        m0 = x0_of(x, s)
        if k == 1:
            x = ddim(x, s, t, m0)
            continue
        s1 = ts[i + 1]
        r1 = (lam(s1) - lam(s)) / h
        m1 = x0_of(ddim(x, s, s1, m0), s1)
        if k == 2:  # x_t = ddim(m0) - 0.5 / r1 alpha_t phi_1 (m1 - m0)
            x = ddim(x, s, t, m0) - 0.5 / r1 * alpha(t) * np.expm1(-h) * (m1 - m0)
        else:
            s2 = ts[i + 2]
            r2 = (lam(s2) - lam(s)) / h
            phi_22 = np.expm1(-r2 * h) / (r2 * h) + 1
            m2 = x0_of(ddim(x, s, s2, m0) + r2 / r1 * alpha(s2) * phi_22 * (m1 - m0), s2)
            phi_2 = np.expm1(-h) / h + 1
            x = ddim(x, s, t, m0) + alpha(t) * phi_2 / r2 * (m2 - m0)
    return x


@pytest.mark.parametrize("steps", [9, 10, 11, 50])
def test_release_sampler_evaluates_on_the_release_grid(steps):
    """RELEASE_SAMPLER evaluates the model at n = 1000 t for exactly the release's grid points,
    and its result equals the restatement above."""
    def eps_fn(x, n):
        return torch.sin(x) * (n / 1000).view(-1, 1) + 0.2 * x

    seen = []
    x_T = x_T_samples(batch=4)
    out = diffusion.ode_sample(lambda x, n: seen.append(n[0].item()) or eps_fn(x, n), x_T,
                                      steps, **diffusion.RELEASE_SAMPLER)
    segments, ts = release_grid(steps)
    expected = [1000 * ts[i + j] for i, k in segments for j in range(k)]
    np.testing.assert_allclose(seen, expected, rtol=1e-12)
    torch.testing.assert_close(out, release_reference(eps_fn, x_T, steps), rtol=1e-9, atol=1e-10)


# tests/data/release_sampler.npz holds outputs of the release's own code (qihao067/DiMR at
# fa141ae, run outside this project with einops and a one-line timm stub for trunc_normal_):
# - gauss_N: its dpm_solver.py, DPM_Solver(model_fn, NoiseScheduleVP('discrete',
#   betas=<stable_diffusion_beta_schedule() as float32>), predict_x0=True).sample(gauss_x_T,
#   steps=N, eps=1/1000, T=1.), with model_fn(x, t) = gaussian_eps(x, 1000 t) of this file and
#   gauss_x_T = x_T_samples(batch=4);
# - path_const_N, path_decay_N: eval.py's sampling path (its cfg_nnet with two forward passes,
#   its model_fn with log_snr = (1000 t / 1000) * 8 - 4, the same DPM_Solver call) on its MRModel
#   holding release_reference.release_state_dict(4, 5, 2, 4, (5, 5), (32, 16), torch.float32,
#   generator=torch.Generator().manual_seed(1)) (16 heads -> 2 here), from path_z with labels
#   path_y; const: cfg_scale 0.4, cfg_scale_pow -1; decay: cfg_scale 3.0 (w), cfg_scale_pow 2.
# The release keeps its schedule in float32; its own float32-vs-float64 difference on gauss_N is
# below 1e-5, hence the tolerances.
RELEASE_OUTPUTS = np.load(Path(__file__).parent / "data" / "release_sampler.npz")


@pytest.mark.parametrize("steps", [10, 11, 12, 20, 50, 100, 250])
def test_release_sampler_equals_the_releases_code_on_a_gaussian(steps):
    x_T = torch.from_numpy(RELEASE_OUTPUTS["gauss_x_T"])
    out = diffusion.ode_sample(gaussian_eps, x_T, steps, **diffusion.RELEASE_SAMPLER)
    np.testing.assert_allclose(out.numpy(), RELEASE_OUTPUTS[f"gauss_{steps}"], rtol=0, atol=3e-5)


@pytest.mark.parametrize("steps", [10, 12, 20])
@pytest.mark.parametrize("guidance", ["const", "decay"])
def test_release_sampling_path_equals_the_releases_eval(steps, guidance):
    """ode_sample(guided_eps_fn(from_official(sd), ...), **RELEASE_SAMPLER) is the release's
    eval.py sampling: constant s = 0.4, or its decayed w = 3 (our s = w - 1 = 2) with power 2."""
    sd = release_state_dict(4, 5, 2, 4, (5, 5), (32, 16), torch.float32,
                            generator=torch.Generator().manual_seed(1))
    model = checkpoints.from_official(sd, num_heads=2).eval()
    z, y = torch.from_numpy(RELEASE_OUTPUTS["path_z"]), torch.from_numpy(RELEASE_OUTPUTS["path_y"])
    s, power = (0.4, None) if guidance == "const" else (2.0, 2.0)
    with torch.no_grad():
        out = diffusion.ode_sample(diffusion.guided_eps_fn(model, y, s, 5, power), z, steps,
                                          **diffusion.RELEASE_SAMPLER)
    expected = RELEASE_OUTPUTS[f"path_{guidance}_{steps}"]
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-5 * np.abs(expected).max())


# -- UniPC -------------------------------------------------------------------------------------

# tests/data/unipc_official.npz holds outputs of the official UniPC code (wl-zhao/UniPC, uni_pc.py
# at 25acd34), run outside this project in float64 (torch.set_default_dtype(torch.float64)) as
#   ns = NoiseScheduleVP('discrete', betas=BETAS of this file, dtype=torch.float64)
#   UniPC(model_wrapper(model, ns, model_type='noise', ...), ns, algorithm_type='data_prediction',
#         variant=V).sample(x, steps=N, order=P, skip_type=SKIP, method='multistep',
#                           lower_order_final=L)
# Its model gets t_input = 1000 (t - 1/1000); it called ours at n = t_input + 1 = 1000 t.
# - gauss_N_P_V_{lof: L = True | full: L = False}_SKIP: model = gaussian_eps of this file (x
#   reshaped to (4, 8, 1, 1): its sums are written for 4-D tensors), from gauss_x_T =
#   x_T_samples(batch=4);
# - net_N_P_V_{lof|full} (SKIP = logSNR): guidance_type='classifier-free', guidance_scale 1.4 (its
#   w = 1 + s for our s = 0.4), condition net_y, unconditional_condition 5, and
#   model(x, t_input, c) = net(x, t_input + 1, c)[-1] with net = unipc_net() below, from net_z.
UNIPC_OUTPUTS = np.load(Path(__file__).parent / "data" / "unipc_official.npz")


def unipc_cases(prefix):
    """(key, steps, order, bh, lower_order_final, skip) of the fixture's outputs."""
    for key in UNIPC_OUTPUTS.files:
        if key.startswith(prefix) and key[len(prefix)].isdigit():
            steps, order, bh, final, *skip = key[len(prefix):].split("_", 4)
            skip = skip[0] if skip else "logSNR"
            yield key, int(steps), int(order), bh, final == "lof", skip


def unipc_net():
    sd = release_state_dict(4, 5, 2, 4, (5, 5), (32, 16), torch.float32,
                            generator=torch.Generator().manual_seed(1))
    return checkpoints.from_official(sd, num_heads=2).eval().double()


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("bh", diffusion.B_H)
def test_unipc_equals_the_official_code_on_a_gaussian(order, bh):
    x_T = torch.from_numpy(UNIPC_OUTPUTS["gauss_x_T"])
    cases = [c for c in unipc_cases("gauss_") if c[2:4] == (order, bh)]
    assert len(cases) >= 8  # steps 3 (not order 3), 5, 6, 10, 20; lower_order_final or not
    for key, steps, _, _, final, skip in cases:
        out = diffusion.ode_sample(gaussian_eps, x_T, steps, order=order, method="unipc",
                                          spacing=skip, bh=bh, lower_order_final=final)
        np.testing.assert_allclose(out.numpy(), UNIPC_OUTPUTS[key], rtol=1e-12, atol=1e-13,
                                   err_msg=key)


@pytest.mark.parametrize("case", list(unipc_cases("net_")), ids=lambda c: c[0])
def test_unipc_equals_the_official_code_on_a_dimr(case):
    key, steps, order, bh, final, skip = case
    z, y = torch.from_numpy(UNIPC_OUTPUTS["net_z"]), torch.from_numpy(UNIPC_OUTPUTS["net_y"])
    with torch.no_grad():
        out = diffusion.ode_sample(diffusion.guided_eps_fn(unipc_net(), y, 0.4, 5), z, steps,
                                          order=order, method="unipc", spacing=skip, bh=bh,
                                          lower_order_final=final)
    expected = UNIPC_OUTPUTS[key]
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-12 * np.abs(expected).max())


@pytest.mark.parametrize("bh", diffusion.B_H)
def test_uni_sum_integrates_polynomials_exactly(bh):
    """With two or more differences, DDIM - alpha_t uni_sum is the exact integral of the polynomial
    through the data predictions. For x0(lambda) = q(lambda) the step adds
    x_t - (sigma_t / sigma_s) x_s = sigma_t int e^lambda q(lambda) dlambda, so with
    alpha_t / sigma_t = e^lambda_t: -e^lambda_t ((e^-h - 1) q(lambda_s) + uni_sum) must equal
    [e^lambda (q - q' + q'' - q''')] from lambda_s to lambda_t."""
    cubic = np.polynomial.Polynomial([0.3, -0.8, 0.45, -0.1])
    quadratic = cubic.cutdeg(2)
    lams = [-2.1, -1.3, -0.8, 0.1]  # three grid points (oldest first; the last is s), then t

    def exact(q):
        def antiderivative(lam):
            return math.exp(lam) * (q - q.deriv(1) + q.deriv(2) - q.deriv(3))(lam)
        return antiderivative(lams[-1]) - antiderivative(lams[-2])

    def step(q, points, corrector):  # the update's integral from the data predictions q(lambda)
        at = lams[-points - 1:]
        m_t = q(lams[-1]) if corrector else None
        uni = diffusion.uni_sum(at, [q(lam) for lam in at[:-1]], bh, m_t)
        return -math.exp(at[-1]) * (math.expm1(at[-2] - at[-1]) * q(at[-2]) + uni)

    # UniP-3 and UniC-2 for quadratics, UniC-3 for cubics, but not UniP-3 for cubics
    assert step(quadratic, 3, corrector=False) == pytest.approx(exact(quadratic), rel=1e-12)
    assert step(quadratic, 2, corrector=True) == pytest.approx(exact(quadratic), rel=1e-12)
    assert step(cubic, 3, corrector=True) == pytest.approx(exact(cubic), rel=1e-12)
    assert abs(step(cubic, 3, corrector=False) - exact(cubic)) > 1e-3 * abs(exact(cubic))


def dpm_solver_2m(eps_fn, x, ts):
    """Multistep DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) restated on the grid ts: a DDIM first
    step, then x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (e^-h_i - 1) D_i with
    D_i = (1 + 1 / (2 r_i)) m_{i-1} - m_{i-2} / (2 r_i), r_i = h_{i-1} / h_i."""
    def x0_of(x, t):
        n = torch.full((x.shape[0],), 1000 * t, dtype=torch.float64)
        return (x - sigma(t) * eps_fn(x, n)) / alpha(t)

    ms, x = [], x
    for i in range(1, len(ts)):
        ms.append(x0_of(x, ts[i - 1]))
        h = lam(ts[i]) - lam(ts[i - 1])
        D = ms[-1]
        if i > 1:
            r = (lam(ts[i - 1]) - lam(ts[i - 2])) / h
            D = (1 + 1 / (2 * r)) * ms[-1] - ms[-2] / (2 * r)
        x = sigma(ts[i]) / sigma(ts[i - 1]) * x - alpha(ts[i]) * np.expm1(-h) * D
    return x


def test_unip2_bh2_is_dpm_solver_2m():
    """With one difference a_1 = 1/2: B(h) = e^-h - 1 makes UniP-2 (alone) DPM-Solver++(2M), the
    multistep solver UniPC's predictor covers (which is why the project has no separate one)."""
    schedule, x_T, steps = diffusion.DiscreteSchedule(), x_T_samples(), 12
    ts = diffusion.time_steps(schedule, "logSNR", steps)
    predict_x0 = diffusion.DataPrediction(gaussian_eps, schedule, steps)
    unip = diffusion.unipc(predict_x0, schedule, x_T, ts, 2, "bh2", False, corrector=False)
    torch.testing.assert_close(unip, dpm_solver_2m(gaussian_eps, x_T, grid("logSNR", steps)),
                               rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("bh", diffusion.B_H)
@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_convergence_order_on_gaussian(order, bh):
    """The corrector raises the order by one: UniPC-p converges like h^(p + 1) for p = 1, 2. The
    warm-up's first step (UniC-1, local error h^3) bounds UniPC-3 at third order; its fourth-order
    terms still dominate at these steps with bh2 (observed 3.7-3.8), and partly cancel the
    third-order ones with bh1 (observed 2.6-2.8 here, 2.96 from 1024 to 2048 steps)."""
    steps = [128, 256, 512] if order == 3 else [32, 64, 128]
    errors = [solver_error(n, order=order, method="unipc", spacing="logSNR", bh=bh)
              for n in steps]
    assert errors[0] > errors[1] > errors[2]
    observed = math.log2(errors[1] / errors[2])
    if order < 3:
        assert abs(observed - (order + 1)) < 0.3, (errors, observed)
    else:
        assert 2.7 < observed < 4.0, (errors, observed)


@pytest.mark.parametrize("bh", diffusion.B_H)
@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_corrector_lowers_the_error(order, bh):
    """UniPC against the same UniP predictor without the corrector, at 20 and 50 evaluations."""
    schedule, x_T = diffusion.DiscreteSchedule(), x_T_samples()
    for steps in (20, 50):
        ts = diffusion.time_steps(schedule, "logSNR", steps)
        errors = []
        for corrector in (True, False):
            predict_x0 = diffusion.DataPrediction(gaussian_eps, schedule, steps)
            x = diffusion.unipc(predict_x0, schedule, x_T, ts, order, bh, False,
                                corrector=corrector)
            assert predict_x0.evals == steps
            errors.append(float(np.sqrt(np.mean((x.numpy() - exact_solution(x_T)) ** 2))))
        assert errors[0] < errors[1] / 2, (steps, errors)


@pytest.mark.parametrize("method", ["singlestep"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_convergence_order_on_gaussian(method, order):
    """Errors against the exact PF-ODE solution fall like h^order (logSNR-uniform steps): the error
    ratio when doubling the evaluations is about 2^order. Singlestep order 3 takes 3K - 1
    evaluations, i.e. segments [3] * (K - 1) + [2], so that the K segments double."""
    steps = [47, 95, 191] if (method, order) == ("singlestep", 3) else [32, 64, 128]
    errors = [solver_error(n, order=order, method=method, spacing="logSNR") for n in steps]
    assert errors[0] > errors[1] > errors[2]
    observed = math.log2(errors[1] / errors[2])
    assert abs(observed - order) < 0.3, (errors, observed)


def test_solver_approaches_exact_solution():
    errors = [solver_error(n) for n in (10, 20, 50, 100)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 1e-4


def image_like_gaussian(side=8, seed=1):
    """mu, s of an image-like Gaussian: one side x side channel in a cosine basis, mode (u, v) with
    variance proportional to 1 / (1 + u^2 + v^2), scaled to mean variance 1; mu uniform in
    [-1, 1]."""
    u = np.arange(side)
    var = 1.0 / (1.0 + u[:, None] ** 2 + u[None, :] ** 2)
    mu = np.random.default_rng(seed).uniform(-1, 1, side * side)
    return mu, np.sqrt(var / var.mean()).reshape(-1)


@pytest.mark.parametrize("spectrum", ["two-scale", "image"])
def test_default_beats_the_release_with_a_fifth_of_its_evaluations(spectrum):
    """The accuracy bar (docs/samplers.md), on Gaussian data: the default at 12
    evaluations (10 on the image-like spectrum) is at least as accurate as the release's sampler
    at 50, and at 20 as the release's at 250, its FID-50K setting."""
    mu, s = (MU, S) if spectrum == "two-scale" else image_like_gaussian()
    eps_fn, x_T = optimal_eps_fn(mu, s), x_T_samples(mu=mu, s=s)

    def error(steps, **solver):
        x = diffusion.ode_sample(eps_fn, x_T, steps, **solver)
        return float(np.sqrt(np.mean((x.numpy() - exact_solution(x_T, mu, s)) ** 2)))

    few = 12 if spectrum == "two-scale" else 10
    assert error(few) <= error(50, **diffusion.RELEASE_SAMPLER)
    assert error(20) <= error(250, **diffusion.RELEASE_SAMPLER)


@pytest.mark.parametrize("steps", [3, 5, 6, 10, 20])
def test_default_is_unipc_3_bh1_and_below_8_steps_unipc_2_bh2(steps):
    """The default against the official UniPC's outputs (tests/data/unipc_official.npz): order 3
    with B(h) 'bh1' from 8 evaluations on; below, order 2 with 'bh2' and lower_order_final."""
    key = f"gauss_{steps}_3_bh1_full_logSNR" if steps >= 8 else f"gauss_{steps}_2_bh2_lof_logSNR"
    x_T = torch.from_numpy(UNIPC_OUTPUTS["gauss_x_T"])
    out = diffusion.ode_sample(gaussian_eps, x_T, steps)
    np.testing.assert_allclose(out.numpy(), UNIPC_OUTPUTS[key], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("method", ["singlestep", "unipc bh1",
                                    "unipc bh2 lower_order_final"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("steps", [3, 10, 11, 12])
def test_steps_is_the_number_of_evaluations(method, order, steps):
    method, *options = method.split()
    unipc = dict(bh=options[0], lower_order_final=len(options) > 1) if options else {}
    calls, reported = [], []
    diffusion.ode_sample(lambda x, n: calls.append(n) or gaussian_eps(x, n),
                                x_T_samples(batch=2), steps,
                                order=order, method=method, spacing="logSNR", **unipc,
                                progress=lambda done, total: reported.append((done, total)))
    assert len(calls) == steps
    assert reported == [(i, steps) for i in range(1, steps + 1)]
    assert calls[0][0].item() == pytest.approx(1000.0)  # starts at n = 1000
    if method != "singlestep":  # one evaluation at each grid point but the last
        np.testing.assert_allclose([n[0].item() for n in calls], 1000 * grid("logSNR", steps)[:-1],
                                   rtol=1e-10)


def test_solver_errors():
    x = x_T_samples(batch=2)
    for kwargs, match in [(dict(method="adaptive"), "method"), (dict(order=4), "order"),
                          (dict(spacing="karras"), "spacing"),
                          (dict(steps=2, order=3), "--steps must be >= 3"),
                          (dict(method="unipc", bh="bh3"), "UniPC B\\(h\\)")]:
        with pytest.raises(ValueError, match=match):
            diffusion.ode_sample(gaussian_eps, x, **{"steps": 10, **kwargs})

    calls = []

    def nan_after_three(x, n):
        calls.append(n)
        eps = gaussian_eps(x, n)
        return eps * float("nan") if len(calls) == 4 else eps

    with pytest.raises(FloatingPointError, match=r"not finite.*NaN"):
        diffusion.ode_sample(nan_after_three, x, 10)


# -- DDPM ancestral sampling -------------------------------------------------------------------

def test_ddpm_sample_moments():
    """With the optimal predictor every DDPM step is affine in x_n plus Gaussian noise, so the
    mean and variance of x_0 per dimension follow a recursion, written here from Ho et al. (2020):
    x_{n-1} = (x_n - beta_n / sqrt(1 - alpha_bar_n) eps) / sqrt(1 - beta_n) + sqrt(beta~_n) z,
    beta~_n = beta_n (1 - alpha_bar_{n-1}) / (1 - alpha_bar_n). Small s make the last steps' noise
    visible in the variance."""
    mu, s = np.array([0.2, -0.4, 0.3, 1.0]), np.array([0.03, 0.1, 0.5, 2.0])
    m = alpha(1.0) * mu  # x_T's mean and variance at n = 1000
    v = alpha(1.0) ** 2 * s ** 2 + sigma(1.0) ** 2
    for n in range(1000, 0, -1):
        a, sg, beta = math.sqrt(ALPHA_BAR[n - 1]), math.sqrt(1 - ALPHA_BAR[n - 1]), BETAS[n - 1]
        k = sg / (a ** 2 * s ** 2 + sg ** 2)  # eps = k (x - a mu)
        c = beta / sg / math.sqrt(1 - beta)
        slope = 1 / math.sqrt(1 - beta) - c * k
        m = slope * m + c * k * a * mu
        v = slope ** 2 * v
        if n > 1:
            v = v + beta * (1 - ALPHA_BAR[n - 2]) / (1 - ALPHA_BAR[n - 1])
    batch = 4000
    x_T = x_T_samples(batch=batch, seed=1, mu=mu, s=s)
    x0 = diffusion.ddpm_sample(optimal_eps_fn(mu, s), x_T,
                               generator=torch.Generator().manual_seed(0)).numpy()
    # 4 standard errors of the sample mean and variance
    assert np.all(np.abs(x0.mean(0) - m) < 4 * np.sqrt(v / batch))
    assert np.all(np.abs(x0.var(0) - v) < 4 * v * np.sqrt(2 / batch))


def test_singlestep_orders():
    """DPM-Solver-fast's composition for order 3; order 2 ends with a first-order segment."""
    assert diffusion.singlestep_orders(9, 3) == [3, 3, 2, 1]
    assert diffusion.singlestep_orders(10, 3) == [3, 3, 3, 1]
    assert diffusion.singlestep_orders(11, 3) == [3, 3, 3, 2]
    assert diffusion.singlestep_orders(7, 2) == [2, 2, 2, 1]
    assert diffusion.singlestep_orders(3, 1) == [1, 1, 1]
