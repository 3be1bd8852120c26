r"""A learned mixture prior's log-density: torch's (draws, K, D) form against ppl_vae's.

``ppl_vae.priors`` takes the log-density of a mixture of diagonal Gaussians from the expanded
square as two float64 matrix products, (draws, K) values; ``MixtureSameFamily.log_prob``
forms the (draws, K, D) differences. Both are timed on the same draws, interleaved, at the
sizes importance sampling uses (``evaluate --chunk-size 20 --batch-size 100``: 2,000 draws)
and a training step's (100 draws), for the VampPrior's K = 500 and ``mog``'s default 10, with
the largest difference between the two values.

Run: ``python benchmarks/priors.py --threads 1 --write`` (``--write`` updates
docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import pyro.distributions as dist
import torch
from common import describe, parse_args, sync, write_section

from ppl_vae.priors import _mixture

LATENT = 50


def timed(distribution, z, device) -> float:
    """Seconds of one ``distribution.log_prob(z)``."""
    sync(device)
    t0 = time.perf_counter()
    distribution.log_prob(z)
    sync(device)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    args, device = parse_args(parser, argv, repeats=7)
    rows = []
    for k in (500, 10):
        for draws in (2000, 100):
            g = torch.Generator().manual_seed(0)
            loc = (0.5 * torch.randn(k, LATENT, generator=g)).to(device)
            scale = (0.03 + 0.3 * torch.rand(k, LATENT, generator=g)).to(device)
            logits = torch.randn(k, generator=g).to(device)
            ours = _mixture(logits, dist.Normal(loc, scale).to_event(1), ())
            torch_form = dist.MixtureSameFamily(
                dist.Categorical(logits=logits), dist.Normal(loc, scale).to_event(1)
            )
            pick = torch.randint(0, k, (draws,), generator=g)
            z = (loc.cpu()[pick] + 0.1 * torch.randn(draws, LATENT, generator=g)).to(device)
            times = {"torch": [], "ours": []}
            for _ in range(args.repeats):
                times["torch"].append(timed(torch_form, z, device))
                times["ours"].append(timed(ours, z, device))
            a, b = (statistics.median(times[n]) for n in ("torch", "ours"))
            diff = (ours.log_prob(z) - torch_form.log_prob(z)).abs().max().item()
            rows.append(
                f"| {k} | {draws:,} | {1e3 * a:.2f} | {1e3 * b:.2f} | **{b / a:.3f}** | "
                f"{diff:.1e} |"
            )
    table = "\n".join(
        [
            f"{describe(device)}; z of {LATENT} dimensions, float32 draws; milliseconds, medians "
            f"of {args.repeats} interleaved repeats.",
            "",
            "| components K | draws | torch (draws, K, D) ms | ppl_vae ms | ratio | "
            "max abs difference (nats) |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print(table)
    if args.write:
        write_section(f"mixture prior log-density ({device.type})", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
