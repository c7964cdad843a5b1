"""Time-dependent layer normalisation (paper Sec. 3.3, "TD-LN").

DiMR feeds the diffusion time into the network *only* through its normalisation layers: every
gain and bias is a time-dependent parameter, an interpolation between two learned vectors,

    paper (Eq. 5):  s = sigmoid(w t + b),   gamma = s p1 + (1 - s) p2
    release form:   gamma(t~) = p1 + sigmoid((1 + w) t~ + b) (p0 - p1)

which is the same family: the paper's time t is t~ here, the release's p0/p1 are the paper's
p1/p2, and its w is offset by one. The paper's s, the interpolation weight, is `weight` here
(s is the guidance elsewhere).
We use the release form so that the authors' checkpoints load unchanged. Compared with
adaLN-Zero (DiT), which spends a (D x 6D) matrix per block on the time embedding, a TD parameter
costs 4 vectors of width D.

Time here is t~ in [-1, 1], the DDPM step n in 0..T (T = 1000) rescaled: t~ = 2 n / T - 1. The
release computes it as ((n / T) * 8 - 4) / 4 and calls the intermediate value "log_snr" although
it is only a rescaled step. Every function here takes t~ per sample, shape (B,), so a batch may
mix steps. This file imports nothing from the project: it is the first one to read.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

NUM_TIMESTEPS = 1000  # T: the DDPM steps n = 1..T, the scale of n (diffusion.py has T betas)
RMS_EPS = 1e-8  # added to rms(x), not inside the square root (as in the release)
LN_EPS = 1e-5


def t_tilde(n):
    """DDPM step n, float (B,) on the 0..T scale -> t~ = ((n / T) * 8 - 4) / 4 in [-1, 1], (B,)."""
    return (n / NUM_TIMESTEPS * 8 - 4) / 4


class TimeDependentParameter(nn.Module):
    """A vector of width `dim` whose value depends on t~: p1 + sigmoid((1 + w) t~ + b) (p0 - p1).

    p0 = p1 = `init` at initialisation, so the value starts constant in time; w and b start at 0
    and are the only parameters training exempts from weight decay (train.param_groups, as the
    release: its `nodecay_weight`, `nodecay_bias`); p0 and p1 decay like every other parameter.
    """

    def __init__(self, dim, init):
        super().__init__()
        self.p0 = nn.Parameter(torch.full((dim,), float(init)))
        self.p1 = nn.Parameter(torch.full((dim,), float(init)))
        self.w = nn.Parameter(torch.zeros(dim))
        self.b = nn.Parameter(torch.zeros(dim))

    def forward(self, t_tilde):                                       # (B,)
        weight = torch.sigmoid((1 + self.w) * t_tilde[:, None] + self.b)  # (B, dim)
        return self.p1 + weight * (self.p0 - self.p1)                    # (B, dim)


def per_sample(v, x):
    """(B, D) -> (B, 1, ..., 1, D), broadcastable against channels-last x of any rank."""
    return v.view(v.shape[0], *([1] * (x.dim() - 2)), v.shape[1])


class TDRMSNorm(nn.Module):
    """TD-RMSNorm, the blocks' pre-norm: x / (rms(x) + eps) * gamma(t~), rms over the last dim."""

    def __init__(self, dim):
        super().__init__()
        self.gamma = TimeDependentParameter(dim, 1.0)

    def forward(self, x, t_tilde):                                    # x: (B, ..., D), t~: (B,)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # at least float32 under autocast
        rms = xf.pow(2).mean(-1, keepdim=True).sqrt()
        return (xf / (rms + RMS_EPS)).type_as(x) * per_sample(self.gamma(t_tilde), x).type_as(x)


class TDLayerNorm(nn.Module):
    """TD-LayerNorm of the output heads and the feature cascade: LN(x) gamma(t~) + beta(t~)."""

    def __init__(self, dim):
        super().__init__()
        self.gamma = TimeDependentParameter(dim, 1.0)
        self.beta = TimeDependentParameter(dim, 0.0)

    def forward(self, x, t_tilde):                                    # x: (B, ..., D), t~: (B,)
        x = F.layer_norm(x, x.shape[-1:], eps=LN_EPS)
        return x * per_sample(self.gamma(t_tilde), x) + per_sample(self.beta(t_tilde), x)
