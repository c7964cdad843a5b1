"""Everything between the DiMR network and an image: schedule, multi-scale loss, guidance, samplers.

Paper: Liu et al., "Alleviating Distortion in Image Generation via Multi-Resolution Diffusion
Models and Time-Dependent Layer Normalization", NeurIPS 2024 (arXiv 2406.09416), Sec. 3.2, and
the settings of the authors' release. The samplers follow Lu et al., "DPM-Solver" (NeurIPS 2022,
arXiv 2206.00927) and "DPM-Solver++" (arXiv 2211.01095), and Zhao et al., "UniPC" (NeurIPS 2023,
arXiv 2302.04867), with their symbols alpha_t, sigma_t, lambda_t = log(alpha_t / sigma_t) and
h = lambda_t - lambda_s. Read top to bottom:

1. DiscreteSchedule: DDPM with 1000 scaled-linear betas; q(x_n | x_0) for training; the
   continuous-time view t in [1/1000, 1] (n = 1000 t) the samplers work in.
2. Multi-scale targets and loss (paper Sec. 3.2).
3. Classifier-free guidance: the model wrapper that turns DiMR into eps_fn(x, n).
4. Samplers of the probability-flow ODE, all in data prediction on one step grid: the release's
   (DPM-Solver++ singlestep, `singlestep`), the default (UniPC, `unipc`), both run by
   `ode_sample`; and DDPM's ancestral sampling (`ddpm_sample`), the baseline.
How accurately each sampler solves the ODE: docs/samplers.md (tools/sampler_error.py).
"""
import math

import torch
import torch.nn.functional as F

from td_ln import NUM_TIMESTEPS  # T = 1000: DDPM steps n = 1..T (also the scale of TD-LN's t~)

BETA_START = 0.00085  # beta_1 of the scaled-linear ("Stable Diffusion") schedule
BETA_END = 0.012  # beta_1000


# ----------------------------------------------------------------------------------------------
# 1. Noise schedule
# ----------------------------------------------------------------------------------------------

def _interp(x, xp, fp):
    """Piecewise-linear interpolation of the points (xp, fp) at x (xp increasing, float64).

    Past the ends the first / last segment is extended linearly (DPM-Solver's interpolate_fn).
    """
    flat = x.reshape(-1)
    i = torch.searchsorted(xp, flat).clamp(1, len(xp) - 1)
    slope = (fp[i] - fp[i - 1]) / (xp[i] - xp[i - 1])
    return (fp[i - 1] + slope * (flat - xp[i - 1])).reshape(x.shape)


class DiscreteSchedule:
    """The release's discrete DDPM schedule and its continuous-time view (DPM-Solver's "discrete").

    Discrete: betas = linspace(sqrt(BETA_START), sqrt(BETA_END), 1000)^2 and
    alpha_bar_n = prod_{i<=n} (1 - beta_i), so
    x_n = sqrt(alpha_bar_n) x_0 + sqrt(1 - alpha_bar_n) eps.
    Continuous: t in [1/1000, 1] with n = 1000 t; log alpha_t is piecewise linear in t between
    the points t_n = n / 1000, where alpha_{t_n} = sqrt(alpha_bar_n); sigma_t = sqrt(1 - alpha_t^2)
    and lambda_t = log alpha_t - log sigma_t (half the log-SNR), strictly decreasing in t.
    All tables are float64 on the CPU; the continuous-time methods take and return float64.
    q_sample keeps a copy of its two coefficient tables per device and dtype, so that a training
    step indexes them where its data lives, without a transfer.
    """

    def __init__(self):
        T = NUM_TIMESTEPS
        self.betas = torch.linspace(BETA_START ** 0.5, BETA_END ** 0.5, T, dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # index n-1 holds alpha_bar_n
        self.t_array = torch.arange(1, T + 1, dtype=torch.float64) / T  # t_n = n / T
        self.log_alpha_array = 0.5 * torch.log(self.alphas_cumprod)
        # (device, dtype) -> (2, 1000): sqrt(alpha_bar_n), sqrt(1 - alpha_bar_n)
        self._q_tables = {}

    # -- training: q(x_n | x_0) ------------------------------------------------------------------
    def q_sample(self, x0, n, eps):
        """x_n = sqrt(alpha_bar_n) x0 + sqrt(1 - alpha_bar_n) eps for steps n, int64 [B] in
        1..1000."""
        key = (x0.device, x0.dtype)
        if key not in self._q_tables:  # the roots in float64, then rounded once to the data's dtype
            table = torch.stack([self.alphas_cumprod.sqrt(), (1.0 - self.alphas_cumprod).sqrt()])
            self._q_tables[key] = table.to(device=x0.device, dtype=x0.dtype)
        coef_x0, coef_eps = self._q_tables[key][:, n - 1].view(2, -1, *(1,) * (x0.dim() - 1))
        return coef_x0 * x0 + coef_eps * eps                                  # coefs (B, 1, .., 1)

    # -- sampling: continuous time t = n / 1000 --------------------------------------------------
    def log_alpha_t(self, t):
        return _interp(torch.as_tensor(t, dtype=torch.float64), self.t_array, self.log_alpha_array)

    def alpha_t(self, t):
        return torch.exp(self.log_alpha_t(t))

    def sigma_t(self, t):
        return torch.sqrt(-torch.expm1(2.0 * self.log_alpha_t(t)))

    def lambda_t(self, t):
        log_alpha = self.log_alpha_t(t)
        return log_alpha - 0.5 * torch.log(-torch.expm1(2.0 * log_alpha))

    def inverse_lambda(self, lam):
        """t with lambda_t = lam: log alpha = -log(1 + e^{-2 lam}) / 2, then invert the table."""
        log_alpha = -0.5 * torch.logaddexp(torch.zeros(()),
                                           -2.0 * torch.as_tensor(lam, dtype=torch.float64))
        return _interp(log_alpha, self.log_alpha_array.flip(0), self.t_array.flip(0))


# ----------------------------------------------------------------------------------------------
# 2. Multi-scale loss (paper Sec. 3.2)
# ----------------------------------------------------------------------------------------------

def loss_weights(num_branches, multiscale=True):
    """The paper's branch weights 4^-(R-1-r), lowest resolution first: [1/4, 1], [1/16, 1/4, 1];
    multiscale=False: the full-resolution branch's term only, [0, ..., 0, 1] (Table 5's rows
    before '+ multi-scale loss')."""
    if not multiscale:
        return [0.0] * (num_branches - 1) + [1.0]
    return [4.0 ** -(num_branches - 1 - r) for r in range(num_branches)]


def multiscale_targets(eps, sizes):
    """Noise targets per branch: sum-pool over f x f, divided by f, with f = full size / size
    (the paper's k, written f here, where k is a solver's order).

    A sum of f^2 independent unit-variance values has variance f^2, so dividing by f keeps the
    targets at unit variance, like the noise itself. eps [B, C, H, W]; sizes: the branches'
    spatial sizes, each an int (square) or (H_r, W_r). Returns a list of [B, C, H_r, W_r].
    """
    H, W = eps.shape[-2:]
    targets = []
    for size in sizes:
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        f = H // h  # the model's branch sizes divide H and W by one factor each
        targets.append(F.avg_pool2d(eps, f) * f if f > 1 else eps)  # avg * f^2 / f = sum / f
    return targets


def multiscale_loss(preds, eps, weights=None):
    """Loss = sum_r alpha_r * mean((eps_hat_r - target_r)^2), paper Sec. 3.2.

    preds: the model's per-branch predictions, lowest resolution first, each [B, C, H_r, W_r];
    eps: the full-resolution noise [B, C, H, W]; weights: alpha_r (default loss_weights(R)).
    Returns (total, per-branch terms), both in float32 or wider, for logging the branches.
    """
    weights = loss_weights(len(preds)) if weights is None else list(weights)
    if len(weights) != len(preds):
        raise ValueError(f"{len(weights)} loss weights for {len(preds)} branches")
    targets = multiscale_targets(eps, [p.shape[-2:] for p in preds])
    dtype = torch.promote_types(eps.dtype, torch.float32)
    terms = [torch.mean((p.to(dtype) - y.to(dtype)) ** 2) for p, y in zip(preds, targets)]
    return sum(w * term for w, term in zip(weights, terms)), terms


# ----------------------------------------------------------------------------------------------
# 3. Classifier-free guidance (Ho & Salimans 2022): the model wrapper
# ----------------------------------------------------------------------------------------------

def guided_eps_fn(model, y, guidance, null_class, decay_power=None):
    """Wrap DiMR into eps_fn(x, n): the full-resolution noise prediction, guided.

    model(x, n, y) takes x [B, C, H, W], n float [B] on the 0..1000 step scale and y int64 [B],
    and returns the per-branch predictions, the full-resolution one last.
    `guidance` is s, the guidance in the release's convention; two conventions for the same
    guidance, side by side:
      release:  eps = eps_c + s * (eps_c - eps_u)       (the release's "cfg scale", 0.4 at 256 px)
      usual:    eps = eps_u + w * (eps_c - eps_u),  w = 1 + s   (the guidance scale, 1.4)
    s = 0 is no guidance, run with one forward pass only; for s > 0 the conditional and null-class
    halves go through the model as one batch. With decay_power = p the usual w follows the
    power-cosine schedule
      w(n) = 1 + (w - 1) * (1 - cos(pi * (1 - n/1000)^p)) / 2,
    which is 1 (no guidance) at n = 1000 and rises to w as n -> 0; that is s(n) = w(n) - 1.
    """
    if not 0 <= guidance < math.inf:
        raise ValueError(f"guidance s must be finite and >= 0 (release convention, 0 = none), "
                         f"got {guidance}")
    if decay_power is not None and decay_power <= 0:
        raise ValueError(f"decay_power must be > 0, got {decay_power}")
    if guidance == 0:
        return lambda x, n: model(x, n, y)[-1]
    y_null = torch.full_like(y, null_class)

    def eps_fn(x, n):
        out = model(torch.cat([x, x]), torch.cat([n, n]), torch.cat([y, y_null]))[-1]
        # The combination in float32 at least: under bf16 autocast eps_c - eps_u would lose digits.
        out = out.to(torch.promote_types(out.dtype, torch.float32))
        eps_c, eps_u = out.chunk(2)  # (B, C, H, W) each
        s = torch.full_like(n, guidance)                                    # s(n), (B,)
        if decay_power is not None:
            s = s * (1 - torch.cos(math.pi * (1 - n / NUM_TIMESTEPS) ** decay_power)) / 2
        return eps_c + s.to(out.dtype).view(-1, *(1,) * (x.dim() - 1)) * (eps_c - eps_u)

    return eps_fn


# ----------------------------------------------------------------------------------------------
# 4. Samplers
# ----------------------------------------------------------------------------------------------
# With the data prediction x0(x_t, t) = (x_t - sigma_t eps(x_t, n = 1000 t)) / alpha_t, the
# probability-flow ODE from an earlier time t' (t_prev) to t < t' has the exact solution
# (DPM-Solver++, which writes s for t')
#     x_t = (sigma_t / sigma_t') x_t'
#           + sigma_t * int_{lambda_t'}^{lambda_t} e^lambda x0(lambda) dlambda.
# Expanding x0 around lambda_t' as D0 + D1 u with u = (lambda - lambda_t') / h (D1 ~ h x0') and
# integrating each power exactly gives exp_step below. Higher orders estimate the expansion from
# more data predictions: singlestep (the release's) from extra evaluations inside [t', t], whose
# third order still needs only D0 and D1 (see `singlestep`); UniPC (the default) from the previous
# steps' data predictions, with a corrector that reuses the next step's evaluation (`uni_sum`).

SPACINGS = ("time_uniform", "time_quadratic", "logSNR")
METHODS = ("singlestep", "unipc")
ORDERS = (1, 2, 3)
B_H = ("bh1", "bh2")  # UniPC's B(h), see uni_sum

# The authors' release: its dpm_solver.py, DPM_Solver(..., predict_x0=True).sample(x, steps,
# eps=1/1000, T=1) with the defaults order=3, skip_type='time_uniform', method='fast': our
# singlestep solver on a time-uniform grid (see `singlestep`).
RELEASE_SAMPLER = dict(method="singlestep", order=3, spacing="time_uniform")
# Our default, chosen by measurement (docs/samplers.md): UniPC-3 with B(h) 'bh1' on logSNR steps;
# with fewer than FEW_STEPS evaluations, where third order is the less accurate, UniPC-2 with 'bh2'
# and lower-order final steps.
DEFAULT_SAMPLER = dict(method="unipc", order=3, spacing="logSNR", bh="bh1",
                       lower_order_final=False)
FEW_STEPS = 8
FEW_STEPS_SAMPLER = dict(DEFAULT_SAMPLER, order=2, bh="bh2", lower_order_final=True)


def sampler_settings(steps, **given):
    """The settings of a run of `steps` evaluations: those given (not None) over the default's."""
    default = FEW_STEPS_SAMPLER if steps < FEW_STEPS else DEFAULT_SAMPLER
    return {**default, **{k: v for k, v in given.items() if v is not None}}


def sampler_name(settings):
    """'unipc 3 logSNR bh1', 'unipc 2 logSNR bh2, lower-order final', 'singlestep 3 logSNR'."""
    name = f"{settings['method']} {settings['order']} {settings['spacing']}"
    if settings["method"] == "unipc":
        name += f" {settings['bh']}" + ", lower-order final" * settings["lower_order_final"]
    return name


def time_steps(schedule, spacing, num):
    """num + 1 times from t = 1 down to t = 1/1000 (n = 1000 .. 1), float64 [num + 1].

    time_uniform: uniform in t; time_quadratic: uniform in sqrt(t) (denser near the data);
    logSNR: uniform in lambda_t.
    """
    t_T, t_0 = 1.0, 1.0 / NUM_TIMESTEPS
    if spacing == "time_uniform":
        return torch.linspace(t_T, t_0, num + 1, dtype=torch.float64)
    if spacing == "time_quadratic":
        return torch.linspace(t_T ** 0.5, t_0 ** 0.5, num + 1, dtype=torch.float64) ** 2
    lam = torch.linspace(schedule.lambda_t(t_T).item(), schedule.lambda_t(t_0).item(), num + 1,
                         dtype=torch.float64)
    return schedule.inverse_lambda(lam)


class DataPrediction:
    """x0(x, t) = (x - sigma_t eps(x, n)) / alpha_t with n = 1000 t, for the scalar time t.

    Counts the evaluations and reports them to progress(done, steps).
    """

    def __init__(self, eps_fn, schedule, steps, progress=None):
        self.eps_fn, self.schedule, self.steps, self.progress = eps_fn, schedule, steps, progress
        self.evals = 0

    def __call__(self, x, t):
        n_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        eps = self.eps_fn(x, torch.full((x.shape[0],), NUM_TIMESTEPS * float(t), dtype=n_dtype,
                                        device=x.device))
        self.evals += 1
        if self.progress is not None:
            self.progress(self.evals, self.steps)
        return (x - float(self.schedule.sigma_t(t)) * eps) / float(self.schedule.alpha_t(t))


def exp_step(schedule, x, t_prev, t, D0, D1=0.0):
    """The exponential integrator from t' = t_prev to t with x0 ~ D0 + D1 u (DPM-Solver++):

        x_t = (sigma_t / sigma_t') x_t' - alpha_t (phi1 D0 - phi2 D1),
        phi1 = e^-h - 1,  phi2 = phi1 / h + 1,  h = lambda_t - lambda_t'.

    With D1 = 0 it is DDIM.
    """
    h = float(schedule.lambda_t(t) - schedule.lambda_t(t_prev))
    phi1 = math.expm1(-h)
    phi2 = phi1 / h + 1.0
    ratio = float(schedule.sigma_t(t) / schedule.sigma_t(t_prev))
    alpha_t = float(schedule.alpha_t(t))
    return ratio * x - alpha_t * (phi1 * D0 - phi2 * D1)


# -- the release's sampler: DPM-Solver++, singlestep -------------------------------------------

def singlestep_orders(steps, order):
    """Orders of the singlestep segments, summing to `steps` evaluations (DPM-Solver-fast).

    Order 3: K = steps // 3 + 1 segments, all third order but the last one or two, which are
    lower order so that the evaluations add up exactly.
    """
    if order == 1:
        return [1] * steps
    if order == 2:
        return [2] * (steps // 2) + [1] * (steps % 2)
    K = steps // 3 + 1
    return {0: [3] * (K - 2) + [2, 1], 1: [3] * (K - 1) + [1], 2: [3] * (K - 1) + [2]}[steps % 3]


def singlestep(predict_x0, schedule, x, ts, order):
    """DPM-Solver++(kS) on the grid ts of `steps` intervals, with singlestep_orders.

    A segment of order k runs from grid point i (time t') to i + k (time t) and evaluates x0 at
    its start and at the grid points i + 1 (and i + 2) inside it, times t1 (and t2), at logSNR
    fractions r1 (and r2) of the segment: 1/2 (1/3, 2/3) on a logSNR grid, as in the DPM-Solver
    papers, and whatever the grid gives on the others. This is what the release's 'fast' method
    computes.
    """
    lam = lambda t: float(schedule.lambda_t(t))  # noqa: E731
    i = 0
    for k in singlestep_orders(len(ts) - 1, order):
        t_prev, t = ts[i], ts[i + k]
        m0 = predict_x0(x, t_prev)
        if k == 1:  # DDIM
            x = exp_step(schedule, x, t_prev, t, m0)
        else:  # DDIM to t1, evaluate there
            t1 = ts[i + 1]
            r1 = (lam(t1) - lam(t_prev)) / (lam(t) - lam(t_prev))
            m1 = predict_x0(exp_step(schedule, x, t_prev, t1, m0), t1)
        if k == 2:  # DPM-Solver++(2S): D1 with h/2 ~ -phi1/2 in place of phi2, as the papers do
            x = exp_step(schedule, x, t_prev, t, m0 + (m1 - m0) / (2 * r1))
        elif k == 3:  # DPM-Solver++(3S): second order to t2, evaluate; D1 from m2 alone
            t2 = ts[i + 2]
            r2 = (lam(t2) - lam(t_prev)) / (lam(t) - lam(t_prev))
            m2 = predict_x0(exp_step(schedule, x, t_prev, t2, m0, (r2 / r1) * (m1 - m0)), t2)
            x = exp_step(schedule, x, t_prev, t, m0, (m2 - m0) / r2)  # third order when r2 = 2/3
        i += k
    return x


# -- the default: UniPC -------------------------------------------------------------------------

def uni_coefficients(h, rs, bh):
    """B(h) and a_1..a_p of uni_sum for the ratios rs = [r_1, ..., r_p] (float64 [p])."""
    B = -h if bh == "bh1" else math.expm1(-h)
    if len(rs) == 1:
        return B, torch.tensor([0.5], dtype=torch.float64)
    hphi, g = math.expm1(-h), []  # (-h) phi_1(-h)
    for j in range(1, len(rs) + 1):
        hphi = hphi / -h - 1 / math.factorial(j)  # (-h) phi_{j+1}(-h)
        g.append(math.factorial(j) * hphi / B)
    R = torch.tensor([[r ** (j - 1) for r in rs] for j in range(1, len(rs) + 1)],
                     dtype=torch.float64)  # R_jm = r_m^(j-1)
    return B, torch.linalg.solve(R, torch.tensor(g, dtype=torch.float64))


def uni_sum(lams, ms, bh, m_t=None):
    """B(h) sum_m a_m D_m / r_m of the UniPC update in data prediction (Zhao et al. 2023, Sec. 3):

        x_t = (sigma_t / sigma_t') x_t' - alpha_t (e^-h - 1) m_0 - alpha_t B(h) sum_m a_m D_m / r_m,

    where the first two terms are DDIM (exp_step), t' is the step's start and h = lambda_t -
    lambda_t'. ms: the data predictions at the last k grid points, oldest first, m_0 = ms[-1] at
    t'; lams: lambda at those points, then at t. Each earlier point gives
    r_m = (lambda_m - lambda_t') / h < 0 and
    D_m = m_m - m_0: UniP, the predictor, uses these. UniC, the corrector, is given m_t, the data
    prediction at the predicted x_t, and adds r = 1, D = m_t - m_0. With p >= 2 differences the
    a_m solve
        sum_m a_m r_m^(j-1) = j! (-h) phi_{j+1}(-h) / B(h),   j = 1..p,
    with (-h) phi_1(-h) = e^-h - 1 and (-h) phi_{j+1}(-h) = (-h) phi_j(-h) / (-h) - 1/j! (the
    official code's hh phi_k(hh), hh = -h): the update is
    then the exact integral of the polynomial in lambda through the p + 1 data predictions,
    whatever B(h). With one difference
    a_1 = 1/2, and B(h) decides the step: B(h) = -h ('bh1') or e^-h - 1 ('bh2', which makes UniP-2
    DPM-Solver++(2M)), the paper's B_1(h) = h and B_2(h) = e^h - 1 taken at -h, as the official
    code does in data prediction.
    """
    lam_prev, lam_t = lams[-2], lams[-1]
    h = lam_t - lam_prev
    rs = [(lam - lam_prev) / h for lam in lams[-3::-1]]  # the newest earlier point first
    Ds = [m - ms[-1] for m in ms[-2::-1]]
    if m_t is not None:  # UniC
        rs, Ds = rs + [1.0], Ds + [m_t - ms[-1]]
    if not rs:  # UniP-1 is DDIM
        return 0.0
    B, a = uni_coefficients(h, rs, bh)
    return B * sum(float(a_m) * D / r for a_m, D, r in zip(a, Ds, rs))


def unipc(predict_x0, schedule, x, ts, order, bh, lower_order_final, corrector=True):
    """UniPC-p (Zhao et al. 2023), multistep: each step predicts x_t by UniP from the last k data
    predictions, evaluates x0 there, and corrects x_t by UniC from the same points and that
    evaluation, which is also the next step's data prediction: one evaluation per step. The last
    step is not corrected (its evaluation would serve no later step). Step i = 1..steps has order
    k = min(order, i) (warm-up), and with lower_order_final at most steps + 1 - i, the official
    code's lower_order_final. corrector=False runs the predictor UniP alone (the tests compare
    UniP-2 with 'bh2' against DPM-Solver++(2M), which it equals).
    """
    lam, alpha = schedule.lambda_t(ts).tolist(), schedule.alpha_t(ts).tolist()
    steps = len(ts) - 1
    ms = [predict_x0(x, ts[0])]  # data predictions at the last `order` grid points, oldest first
    for i in range(1, steps + 1):
        k = min(order, i, steps + 1 - i) if lower_order_final else min(order, i)
        x_ddim = exp_step(schedule, x, ts[i - 1], ts[i], ms[-1])
        x_pred = x_ddim - alpha[i] * uni_sum(lam[i - k:i + 1], ms[-k:], bh)  # UniP
        if i == steps:
            return x_pred
        m_t = predict_x0(x_pred, ts[i])
        if corrector:  # UniC
            x = x_ddim - alpha[i] * uni_sum(lam[i - k:i + 1], ms[-k:], bh, m_t)
        else:
            x = x_pred
        ms = (ms + [m_t])[-order:]


def check_sampler(settings, steps):
    """A ValueError unless ode_sample can run these settings for `steps` evaluations."""
    for name, key, choices in (("method", "method", METHODS), ("order", "order", ORDERS),
                               ("step spacing", "spacing", SPACINGS),
                               ("UniPC B(h)", "bh", B_H)):
        if settings[key] not in choices:
            raise ValueError(f"unknown {name} {settings[key]!r}; choose from "
                             f"{', '.join(map(str, choices))}")
    if steps < settings["order"]:
        raise ValueError(f"--steps must be >= {settings['order']}, the solver's order, "
                         f"got {steps}")


def ode_sample(eps_fn, x_T, steps, method=None, order=None, spacing=None, bh=None,
               lower_order_final=None, schedule=None, progress=None):
    """Solve the probability-flow ODE from n = 1000 (t = 1) to n = 1 (t = 1/1000).

    eps_fn(x, n): noise prediction, n a float tensor [B] on the 0..1000 step scale (n = 1000 t).
    steps: number of eps_fn evaluations; method: 'unipc' or 'singlestep' (METHODS); order: 1, 2
    or 3; spacing: of the time grid, one of SPACINGS; UniPC only: bh, its B(h), and
    lower_order_final (see `unipc`); settings left None are the default's (sampler_settings), and
    RELEASE_SAMPLER gives the release's. schedule: a DiscreteSchedule (default the release's).
    progress(done, steps) is called after each evaluation. Returns x at t = 1/1000 (n = 1), as the
    release does.
    """
    settings = sampler_settings(steps, method=method, order=order, spacing=spacing, bh=bh,
                                lower_order_final=lower_order_final)
    check_sampler(settings, steps)
    method, order, spacing = settings["method"], settings["order"], settings["spacing"]
    schedule = DiscreteSchedule() if schedule is None else schedule
    predict_x0 = DataPrediction(eps_fn, schedule, steps, progress)
    ts = time_steps(schedule, spacing, steps)
    if method == "unipc":
        x = unipc(predict_x0, schedule, x_T, ts, order, settings["bh"],
                  settings["lower_order_final"])
    else:
        x = singlestep(predict_x0, schedule, x_T, ts, order)
    return finite(x, f"{sampler_name(settings)}, {steps} steps")


# -- DDPM ---------------------------------------------------------------------------------------

def ddpm_sample(eps_fn, x_T, generator=None, schedule=None, progress=None):
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2), n = 1000 .. 1: 1000 evaluations,
    returns x_0.

    x_{n-1} = (x_n - beta_n / sqrt(1 - alpha_bar_n) eps) / sqrt(1 - beta_n) + sqrt(beta~_n) z, with
    the posterior variance beta~_n = beta_n (1 - alpha_bar_{n-1}) / (1 - alpha_bar_n) and no
    noise at the last step. generator: one torch.Generator for the batch, or a list of CPU
    generators, one per row, so that row i's noise z does not depend on the other rows.
    """
    schedule = DiscreteSchedule() if schedule is None else schedule
    n_dtype = torch.float64 if x_T.dtype == torch.float64 else torch.float32
    x = x_T

    def noise():  # z ~ N(0, I) like x
        if isinstance(generator, (list, tuple)):
            return torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype)
                                for g in generator]).to(x.device)
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)

    for n in range(NUM_TIMESTEPS, 0, -1):
        eps = eps_fn(x, torch.full((x.shape[0],), float(n), dtype=n_dtype, device=x.device))
        beta, alpha_bar = float(schedule.betas[n - 1]), float(schedule.alphas_cumprod[n - 1])
        x = (x - beta / math.sqrt(1 - alpha_bar) * eps) / math.sqrt(1 - beta)
        if n > 1:
            posterior_var = beta * (1 - float(schedule.alphas_cumprod[n - 2])) / (1 - alpha_bar)
            x = x + math.sqrt(posterior_var) * noise()
        if progress is not None:
            progress(NUM_TIMESTEPS + 1 - n, NUM_TIMESTEPS)
    return finite(x, "DDPM")


def finite(x, sampler):
    """x, after one check (one host sync) that the whole solve stayed finite."""
    if not bool(torch.isfinite(x).all()):
        raise FloatingPointError(f"the sampler's result is not finite ({sampler}): the model "
                                 "returned NaN/inf, or the guidance scale is too large")
    return x
