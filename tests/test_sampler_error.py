"""tools/sampler_error.py: the Gaussian problem's exact solution against the closed form of
tests/test_diffusion.py (its own numpy schedule), and the trained-model table against the
distances recomputed here."""
import dataclasses
import re

import numpy as np
import pytest
import torch

from support import checkpoints
import diffusion
import dimr
from tools import sampler_error
from test_diffusion import alpha, sigma


def test_gaussian_solution_is_the_closed_form():
    """x_0 = alpha_0 mu + (x_T - alpha_T mu) sqrt(alpha_0^2 s^2 + sigma_0^2) / sqrt(alpha_T^2 s^2 +
    sigma_T^2): the probability-flow ODE keeps the standardised x constant; and the optimal eps."""
    mu, s, x_T = sampler_error.gaussian_problem("image", 4, 3, seed=1)
    eps_fn, solution = sampler_error.gaussian_solution(mu, s, x_T)
    mu_, s_, x_ = mu.numpy(), s.numpy(), x_T.numpy()

    def scale(t):
        return np.sqrt(alpha(t) ** 2 * s_ ** 2 + sigma(t) ** 2)

    expected = alpha(0.001) * mu_ + (x_ - alpha(1.0) * mu_) * scale(0.001) / scale(1.0)
    np.testing.assert_allclose(solution.numpy(), expected, rtol=1e-10, atol=1e-12)
    n = torch.full((3,), 400.0, dtype=torch.float64)
    t = 0.4
    eps = sigma(t) * (x_ - alpha(t) * mu_) / (alpha(t) ** 2 * s_ ** 2 + sigma(t) ** 2)
    np.testing.assert_allclose(eps_fn(x_T, n).numpy(), eps, rtol=1e-10, atol=1e-12)
    # and the samplers converge to it
    assert sampler_error.rms(diffusion.ode_sample(eps_fn, x_T, 200), solution) < 1e-6


def test_checkpoint_table_is_the_distance_to_the_converged_solution(tmp_path, capsys):
    torch.manual_seed(0)
    model = dimr.DiMR(dimr.get_config("s", widths=(32, 16), depths=(2, 2), num_heads=2)).eval()
    path = tmp_path / "c.pt"
    checkpoints.save({"config": dataclasses.asdict(model.config), "ema": model.state_dict()}, path)
    sampler_error.main(["checkpoint", str(path), "--num-images", "4", "--cfg-scale", "1",
                        "--reference-steps", "40", "--evals", "3", "6",
                        "--rows", "release", "default"])
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): [float(v) for v in line.split("|")[2:-1]]
            for line in out.splitlines() if re.match(r"\| (release|\*\*default)", line)}

    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(4) % 10
    with torch.no_grad():
        eps_fn = diffusion.guided_eps_fn(model, y, 1.0, 10)
        solution = diffusion.ode_sample(eps_fn, x_T, 40)
        for name, solver in (("release (its dpm_solver.py 'fast')", diffusion.RELEASE_SAMPLER),
                             ("**default**", {})):
            expected = [torch.sqrt(torch.mean((diffusion.ode_sample(eps_fn, x_T, n, **solver)
                                               - solution) ** 2)).item() for n in (3, 6)]
            np.testing.assert_allclose(rows[name], expected, rtol=0.01)


def test_errors_are_one_line(tmp_path):
    for argv in (["gaussian", "--evals", "2"], ["checkpoint", str(tmp_path / "missing.pt")]):
        with pytest.raises(SystemExit) as e:
            sampler_error.main(argv)
        assert str(e.value).startswith("error: ") and "\n" not in str(e.value)
