"""TD parameters and TD norms against the paper's closed forms (Sec. 3.3) and finite differences."""
import torch

from td_ln import TDLayerNorm, TDRMSNorm, TimeDependentParameter, time_input

torch.manual_seed(0)


def randomise(module, scale=0.5):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


def test_time_input_closed_form():
    n = torch.tensor([0.0, 1.0, 250.0, 500.0, 1000.0])
    assert torch.allclose(time_input(n), torch.tensor([-1.0, -0.998, -0.5, 0.0, 1.0]))


def test_td_parameter_equals_paper_form():
    """Paper Eq.: s = sigmoid(w t + b), gamma = s P1 + (1 - s) P2, with P1 = p0, P2 = p1, w = 1 + w'."""
    td = randomise(TimeDependentParameter(6, 1.0)).double()
    t = torch.tensor([-1.0, -0.3, 0.0, 0.7, 1.0], dtype=torch.float64)
    got = td(t)
    for i, ti in enumerate(t):
        for d in range(6):
            s = 1 / (1 + torch.exp(-((1 + td.w[d]) * ti + td.b[d])))
            want = s * td.p0[d] + (1 - s) * td.p1[d]
            assert abs(got[i, d].item() - want.item()) < 1e-12


def test_td_parameter_constant_at_init():
    td = TimeDependentParameter(5, 0.0)
    assert torch.equal(td(torch.linspace(-1, 1, 7)), torch.zeros(7, 5))


def test_td_parameter_gradient_matches_finite_differences():
    td = randomise(TimeDependentParameter(4, 1.0)).double()
    t = torch.tensor([-0.9, 0.1, 0.8], dtype=torch.float64)
    params = tuple(td.parameters())
    # the module's autograd gradient against central differences of the module itself
    out = td(t)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, params, g)
    eps = 1e-6
    for p, gp in zip(params, grads):
        for j in range(p.numel()):
            with torch.no_grad():
                p.view(-1)[j] += eps
                up = (td(t) * g).sum()
                p.view(-1)[j] -= 2 * eps
                down = (td(t) * g).sum()
                p.view(-1)[j] += eps
            assert abs((up - down).item() / (2 * eps) - gp.view(-1)[j].item()) < 1e-7


def test_td_layernorm_at_init_is_plain_layernorm():
    x = torch.randn(3, 5, 7, 16, dtype=torch.float64)
    t = torch.tensor([-1.0, 0.2, 1.0], dtype=torch.float64)
    got = TDLayerNorm(16).double()(x, t)
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    assert torch.allclose(got, (x - mean) / torch.sqrt(var + 1e-5), atol=1e-12)


def test_td_layernorm_random_closed_form():
    norm = randomise(TDLayerNorm(8)).double()
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    t = torch.tensor([-0.5, 0.9], dtype=torch.float64)
    got = norm(x, t)
    for i in range(2):
        g = norm.gamma.p1 + torch.sigmoid((1 + norm.gamma.w) * t[i] + norm.gamma.b) * (norm.gamma.p0 - norm.gamma.p1)
        bt = norm.beta.p1 + torch.sigmoid((1 + norm.beta.w) * t[i] + norm.beta.b) * (norm.beta.p0 - norm.beta.p1)
        xi = x[i]
        ln = (xi - xi.mean(-1, keepdim=True)) / torch.sqrt(xi.var(-1, unbiased=False, keepdim=True) + 1e-5)
        assert torch.allclose(got[i], ln * g + bt, atol=1e-12)


def test_td_rmsnorm_closed_form():
    norm = randomise(TDRMSNorm(12)).double()
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    t = torch.tensor([-1.0, 0.0, 0.6], dtype=torch.float64)
    got = norm(x, t)
    p = norm.gamma
    for i in range(3):
        s = 1 / (1 + torch.exp(-((1 + p.w) * t[i] + p.b)))
        g = s * p.p0 + (1 - s) * p.p1                       # the paper's form, written out
        for l in range(5):
            v = x[i, l]
            rms = v.norm() / 12 ** 0.5
            assert torch.allclose(got[i, l], v / (rms + 1e-8) * g, atol=1e-12)


def test_mixed_time_batch_equals_one_at_a_time():
    norm = randomise(TDLayerNorm(10))
    x = torch.randn(4, 3, 10)
    t = torch.tensor([-0.9, -0.1, 0.4, 1.0])
    batched = norm(x, t)
    for i in range(4):
        assert torch.allclose(batched[i:i + 1], norm(x[i:i + 1], t[i:i + 1]), atol=1e-6)
