r"""Annealed importance sampling with its evaluations recorded (the default) against the
programs run at every leapfrog step (``capture=False``), on the reference VAE.

The reference architecture (MLP 784-200-200, z = 50, tanh, built from seed 0: the cost of an
evaluation does not depend on training) on the first ``--points`` MNIST test images,
binarized from seed 0; :func:`ppl_vae.ais.annealed_log_likelihood` with ``--chains`` chains,
``--steps`` annealing steps and 5 leapfrog steps per transition, from the same seed for both,
interleaved, medians; milliseconds per point, and the largest difference between the two
estimates.

Run: ``python benchmarks/ais_capture.py --threads 1 --write`` (``--write`` updates
docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import pyro
import torch
from common import describe, mnist, parse_args, reference_vae, sync, write_section

from ppl_vae.ais import annealed_log_likelihood


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", type=int, default=20)
    parser.add_argument("--chains", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    args, device = parse_args(parser, argv, repeats=5)
    _, model, guide = reference_vae(device)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.bernoulli(mnist(device).test[: args.points], generator=g)
    times, estimates = {True: [], False: []}, {}
    for _ in range(args.repeats):
        for capture in (True, False):
            pyro.set_rng_seed(0)
            sync(device)
            t0 = time.perf_counter()
            estimates[capture] = annealed_log_likelihood(
                model, guide, x, num_chains=args.chains, num_steps=args.steps, capture=capture
            )
            sync(device)
            times[capture].append(time.perf_counter() - t0)
    recorded, programs = (1e3 * statistics.median(times[c]) / args.points for c in (True, False))
    ratio = statistics.median(a / b for a, b in zip(times[True], times[False], strict=True))
    diff = (estimates[True] - estimates[False]).abs().max().item()
    row = (
        f"| AIS {args.chains} x {args.steps}, 5 leapfrog steps | {programs:.1f} | "
        f"{recorded:.1f} | **{ratio:.3f}** | {diff:.1e} |"
    )
    table = "\n".join(
        [
            f"{describe(device)}; reference VAE (untrained), the first {args.points} MNIST test "
            f"images; ms per point, medians of {args.repeats} interleaved repeats (the recorded "
            f"runs include making their records); ratio: median of per-repeat ratios.",
            "",
            "| estimator | programs every step, ms/point | recorded, ms/point | recorded / "
            "programs | max abs difference (nats) |",
            "|---|---|---|---|---|",
            row,
        ]
    )
    print(table)
    if args.write:
        write_section(f"ais recorded ({device.type})", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
