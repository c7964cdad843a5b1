"""TD parameters and TD norms against the paper's closed forms (Sec. 3.3): values, the TD
parameter's gradient written out, and gradcheck (finite differences) of the norms."""
import pytest
import torch

from td_ln import TDLayerNorm, TDRMSNorm, TimeDependentParameter, t_tilde
from util import gradcheck_module

torch.manual_seed(0)
pytestmark = pytest.mark.usefixtures("single_thread")


def randomise(module, scale=0.5):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


def test_t_tilde_closed_form():
    n = torch.tensor([0.0, 1.0, 250.0, 500.0, 1000.0])
    assert torch.allclose(t_tilde(n), torch.tensor([-1.0, -0.998, -0.5, 0.0, 1.0]))


def test_td_parameter_equals_paper_form():
    """Paper Eq.: s = sigmoid(w t + b), gamma = s P1 + (1 - s) P2, with P1 = p0, P2 = p1,
    w = 1 + w'."""
    td = randomise(TimeDependentParameter(6, 1.0)).double()
    t_tilde = torch.tensor([-1.0, -0.3, 0.0, 0.7, 1.0], dtype=torch.float64)
    got = td(t_tilde)
    for i, ti in enumerate(t_tilde):
        for d in range(6):
            s = 1 / (1 + torch.exp(-((1 + td.w[d]) * ti + td.b[d])))
            want = s * td.p0[d] + (1 - s) * td.p1[d]
            assert abs(got[i, d].item() - want.item()) < 1e-12


def test_td_parameter_constant_at_init():
    td = TimeDependentParameter(5, 0.0)
    assert torch.equal(td(torch.linspace(-1, 1, 7)), torch.zeros(7, 5))


def test_td_parameter_gradient_closed_form():
    """gamma = p1 + s (p0 - p1), s = sigmoid(z), z = (1 + w) t~ + b, so with s' = s (1 - s):
    d/dp0 = s, d/dp1 = 1 - s, d/dw = s' t~ (p0 - p1), d/db = s' (p0 - p1),
    d/dt~ = s' (1 + w) (p0 - p1), each summed over the batch against the upstream gradient."""
    td = randomise(TimeDependentParameter(4, 1.0)).double()
    t_tilde = torch.tensor([-0.9, 0.1, 0.8, 1.0], dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(4, 4, dtype=torch.float64)
    got = torch.autograd.grad(td(t_tilde), (td.p0, td.p1, td.w, td.b, t_tilde), upstream)
    p0, p1, w, b = (p.detach() for p in (td.p0, td.p1, td.w, td.b))
    tt = t_tilde.detach()[:, None]                                            # (B, 1)
    s = 1 / (1 + torch.exp(-((1 + w) * tt + b)))                             # (B, D)
    ds = s * (1 - s) * (p0 - p1)
    want = [(upstream * s).sum(0), (upstream * (1 - s)).sum(0), (upstream * ds * tt).sum(0),
            (upstream * ds).sum(0), (upstream * ds * (1 + w)).sum(1)]
    assert (p0 - p1).abs().min() > 0.05 and w.abs().min() > 0 and b.abs().min() > 0
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("module, x_shape", [(TimeDependentParameter(3, 1.0), None),
                                             (TDLayerNorm(5), (3, 2, 4, 5)),
                                             (TDRMSNorm(5), (3, 4, 5))],
                         ids=["td-parameter", "td-layernorm", "td-rmsnorm"])
def test_gradcheck_in_inputs_and_parameters(module, x_shape):
    module = randomise(module).double()
    t_tilde = torch.tensor([-0.7, 0.2, 1.0], dtype=torch.float64, requires_grad=True)
    if x_shape is None:
        assert module(t_tilde).shape == (3, 3)
        assert gradcheck_module(module, t_tilde)
        return
    x = torch.randn(x_shape, dtype=torch.float64, requires_grad=True)
    assert module(x, t_tilde).shape == x_shape
    assert gradcheck_module(module, x, t_tilde)


def test_td_layernorm_at_init_is_plain_layernorm():
    x = torch.randn(3, 5, 7, 16, dtype=torch.float64)
    t_tilde = torch.tensor([-1.0, 0.2, 1.0], dtype=torch.float64)
    got = TDLayerNorm(16).double()(x, t_tilde)
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    assert torch.allclose(got, (x - mean) / torch.sqrt(var + 1e-5), atol=1e-12)


def test_td_layernorm_random_closed_form():
    """Random TD parameters, a batch that mixes times, each sample against the formula."""
    norm = randomise(TDLayerNorm(8)).double()
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    t_tilde = torch.tensor([-0.5, 0.9], dtype=torch.float64)
    got = norm(x, t_tilde)
    for i in range(2):
        g = norm.gamma.p1 + (torch.sigmoid((1 + norm.gamma.w) * t_tilde[i] + norm.gamma.b)
                             * (norm.gamma.p0 - norm.gamma.p1))
        bt = norm.beta.p1 + (torch.sigmoid((1 + norm.beta.w) * t_tilde[i] + norm.beta.b)
                             * (norm.beta.p0 - norm.beta.p1))
        xi = x[i]
        ln = (xi - xi.mean(-1, keepdim=True)) \
            / torch.sqrt(xi.var(-1, unbiased=False, keepdim=True) + 1e-5)
        assert torch.allclose(got[i], ln * g + bt, atol=1e-12)


def test_td_rmsnorm_closed_form():
    norm = randomise(TDRMSNorm(12)).double()
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    t_tilde = torch.tensor([-1.0, 0.0, 0.6], dtype=torch.float64)
    got = norm(x, t_tilde)
    p = norm.gamma
    for i in range(3):
        s = 1 / (1 + torch.exp(-((1 + p.w) * t_tilde[i] + p.b)))
        g = s * p.p0 + (1 - s) * p.p1                       # the paper's form, written out
        for l in range(5):
            v = x[i, l]
            rms = v.norm() / 12 ** 0.5
            assert torch.allclose(got[i, l], v / (rms + 1e-8) * g, atol=1e-12)
