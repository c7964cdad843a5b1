"""How accurately does each sampler solve the probability-flow ODE? (docs/samplers.md)

    python -m tools.sampler_error gaussian                      # exact solution in closed form
    python -m tools.sampler_error checkpoint CKPT --cfg-scale 1 # trained model: converged solution
    python -m tools.sampler_error checkpoint CKPT --rows release default --evals 10 12 50 250

Both print a markdown table: the RMS distance, over all samples and dimensions, between the
sampler's x at n = 1 and the ODE's solution from the same x_T, per number of model evaluations.

- gaussian: for data x0 ~ N(mu, diag(s^2)), x_t ~ N(alpha_t mu, alpha_t^2 s^2 + sigma_t^2), the
  optimal noise prediction is eps(x, t) = sigma_t (x - alpha_t mu) / (alpha_t^2 s^2 + sigma_t^2)
  and the ODE keeps z = (x_t - alpha_t mu) / sqrt(alpha_t^2 s^2 + sigma_t^2) constant. Along it x0
  moves most near lambda = -log s, so the spread of s decides where steps matter.
- checkpoint: the guided ODE of a trained model (the same guided_eps_fn that sample.py uses);
  its solution is the default sampler's at --reference-steps evaluations, and the table says how
  far that reference moved from half as many (it must be well below the errors it measures).
"""
import argparse
import json
import sys
import time

import torch

from diffusion import (B_H, DEFAULT_SAMPLER, FEW_STEPS, FEW_STEPS_SAMPLER, METHODS, NUM_TIMESTEPS,
                       ORDERS, RELEASE_SAMPLER, SPACINGS, DiscreteSchedule, guided_eps_fn,
                       ode_sample, sampler_name)
from support import checkpoints, distributed, provenance
from support.cli import Parser, add_threads_flag, number

# The named rows (--rows): the release's sampler, DPM-Solver++(3S), the UniPC candidates, and the
# default (ode_sample's, which depends on the steps).
ROWS = {"release": ("release (its dpm_solver.py 'fast')", RELEASE_SAMPLER),
        "dpm-3s": ("DPM-Solver++(3S)", dict(method="singlestep", order=3, spacing="logSNR")),
        **{f"unipc-{o}-{bh}{'-lof' * lof}": (f"UniPC-{o} {bh}{', lower-order final' * lof}",
                                             dict(method="unipc", order=o, spacing="logSNR", bh=bh,
                                                  lower_order_final=lof))
           for bh in B_H for o in (2, 3) for lof in (False, True)},
        "default": ("**default**", {})}


def rms(a, b):
    return torch.sqrt(torch.mean((a.double() - b.double()) ** 2)).item()


def gaussian_problem(spectrum, side, batch, seed):
    """mu, s [side^2] and x_T [batch, side^2] from the t = 1 marginal, float64.

    'image': one side x side latent channel in an orthonormal 2D cosine basis, mode (u, v) with
    variance proportional to 1 / (1 + u^2 + v^2) (a natural-image-like spectrum), scaled to mean
    variance 1 like the scaled latents. 'two-scale': s = 0.5 and 2 in alternate dimensions.
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
    schedule = DiscreteSchedule()
    alpha, sigma = schedule.alpha_t(1.0), schedule.sigma_t(1.0)
    z = torch.randn(batch, side * side, generator=g, dtype=torch.float64)
    return mu, s, alpha * mu + torch.sqrt(alpha ** 2 * s ** 2 + sigma ** 2) * z


def gaussian_solution(mu, s, x_T):
    """The optimal eps_fn of N(mu, diag(s^2)) and the exact ODE solution at n = 1 from x_T."""
    schedule = DiscreteSchedule()

    def marginal(t):  # mean and standard deviation of x_t
        alpha, sigma = schedule.alpha_t(t), schedule.sigma_t(t)
        return alpha * mu, torch.sqrt(alpha ** 2 * s ** 2 + sigma ** 2)

    def eps_fn(x, n):
        t = (n.double() / NUM_TIMESTEPS)[:, None]
        alpha, sigma = schedule.alpha_t(t), schedule.sigma_t(t)
        return (sigma * (x.double() - alpha * mu) / (alpha ** 2 * s ** 2 + sigma ** 2)).to(x.dtype)

    (m_T, sd_T), (m_0, sd_0) = marginal(1.0), marginal(1.0 / NUM_TIMESTEPS)
    return eps_fn, m_0 + sd_0 * (x_T - m_T) / sd_T


def table(rows, evals, eps_fn, x_T, solution):
    """Print the markdown table row by row; return {row name: [error per evaluation count]}."""
    print(f"| sampler \\ evaluations | {' | '.join(str(e) for e in evals)} |")
    print(f"|---|{'---|' * len(evals)}")
    errors = {}
    for name, solver in rows:
        errors[name] = [rms(ode_sample(eps_fn, x_T, e, **solver), solution) for e in evals]
        print(f"| {name} | {' | '.join(f'{err:.2e}' for err in errors[name])} |", flush=True)
    return errors


def main(argv=None):
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--evals", type=number(int, max(ORDERS)), nargs="+",
                        default=[10, 20, 50, 100],
                        help="numbers of model evaluations (the table's columns)")
    common.add_argument("--seed", type=number(int, 0), default=0,
                        help="seed of x_T (and of mu for gaussian)")
    common.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), metavar="ROW",
                        help=f"the named rows to measure (default all): {', '.join(ROWS)}")
    common.add_argument("--all", action="store_true",
                        help="also every method x order x spacing (x UniPC B(h))")
    common.add_argument("--json", default=None,
                        help="also write the table as JSON (docs/data/, for tools/figures.py)")
    add_threads_flag(common)
    p = Parser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("gaussian", parents=[common],
                       help="Gaussian data: the exact solution is known")
    g.add_argument("--spectrum", choices=["image", "two-scale"], default="image",
                   help="'image': s from a natural-image-like spectrum; 'two-scale': s = 0.5 and 2")
    g.add_argument("--side", type=number(int, 1), default=32,
                   help="grid side; the data has side^2 dimensions")
    g.add_argument("--batch", type=number(int, 1), default=32, help="number of samples x_T")
    c = sub.add_parser("checkpoint", parents=[common],
                       help="a trained model: against a converged solution")
    c.add_argument("checkpoint",
                   help="train.py checkpoint (EMA weights) or tools/convert.py output")
    c.add_argument("--num-images", type=number(int, 1), default=40,
                   help="samples x_T (seeds 0..N-1)")
    c.add_argument("--cfg-scale", dest="guidance", type=number(float, 0), default=1.0,
                   help="guidance s, as sample.py (eps_c + s (eps_c - eps_u)); 0 = none")
    c.add_argument("--reference-steps", type=number(int, 2 * max(ORDERS)), default=1000,
                   help="evaluations of the default sampler for the converged solution")
    args = p.parse_args(argv)
    distributed.run_main(lambda: run(args, sys.argv[1:] if argv is None else argv))


def run(args, argv):
    start = time.time()
    distributed.set_threads(args.threads)
    every = [dict(method=m, order=o, spacing=spacing, bh=bh, lower_order_final=False)
             for m in METHODS for o in ORDERS for spacing in SPACINGS
             for bh in (B_H if m == "unipc" else B_H[:1])]
    rows = [ROWS[key] for key in args.rows] + [(sampler_name(x), x) for x in every] * args.all
    print(f"release = {sampler_name(RELEASE_SAMPLER)}; default = "
          f"{sampler_name(DEFAULT_SAMPLER)}, below {FEW_STEPS} evaluations "
          f"{sampler_name(FEW_STEPS_SAMPLER)}")
    record = {k: v for k, v in vars(args).items() if k not in ("json", "threads")}
    if args.command == "gaussian":
        mu, s, x_T = gaussian_problem(args.spectrum, args.side, args.batch, args.seed)
        eps_fn, solution = gaussian_solution(mu, s, x_T)
    else:
        model, _ = checkpoints.load_model(args.checkpoint)
        config = model.config
        y = torch.arange(args.num_images) % config.num_classes
        g = torch.Generator().manual_seed(args.seed)
        x_T = torch.randn(args.num_images, config.in_channels, config.input_size,
                          config.input_size, generator=g)
        eps_fn = torch.no_grad()(guided_eps_fn(model, y, args.guidance, config.num_classes))
        solution = ode_sample(eps_fn, x_T, args.reference_steps)
        half = ode_sample(eps_fn, x_T, args.reference_steps // 2)
        record["reference_change"] = rms(solution, half)
        print(f"reference: default sampler at {args.reference_steps} evaluations; RMS change "
              f"from {args.reference_steps // 2}: {record['reference_change']:.1e}")
    record["errors"] = table(rows, args.evals, eps_fn, x_T, solution)
    record["this_call"] = provenance.record("python -m tools.sampler_error", argv, start)
    if args.json:
        checkpoints.write_text(args.json, json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
