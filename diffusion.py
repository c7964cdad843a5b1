"""Everything between the DiMR network and an image: schedule, multi-scale loss, guidance, sampler.

Paper: Liu et al., "Alleviating Distortion in Image Generation via Multi-Resolution Diffusion
Models and Time-Dependent Layer Normalization", NeurIPS 2024 (arXiv 2406.09416), Sec. 3.2, and
the settings of the authors' release. The sampler follows Lu et al., "DPM-Solver" (NeurIPS 2022,
arXiv 2206.00927) and "DPM-Solver++" (arXiv 2211.01095), with their symbols alpha_t, sigma_t,
lambda_t = log(alpha_t / sigma_t) and h = lambda_t - lambda_s. Read top to bottom:

1. DiscreteSchedule: DDPM with 1000 scaled-linear betas; q(x_n | x_0) for training; the
   continuous-time view t in [1/1000, 1] (n = 1000 t) the sampler works in.
2. Multi-scale targets and loss (paper Sec. 3.2).
3. Classifier-free guidance: the model wrapper that turns DiMR into eps_fn(x, n).
4. DPM-Solver++ (data prediction), multistep and singlestep, orders 1-3; DDPM ancestral sampling.
5. `python diffusion.py`: error against the exact probability-flow ODE solution for Gaussian
   data, for every solver configuration (how the defaults below were chosen).
"""
import argparse
import math
import sys

import torch
import torch.nn.functional as F

NUM_TIMESTEPS = 1000  # DDPM steps n = 1..1000
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
    alpha_bar_n = prod_{i<=n} (1 - beta_i), so x_n = sqrt(alpha_bar_n) x_0 + sqrt(1 - alpha_bar_n) eps.
    Continuous: t in [1/1000, 1] with n = 1000 t; log alpha_t is piecewise linear in t between
    the points t_n = n / 1000, where alpha_{t_n} = sqrt(alpha_bar_n); sigma_t = sqrt(1 - alpha_t^2)
    and lambda_t = log alpha_t - log sigma_t (half the log-SNR), strictly decreasing in t.
    All tables are float64 on the CPU; the continuous-time methods take and return float64.
    q_sample keeps a copy of its two coefficient tables per device and dtype, so that a training
    step indexes them where its data lives, without a transfer.
    """

    def __init__(self):
        n = NUM_TIMESTEPS
        self.betas = torch.linspace(BETA_START ** 0.5, BETA_END ** 0.5, n, dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # index n-1 holds alpha_bar_n
        self.t_array = torch.arange(1, n + 1, dtype=torch.float64) / n  # t_n = n / 1000
        self.log_alpha_array = 0.5 * torch.log(self.alphas_cumprod)
        self._q_tables = {}  # (device, dtype) -> (2, 1000): sqrt(alpha_bar_n), sqrt(1 - alpha_bar_n)

    # -- training: q(x_n | x_0) ------------------------------------------------------------------
    def sample_steps(self, batch, device, generator=None):
        """Steps n uniform in 1..1000, int64 [batch]."""
        return torch.randint(1, NUM_TIMESTEPS + 1, (batch,), generator=generator, device=device)

    def q_sample(self, x0, n, eps):
        """x_n = sqrt(alpha_bar_n) x0 + sqrt(1 - alpha_bar_n) eps for n int64 [B] in 1..1000.

        The range of n is checked on the CPU with a clear error; on an accelerator that check would
        wait for the device every step, so there it is torch._assert_async, which fails the step
        later (a device-side assert) without stopping the host.
        """
        if n.dtype != torch.int64 or n.shape != x0.shape[:1]:
            raise ValueError(f"n must be int64 of shape [{x0.shape[0]}], got {n.dtype} {list(n.shape)}")
        in_range = ((n >= 1) & (n <= NUM_TIMESTEPS)).all()
        if n.device.type == "cpu" and not in_range:
            raise ValueError(f"steps n must lie in 1..{NUM_TIMESTEPS}, got {n.min().item()}..{n.max().item()}")
        if n.device.type != "cpu":
            torch._assert_async(in_range)
        key = (x0.device, x0.dtype)
        if key not in self._q_tables:  # the roots in float64, then rounded once to the data's dtype
            table = torch.stack([self.alphas_cumprod.sqrt(), (1.0 - self.alphas_cumprod).sqrt()])
            self._q_tables[key] = table.to(device=x0.device, dtype=x0.dtype)
        a, s = self._q_tables[key][:, n.to(x0.device) - 1].view(2, -1, *(1,) * (x0.dim() - 1))  # (B, 1, ..., 1)
        return a * x0 + s * eps

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
        log_alpha = -0.5 * torch.logaddexp(torch.zeros(()), -2.0 * torch.as_tensor(lam, dtype=torch.float64))
        return _interp(log_alpha, self.log_alpha_array.flip(0), self.t_array.flip(0))


# ----------------------------------------------------------------------------------------------
# 2. Multi-scale loss (paper Sec. 3.2)
# ----------------------------------------------------------------------------------------------

def loss_weights(num_branches):
    """The paper's branch weights 4^-(R-1-r), lowest resolution first: [1/4, 1], [1/16, 1/4, 1]."""
    return [4.0 ** -(num_branches - 1 - r) for r in range(num_branches)]


def multiscale_targets(eps, sizes):
    """Noise targets per branch: sum-pool over k x k, divided by k, with k = full size / size.

    A sum of k^2 independent unit-variance values has variance k^2, so dividing by k keeps the
    targets at unit variance, like the noise itself. eps [B, C, H, W]; sizes: the branches'
    spatial sizes, each an int (square) or (H_r, W_r). Returns a list of [B, C, H_r, W_r].
    """
    H, W = eps.shape[-2:]
    targets = []
    for size in sizes:
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        k = H // h
        if h * k != H or w * k != W:
            raise ValueError(f"branch size {h}x{w} does not divide the noise size {H}x{W} by one integer factor")
        targets.append(F.avg_pool2d(eps, k) * k if k > 1 else eps)  # avg * k^2 / k = sum / k
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

def guided_eps_fn(model, y, scale, null_class, decay_power=None):
    """Wrap DiMR into eps_fn(x, n): the full-resolution noise prediction, guided.

    model(x, n, y) takes x [B, C, H, W], n float [B] on the 0..1000 step scale and y int64 [B],
    and returns the per-branch predictions, the full-resolution one last.
    Two conventions for the same guidance, side by side:
      release:  eps = eps_c + s * (eps_c - eps_u),   scale = s   (the release's "cfg scale 0.4")
      usual w:  eps = eps_u + w * (eps_c - eps_u),   w = 1 + s   (= guidance scale 1.4)
    `scale` is always the release's s; s = 0 is no guidance, run with one forward pass only.
    With decay_power = p the usual w follows the power-cosine schedule
      w(n) = 1 + (w - 1) * (1 - cos(pi * (1 - n/1000)^p)) / 2,
    which is 1 (no guidance) at n = 1000 and rises to w as n -> 0.
    Otherwise the conditional and null-class halves go through the model as one batch.
    """
    if scale < 0:
        raise ValueError(f"guidance scale must be >= 0 (release convention, 0 = none), got {scale}")
    if decay_power is not None and decay_power <= 0:
        raise ValueError(f"decay_power must be > 0, got {decay_power}")
    if scale == 0:
        return lambda x, n: model(x, n, y)[-1]
    y_null = torch.full_like(y, null_class)

    def eps_fn(x, n):
        out = model(torch.cat([x, x]), torch.cat([n, n]), torch.cat([y, y_null]))[-1]
        # The combination in float32 at least: under bf16 autocast eps_c - eps_u would lose digits.
        out = out.to(torch.promote_types(out.dtype, torch.float32))
        eps_c, eps_u = out.chunk(2)  # (B, C, H, W) each
        s = torch.full_like(n, scale)
        if decay_power is not None:
            s = s * (1 - torch.cos(math.pi * (1 - n / NUM_TIMESTEPS) ** decay_power)) / 2
        return eps_c + s.to(out.dtype).view(-1, *(1,) * (x.dim() - 1)) * (eps_c - eps_u)

    return eps_fn


# ----------------------------------------------------------------------------------------------
# 4. Samplers
# ----------------------------------------------------------------------------------------------
# With the data prediction x0(x_t, t) = (x_t - sigma_t eps(x_t, t)) / alpha_t, the probability-flow
# ODE from s to t has the exact solution (DPM-Solver++)
#     x_t = (sigma_t / sigma_s) x_s + sigma_t * int_{lambda_s}^{lambda_t} e^lambda x0(lambda) dlambda.
# Expanding x0 around lambda_s as D0 + D1 u + D2 u^2 / 2 with u = (lambda - lambda_s) / h, so that
# D1 ~ h x0' and D2 ~ h^2 x0'', and integrating each power exactly gives
#     x_t = (sigma_t / sigma_s) x_s - alpha_t phi1 D0 + alpha_t phi2 D1 - alpha_t phi3 D2,
#     phi1 = e^-h - 1,  phi2 = phi1 / h + 1,  phi3 = phi2 / h - 1/2.
# A solver of order k estimates D0..D_{k-1}: singlestep from extra evaluations inside [s, t]
# (at lambda_s + r h), multistep from the previous steps' data predictions.

SPACINGS = ("time_uniform", "time_quadratic", "logSNR")
METHODS = ("multistep", "singlestep")
ORDERS = (1, 2, 3)

# The authors' release: DPM-Solver with data prediction, sample(x, steps, eps=1/1000, T=1) with its
# defaults order=3, skip_type='time_uniform', method='fast' (= our singlestep order 3).
RELEASE_SAMPLER = dict(order=3, method="singlestep", skip="time_uniform")
# Our default, chosen with `python diffusion.py` (table in the README): the release's solver with
# logSNR-uniform segments. On the image-like Gaussian it is the most accurate configuration at 10,
# 20 and 50 evaluations (14x, 73x, 290x below the release's error), and at 10 evaluations already
# below the release's error at 50. Multistep order 3 logSNR is up to 2x better when all s lie in
# [0.5, 2] ('two-scale') but 2-12x worse than this at 10 evaluations when some s exceed ~5. With K
# time-uniform segments the last one has h ~ 0.5 log(1000 / K) (2.1 at K = 17, 50 evaluations) in
# the region where detail (small s) forms, so the release's error barely falls past 50 evaluations.
DEFAULT_SAMPLER = dict(order=3, method="singlestep", skip="logSNR")


def time_steps(schedule, skip, num):
    """num + 1 times from t = 1 down to t = 1/1000 (n = 1000 .. 1), float64 [num + 1].

    time_uniform: uniform in t; time_quadratic: uniform in sqrt(t) (denser near the data);
    logSNR: uniform in lambda_t.
    """
    t_T, t_0 = 1.0, 1.0 / NUM_TIMESTEPS
    if skip == "time_uniform":
        return torch.linspace(t_T, t_0, num + 1, dtype=torch.float64)
    if skip == "time_quadratic":
        return torch.linspace(t_T ** 0.5, t_0 ** 0.5, num + 1, dtype=torch.float64) ** 2
    if skip == "logSNR":
        lam = torch.linspace(schedule.lambda_t(t_T).item(), schedule.lambda_t(t_0).item(), num + 1, dtype=torch.float64)
        return schedule.inverse_lambda(lam)
    raise ValueError(f"unknown step spacing {skip!r}; choose from {', '.join(SPACINGS)}")


def singlestep_orders(steps, order):
    """Orders of the singlestep segments, summing to `steps` evaluations (as DPM-Solver's code).

    Order 3 is DPM-Solver-fast: K = steps // 3 + 1 segments, all third order but the last one
    or two, which are lower order so that the evaluations add up exactly.
    """
    if order == 1:
        return [1] * steps
    if order == 2:
        return [2] * (steps // 2) + [1] * (steps % 2)
    K = steps // 3 + 1
    return {0: [3] * (K - 2) + [2, 1], 1: [3] * (K - 1) + [1], 2: [3] * (K - 1) + [2]}[steps % 3]


def dpm_solver_sample(eps_fn, x_T, steps, order=DEFAULT_SAMPLER["order"], method=DEFAULT_SAMPLER["method"],
                      skip=DEFAULT_SAMPLER["skip"], schedule=None, progress=None):
    """Solve the probability-flow ODE from n = 1000 (t = 1) to n = 1 (t = 1/1000) with DPM-Solver++.

    eps_fn(x, n): noise prediction, n a float tensor [B] on the 0..1000 step scale (n = 1000 t).
    steps: number of eps_fn evaluations. order: 1, 2 or 3.
    method: 'multistep', DPM-Solver++(kM): one evaluation per step, the update uses the last k
      data predictions; or 'singlestep', DPM-Solver++(kS): segments of singlestep_orders, each
      evaluating at its start and at k - 1 points inside it.
    skip: spacing of the step (multistep) or segment (singlestep) boundaries, one of SPACINGS.
    schedule: a DiscreteSchedule (default: the release's). progress(done, steps) is called after
    each evaluation. Returns x at t = 1/1000 (n = 1), as the release does.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; choose from {ORDERS}")
    if skip not in SPACINGS:
        raise ValueError(f"unknown step spacing {skip!r}; choose from {', '.join(SPACINGS)}")
    if steps < order:
        raise ValueError(f"steps ({steps}) must be at least the order ({order})")
    ns = DiscreteSchedule() if schedule is None else schedule
    n_dtype = torch.float64 if x_T.dtype == torch.float64 else torch.float32
    evals = 0

    def x0_pred(x, t):
        """Data prediction x0 = (x_t - sigma_t eps) / alpha_t at the scalar time t."""
        nonlocal evals
        n = NUM_TIMESTEPS * float(t)
        eps = eps_fn(x, torch.full((x.shape[0],), n, dtype=n_dtype, device=x.device))
        evals += 1
        if eps.shape != x.shape:
            raise ValueError(f"eps_fn returned shape {list(eps.shape)} for x of shape {list(x.shape)}")
        if not bool(torch.isfinite(eps).all()):
            raise FloatingPointError(f"eps_fn returned NaN/inf at n = {n:.3f} (evaluation {evals} of {steps})")
        if progress is not None:
            progress(evals, steps)
        return (x - float(ns.sigma_t(t)) * eps) / float(ns.alpha_t(t))

    def lam(t):
        return float(ns.lambda_t(t))

    def taylor_step(x, s, t, D0, D1=0.0, D2=0.0):
        """The expansion above from s to t; first order (DDIM) when D1 = D2 = 0."""
        h = lam(t) - lam(s)
        phi1 = math.expm1(-h)
        phi2 = phi1 / h + 1.0
        phi3 = phi2 / h - 0.5
        alpha_t = float(ns.alpha_t(t))
        return float(ns.sigma_t(t) / ns.sigma_t(s)) * x - alpha_t * (phi1 * D0 - phi2 * D1 + phi3 * D2)

    def second_order_step(x, s, t, m0, m1, r):
        """DPM-Solver++(2S) / (2M): m0 at lambda_s, m1 at lambda_s + r h (r < 0: a previous step).

        x_t = (sigma_t / sigma_s) x_s - alpha_t phi1 (m0 + (m1 - m0) / (2 r)): the D1 term with
        h/2 ~ -phi1/2 in place of phi2, as in the papers' algorithms.
        """
        return taylor_step(x, s, t, m0 + (m1 - m0) / (2 * r))

    def t_at(s, t, r):
        """The time at logSNR fraction r of the step from s to t."""
        return ns.inverse_lambda(lam(s) + r * (lam(t) - lam(s)))

    if method == "multistep":
        ts = time_steps(ns, skip, steps)
        x, history = x_T, []  # data predictions at ts[i], ts[i-1], ts[i-2], newest first
        for i in range(steps):
            history = [x0_pred(x, ts[i])] + history[:2]
            s, t = ts[i], ts[i + 1]
            h = lam(t) - lam(s)
            k = min(order, i + 1)  # warm-up: too little history for order k yet
            if k == 1:  # DDIM
                x_first, x = x, taylor_step(x, s, t, history[0])
            elif k == 2 and order == 3:
                # A first-order first step has local error O(h^2), which would leave third order
                # with an O(h^2) global error: the DDIM step to ts[1] only served to evaluate
                # there, and x at ts[2] comes from x at ts[0] by DPM-Solver++(2S) through ts[1].
                r1 = (lam(ts[1]) - lam(ts[0])) / (lam(ts[2]) - lam(ts[0]))
                x = second_order_step(x_first, ts[0], t, history[1], history[0], r1)
            elif k == 2:  # DPM-Solver++(2M)
                x = second_order_step(x, s, t, history[0], history[1], (lam(ts[i - 1]) - lam(s)) / h)
            else:  # third order: D1, D2 from backward differences at lambda_s - r0 h, - (r0 + r1) h
                r0 = (lam(s) - lam(ts[i - 1])) / h
                r1 = (lam(ts[i - 1]) - lam(ts[i - 2])) / h
                D1_0 = (history[0] - history[1]) / r0  # ~ D1 - (r0 / 2) D2
                D1_1 = (history[1] - history[2]) / r1  # ~ D1 - (r0 + r1 / 2) D2
                D2 = (D1_0 - D1_1) * (2.0 / (r0 + r1))
                x = taylor_step(x, s, t, history[0], D1_0 + D2 * (r0 / 2), D2)
        return x

    orders = singlestep_orders(steps, order)
    ts = time_steps(ns, skip, len(orders))
    x = x_T
    for i, k in enumerate(orders):
        s, t = ts[i], ts[i + 1]
        m0 = x0_pred(x, s)
        if k == 1:  # DDIM
            x = taylor_step(x, s, t, m0)
        elif k == 2:  # DPM-Solver++(2S) with r1 = 1/2: DDIM to the logSNR midpoint, evaluate there
            s1 = t_at(s, t, 0.5)
            m1 = x0_pred(taylor_step(x, s, s1, m0), s1)
            x = second_order_step(x, s, t, m0, m1, 0.5)
        else:  # DPM-Solver-3 in data prediction, r1 = 1/3, r2 = 2/3
            r1, r2 = 1.0 / 3.0, 2.0 / 3.0
            s1, s2 = t_at(s, t, r1), t_at(s, t, r2)
            m1 = x0_pred(taylor_step(x, s, s1, m0), s1)
            m2 = x0_pred(taylor_step(x, s, s2, m0, (r2 / r1) * (m1 - m0)), s2)  # second order to s2
            # With r2 = 2/3, phi2 (m2 - m0) / r2 also carries the D2 term to third order.
            x = taylor_step(x, s, t, m0, (m2 - m0) / r2)
    return x


def ddpm_sample(eps_fn, x_T, generator=None, schedule=None, progress=None):
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2), n = 1000 .. 1: 1000 evaluations, returns x_0.

    x_{n-1} = (x_n - beta_n / sqrt(1 - alpha_bar_n) eps) / sqrt(1 - beta_n) + sqrt(beta~_n) z, with
    the posterior variance beta~_n = beta_n (1 - alpha_bar_{n-1}) / (1 - alpha_bar_n) and no
    noise at the last step. generator: one torch.Generator for the batch, or a list of CPU
    generators, one per row, so that row i's noise z does not depend on the other rows.
    """
    ns = DiscreteSchedule() if schedule is None else schedule
    n_dtype = torch.float64 if x_T.dtype == torch.float64 else torch.float32
    x = x_T

    def noise():  # z ~ N(0, I) like x
        if isinstance(generator, (list, tuple)):
            return torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype) for g in generator]).to(x.device)
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)

    for n in range(NUM_TIMESTEPS, 0, -1):
        eps = eps_fn(x, torch.full((x.shape[0],), float(n), dtype=n_dtype, device=x.device))
        if not bool(torch.isfinite(eps).all()):
            raise FloatingPointError(f"eps_fn returned NaN/inf at n = {n}")
        beta, alpha_bar = float(ns.betas[n - 1]), float(ns.alphas_cumprod[n - 1])
        x = (x - beta / math.sqrt(1 - alpha_bar) * eps) / math.sqrt(1 - beta)
        if n > 1:
            posterior_var = beta * (1 - float(ns.alphas_cumprod[n - 2])) / (1 - alpha_bar)
            x = x + math.sqrt(posterior_var) * noise()
        if progress is not None:
            progress(NUM_TIMESTEPS + 1 - n, NUM_TIMESTEPS)
    return x


# ----------------------------------------------------------------------------------------------
# 5. Gaussian benchmark: `python diffusion.py`
# ----------------------------------------------------------------------------------------------
# For data x0 ~ N(mu, diag(s^2)), x_t ~ N(alpha_t mu, alpha_t^2 s^2 + sigma_t^2), the optimal noise
# predictor is eps(x, t) = sigma_t (x - alpha_t mu) / (alpha_t^2 s^2 + sigma_t^2), and the
# probability-flow ODE keeps z = (x_t - alpha_t mu) / sqrt(alpha_t^2 s^2 + sigma_t^2) constant.
# Along it x0(lambda) moves most near lambda = -log s, so the spread of s decides where steps matter.

def gaussian_problem(spectrum, side, batch, seed):
    """mu, s [side^2] and x_T [batch, side^2] from the t = 1 marginal, float64.

    'image': one side x side latent channel in an orthonormal 2D cosine basis, mode (u, v) with
    variance proportional to 1 / (1 + u^2 + v^2) (a natural-image-like spectrum), scaled to mean
    variance 1 like the scaled latents; RMS errors are then per-pixel errors. s spans about
    0.27..12 for side 32. 'two-scale': s = 0.5 and 2 in alternate dimensions (the s of the tests).
    mu is uniform in [-1, 1].
    """
    g = torch.Generator().manual_seed(seed)
    u = torch.arange(side, dtype=torch.float64)
    if spectrum == "image":
        var = 1.0 / (1.0 + u[:, None] ** 2 + u[None, :] ** 2)
        s = (var / var.mean()).sqrt().reshape(-1)
    else:
        s = torch.tensor([0.5, 2.0], dtype=torch.float64).repeat(side * side)[: side * side]
    mu = torch.rand(side * side, generator=g, dtype=torch.float64) * 2 - 1
    ns = DiscreteSchedule()
    alpha, sigma = ns.alpha_t(1.0), ns.sigma_t(1.0)
    z = torch.randn(batch, side * side, generator=g, dtype=torch.float64)
    return mu, s, alpha * mu + torch.sqrt(alpha ** 2 * s ** 2 + sigma ** 2) * z


def gaussian_error(mu, s, x_T, **solver):
    """RMS distance between the solver's x at t = 1/1000 and the exact PF-ODE solution."""
    ns = DiscreteSchedule()

    def eps_fn(x, n):
        t = n[0] / NUM_TIMESTEPS
        alpha, sigma = ns.alpha_t(t), ns.sigma_t(t)
        return sigma * (x - alpha * mu) / (alpha ** 2 * s ** 2 + sigma ** 2)

    def marginal(t):
        alpha, sigma = ns.alpha_t(t), ns.sigma_t(t)
        return alpha * mu, torch.sqrt(alpha ** 2 * s ** 2 + sigma ** 2)

    (m_T, sd_T), (m_0, sd_0) = marginal(1.0), marginal(1.0 / NUM_TIMESTEPS)
    exact = m_0 + sd_0 * (x_T - m_T) / sd_T
    x = dpm_solver_sample(eps_fn, x_T, schedule=ns, **solver)
    return torch.sqrt(torch.mean((x - exact) ** 2)).item()


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Print the error of every DPM-Solver configuration against the exact probability-flow "
                    "ODE solution on Gaussian data N(mu, diag(s^2)): RMS over all samples and dimensions "
                    "at t = 1/1000 (n = 1), per number of model evaluations, as a markdown table.")
    parser.add_argument("--spectrum", choices=["image", "two-scale"], default="image",
                        help="'image': s from a natural-image-like spectrum on a side x side grid; "
                             "'two-scale': s = 0.5 and 2 alternately (the s of the tests)")
    parser.add_argument("--side", type=int, default=32, help="grid side; the data has side^2 dimensions")
    parser.add_argument("--batch", type=int, default=32, help="number of samples x_T")
    parser.add_argument("--evals", type=int, nargs="+", default=[10, 20, 50, 100],
                        help="numbers of model evaluations (the table's columns)")
    parser.add_argument("--seed", type=int, default=0, help="seed for mu and x_T")
    args = parser.parse_args(argv)
    if min(args.evals) < max(ORDERS) or args.side < 1 or args.batch < 1:
        print(f"error: need every --evals >= {max(ORDERS)} and --side, --batch >= 1", file=sys.stderr)
        return 2

    mu, s, x_T = gaussian_problem(args.spectrum, args.side, args.batch, args.seed)
    rows = [("release default: singlestep 3 time_uniform", RELEASE_SAMPLER),
            ("our default: singlestep 3 logSNR", DEFAULT_SAMPLER)]
    rows += [(f"{method} {order} {skip}", dict(order=order, method=method, skip=skip))
             for method in METHODS for order in ORDERS for skip in SPACINGS]
    print(f"| method order spacing \\ evaluations | {' | '.join(str(e) for e in args.evals)} |")
    print(f"|---|{'---|' * len(args.evals)}")
    for name, solver in rows:
        errors = [gaussian_error(mu, s, x_T, steps=e, **solver) for e in args.evals]
        print(f"| {name} | {' | '.join(f'{err:.2e}' for err in errors)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
