r"""Cost of annealed importance sampling against importance sampling at equal accuracy.

The linear-Gaussian model z ~ N(0, I_d), x | z ~ N(W z + b, sigma^2 I_D), whose log p(x) is
exact, on ``--points`` points drawn from it. Both estimators start from the prior (the guide is
the prior written as a guide), as in the AIS literature's comparisons:

- ``ais C x T``: :func:`ppl_vae.ais.annealed_log_likelihood` with C chains, T annealing steps,
  ``--leapfrog`` leapfrog steps per transition;
- ``is K``: :func:`ppl_vae.importance.log_likelihood` with K draws per point.

Every setting runs ``--repeats`` times, interleaved (a slow spell of a shared machine hits all
alike); the error is the root-mean-square difference from the exact log p(x) over points and
repeats, the time the median. For each AIS setting the table gives the smallest K measured
whose error is at most AIS's, and the ratio of the two times: above 1, AIS is cheaper for the
same accuracy.

Run: ``python benchmarks/ais.py --threads 1 --write`` (updates docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import math
import sys

import pyro
import pyro.distributions as dist
import torch
from common import describe, interleave, medians, parse_args, write_section

from ppl_vae.ais import annealed_log_likelihood
from ppl_vae.importance import log_likelihood


def linear_gaussian(latent: int, dim: int, sigma: float, points: int, device: torch.device):
    """The model, the prior as a guide, points drawn from the model and their exact log p(x)."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(dim, latent, generator=g) / math.sqrt(latent) * 2).to(device)
    b = torch.randn(dim, generator=g).to(device)

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(latent, device=x.device), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ w.T + b, sigma).to_event(1), obs=x)

    def prior(x):
        with pyro.plate("data", len(x)):
            loc = torch.zeros(len(x), latent, device=x.device)
            pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))

    cov = w @ w.T + sigma**2 * torch.eye(dim, device=device)
    marginal = dist.MultivariateNormal(b, covariance_matrix=cov)
    x = marginal.sample((points,))
    return model, prior, x, marginal.log_prob(x).double()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", type=int, default=50)
    parser.add_argument("--latent", type=int, default=5, help="d, the dimension of z")
    parser.add_argument("--dim", type=int, default=10, help="D, the dimension of x")
    parser.add_argument("--sigma", type=float, default=0.5)
    parser.add_argument("--chains", type=int, default=16)
    parser.add_argument("--steps", default="25,100,400", help="AIS annealing steps (T), a list")
    parser.add_argument("--leapfrog", type=int, default=5)
    parser.add_argument("--ks", default="100,1000,10000,100000,1000000", help="IS draws")
    args, device = parse_args(parser, argv, repeats=3)
    pyro.set_rng_seed(0)
    model, prior, x, exact = linear_gaussian(args.latent, args.dim, args.sigma, args.points, device)
    steps = [int(s) for s in args.steps.split(",")]
    ks = [int(k) for k in args.ks.split(",")]

    def ais(t):
        return lambda: annealed_log_likelihood(
            model, prior, x, num_chains=args.chains, num_steps=t, leapfrog_steps=args.leapfrog
        )

    def importance(k):
        return lambda: log_likelihood(model, prior, x, num_samples=k)

    contenders = {f"ais {args.chains} x {t}": ais(t) for t in steps}
    contenders |= {f"is {k}": importance(k) for k in ks}
    squared: dict[str, list[float]] = {name: [] for name in contenders}
    times = medians(
        interleave(
            contenders, args.repeats, device,
            report=lambda name, s, est: squared[name].append(((est - exact) ** 2).mean().item()),
        )
    )  # fmt: skip
    rmse = {name: math.sqrt(sum(v) / len(v)) for name, v in squared.items()}
    per_point = {name: t / args.points for name, t in times.items()}
    rows = [f"| {name} | {rmse[name]:.3f} | {1e3 * per_point[name]:.2f} |" for name in contenders]
    lines = []
    for t in steps:
        name = f"ais {args.chains} x {t}"
        enough = [k for k in ks if rmse[f"is {k}"] <= rmse[name]]
        if enough:
            k = enough[0]
            lines.append(f"| {name} | {k:,} | **{times[f'is {k}'] / times[name]:.2f}** |")
        else:
            lines.append(
                f"| {name} | > {ks[-1]:,} | **> {times[f'is {ks[-1]}'] / times[name]:.2f}** |"
            )
    body = "\n".join(
        [
            f"{describe(device)}; linear-Gaussian model, z of dimension {args.latent}, x of "
            f"dimension {args.dim}, sigma {args.sigma}; {args.points} points drawn from it; both "
            f"estimators start from the prior; AIS with {args.leapfrog} leapfrog steps per "
            f"transition, sigmoid schedule, step size adapted toward 0.65; {args.repeats} "
            f"interleaved repeats (error: RMS over points and repeats; time: median).",
            "",
            "| estimator | RMS error (nats) | ms per point |",
            "|---|---|---|",
            *rows,
            "",
            "| AIS setting | smallest K of IS as accurate | IS time / AIS time |",
            "|---|---|---|",
            *lines,
        ]
    )
    print(body)
    if args.write:
        write_section(f"ais ({device.type}, linear-Gaussian)", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
