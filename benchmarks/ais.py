r"""Cost of annealed importance sampling against importance sampling at equal accuracy.

Two cases, one per run of the script:

- **linear-Gaussian** (the default): z ~ N(0, I_d), x | z ~ N(W z + b, sigma^2 I_D), whose
  log p(x) is exact, on ``--points`` points drawn from it. Both estimators start from the prior
  (the guide is the prior written as a guide), as in the AIS literature's comparisons.
- **MNIST** (``--mnist RUN_DIR``): a trained run's model and guide (its last checkpoint) on the
  first ``--points`` test images, binarized once from seed 0. Both estimators start from the
  trained guide's q(z|x), as users run them. The exact log p(x) is unknown: the reference is AIS
  with ``--reference-chains`` chains at each of ``--reference-steps`` (the longest is the
  reference; how far it moved from the one before says whether it has converged).

The contenders:

- ``ais C x T``: :func:`ppl_vae.ais.annealed_log_likelihood` with C chains, T annealing steps,
  ``--leapfrog`` leapfrog steps per transition;
- ``is K``: :func:`ppl_vae.importance.log_likelihood` with K draws per point.

Every setting runs ``--repeats`` times, interleaved (a slow spell of a shared machine hits all
alike); the error is the difference from the exact (or reference) log p(x), as a root mean
square and a mean over points and repeats, the time the median. For each AIS setting the table
gives the smallest K measured whose RMS error is at most AIS's, and the ratio of the two times:
above 1, AIS is cheaper for the same accuracy.

Run: ``python benchmarks/ais.py --threads 1 --write`` (updates docs/BENCHMARKS.md), and
``python benchmarks/ais.py --mnist RUN_DIR --threads 1 --repeats 2 --write``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from common import describe, interleave, medians, parse_args, sync, write_section
from torch import Tensor

from ppl_vae.ais import annealed_log_likelihood
from ppl_vae.importance import log_likelihood
from ppl_vae.runs import load_run

DEFAULTS = {  # per case: options left unset on the command line
    "linear-Gaussian": {"points": 50, "steps": "25,100,400", "ks": "100,1000,10000,100000,1000000"},
    "MNIST": {"points": 20, "steps": "10,30,100,300", "ks": "100,1000,10000,100000,300000"},
}


@dataclass
class Case:
    """What the contenders estimate: programs, points and the log p(x) they are judged by."""

    name: str  # the section title's case, a key of DEFAULTS
    model: Callable
    guide: Callable  # where both estimators start
    x: Tensor
    reference: Tensor  # (N,) float64: exact, or the longest reference AIS
    setting: str  # a sentence describing the model, the points and the reference


def linear_gaussian(args: argparse.Namespace, device: torch.device) -> Case:
    """The model, the prior as a guide, points drawn from the model and their exact log p(x)."""
    latent, dim, sigma = args.latent, args.dim, args.sigma
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
    x = marginal.sample((args.points,))
    setting = (
        f"linear-Gaussian model, z of dimension {latent}, x of dimension {dim}, sigma {sigma}; "
        f"{args.points} points drawn from it; both estimators start from the prior"
    )
    return Case("linear-Gaussian", model, prior, x, marginal.log_prob(x).double(), setting)


def mnist(args: argparse.Namespace, device: torch.device) -> Case:
    """A trained run on its first test images, and the reference AIS of their log p(x)."""
    run = load_run(args.mnist, device.type, checkpoint="last")
    x = run.data.encode(run.data.test[: args.points], torch.Generator(device).manual_seed(0))
    chains, steps = args.reference_chains, [int(t) for t in args.reference_steps.split(",")]
    options = {"num_chains": chains, "leapfrog_steps": args.leapfrog}
    estimates, seconds = [], []
    for t in steps:
        sync(device)
        start = time.perf_counter()
        estimates.append(annealed_log_likelihood(run.model, run.guide, x, num_steps=t, **options))
        sync(device)
        seconds.append(time.perf_counter() - start)
    vae, epoch = run.config.vae, (run.checkpoint or {}).get("epoch")
    hidden = "-".join(str(h) for h in vae.network.hidden)
    setting = (
        f"MNIST, the run `{args.mnist}` (MLP 784-{hidden}, z = {vae.latent_dim}, "
        f"{vae.network.activation}, guide `{vae.guide}`, loss `{run.config.train.loss}`, "
        f"checkpoint of epoch {epoch}); the first {args.points} test images, binarized once "
        f"from seed 0; both estimators start from the trained guide q(z|x). Reference log p(x): "
        f"AIS {chains} x {steps[-1]} ({seconds[-1]:.0f} s for the {args.points} points)"
    )
    if len(steps) > 1:
        moved = estimates[-1] - estimates[-2]
        setting += (
            f"; it differs from AIS {chains} x {steps[-2]} by {moved.mean():+.3f} nats on "
            f"average (RMS {moved.pow(2).mean().sqrt():.3f}, largest "
            f"{moved.abs().max():.3f})"
        )
    return Case("MNIST", run.model, run.guide, x, estimates[-1], setting)


CASES = {"linear-Gaussian": linear_gaussian, "MNIST": mnist}


def measure(case: Case, args: argparse.Namespace, steps, ks, device) -> dict[str, tuple]:
    """``{name: (rms error, mean error, seconds per point)}`` for every contender, in order."""

    def ais(t):
        return lambda: annealed_log_likelihood(
            case.model, case.guide, case.x, num_chains=args.chains, num_steps=t,
            leapfrog_steps=args.leapfrog,
        )  # fmt: skip

    def importance(k):
        return lambda: log_likelihood(case.model, case.guide, case.x, num_samples=k)

    contenders = {f"ais {args.chains} x {t}": ais(t) for t in steps}
    contenders |= {f"is {k}": importance(k) for k in ks}
    errors: dict[str, list[Tensor]] = {name: [] for name in contenders}
    times = medians(
        interleave(
            contenders, args.repeats, device,
            report=lambda name, s, est: errors[name].append(est.cpu() - case.reference.cpu()),
        )
    )  # fmt: skip
    points = len(case.x)
    result = {}
    for name, found in errors.items():
        e = torch.cat(found)
        result[name] = (e.pow(2).mean().sqrt().item(), e.mean().item(), times[name] / points)
    return result


def report(case: Case, args: argparse.Namespace, steps, ks, device) -> str:
    """The section's text: the setting, every contender's error and time, the equal-accuracy
    table."""
    measured = measure(case, args, steps, ks, device)
    rows = [
        f"| {name} | {rms:.3f} | {mean:+.3f} | {1e3 * seconds:.2f} |"
        for name, (rms, mean, seconds) in measured.items()
    ]
    lines = []
    for t in steps:
        name = f"ais {args.chains} x {t}"
        rms, _, seconds = measured[name]
        enough = [k for k in ks if measured[f"is {k}"][0] <= rms]
        k = enough[0] if enough else ks[-1]
        ratio = measured[f"is {k}"][2] / seconds
        if enough:
            lines.append(f"| {name} | {k:,} | **{ratio:.2f}** |")
        else:
            lines.append(f"| {name} | > {k:,} | **> {ratio:.2f}** |")
    reference = "exact" if case.name == "linear-Gaussian" else "reference"
    return "\n".join(
        [
            f"{describe(device)}; {case.setting}. AIS with {args.leapfrog} leapfrog steps per "
            f"transition, sigmoid schedule, step size adapted toward 0.65; {args.repeats} "
            f"interleaved repeats (error: estimate minus the {reference} log p(x), RMS and mean "
            f"over points and repeats; time: median).",
            "",
            "| estimator | RMS error (nats) | mean error (nats) | ms per point |",
            "|---|---|---|---|",
            *rows,
            "",
            "| AIS setting | smallest K of IS as accurate (RMS) | IS time / AIS time |",
            "|---|---|---|",
            *lines,
        ]
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mnist", metavar="RUN_DIR", help="measure on this trained MNIST run")
    parser.add_argument("--points", type=int, help="points (default: 50; MNIST 20)")
    parser.add_argument("--latent", type=int, default=5, help="d, the dimension of z")
    parser.add_argument("--dim", type=int, default=10, help="D, the dimension of x")
    parser.add_argument("--sigma", type=float, default=0.5)
    parser.add_argument("--chains", type=int, default=16)
    parser.add_argument("--steps", help="AIS annealing steps (T), a list (default: per case)")
    parser.add_argument("--leapfrog", type=int, default=5)
    parser.add_argument("--ks", help="IS draws, a list (default: per case)")
    parser.add_argument("--reference-chains", type=int, default=16, help="MNIST reference AIS")
    parser.add_argument(
        "--reference-steps", default="2000,4000", help="MNIST reference AIS steps, a list"
    )
    args, device = parse_args(parser, argv, repeats=3)
    name = "MNIST" if args.mnist else "linear-Gaussian"
    for option, default in DEFAULTS[name].items():
        if getattr(args, option) is None:
            setattr(args, option, default)
    pyro.set_rng_seed(0)
    case = CASES[name](args, device)
    steps = [int(s) for s in args.steps.split(",")]
    ks = [int(k) for k in args.ks.split(",")]
    body = report(case, args, steps, ks, device)
    print(body)
    if args.write:
        write_section(f"ais ({device.type}, {name})", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
