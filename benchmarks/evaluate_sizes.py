r"""``ppl-vae evaluate``'s batch and chunk sizes: throughput and peak memory over a grid.

For the reference architecture (MLP 784-200-200-z50, tanh, Bernoulli decoder), ``--points``
binarized MNIST test points are estimated at K = ``--samples`` draws each as ``evaluate`` does:
``--batch-size`` points at a time, each call of
:func:`ppl_vae.importance.log_likelihood_diagnostics` with the IWAE bounds, ``chunk`` draws per
vectorized pass, so that a pass decodes ``batch x chunk`` rows. On the CPU every setting runs
in its own process (a fresh heap, so that its peak RSS is its own); on CUDA all run in this
process, after an estimate that makes the libraries' workspaces, the allocator's peak
(``torch.cuda.max_memory_allocated``) reset before each. One untimed call first; settings are
visited in turn, the order rotated from repeat to repeat, and the median is reported.
Throughput is (points x samples) per second.

Run: ``python benchmarks/evaluate_sizes.py --threads 1 --write`` (updates docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from common import (
    describe,
    measured_apart,
    parse_args,
    peak_memory_mib,
    peak_memory_name,
    reference_vae,
    reset_peak_memory,
    sync,
    write_section,
)

from ppl_vae.importance import log_likelihood_diagnostics

BATCHES = (1, 10, 25, 100)
ROWS = (1_000, 10_000, 25_000, 100_000)  # decoder rows per pass, batch x chunk


def one_setting(points: int, samples: int, batch: int, chunk: int, device) -> dict:
    """Seconds for ``points`` points at K = ``samples``, after one untimed batch, and the growth
    of the device's peak memory (MiB) over both, from the model and data loaded."""
    data, model, guide = reference_vae(device)
    g = torch.Generator(device).manual_seed(0)
    x_all = torch.bernoulli(data.test[:points], generator=g)

    def estimate(xs):
        for start in range(0, xs.shape[0], batch):
            log_likelihood_diagnostics(
                model, guide, xs[start : start + batch], num_samples=samples, chunk_size=chunk,
                iwae_ks=(1, 10, 100),
            )  # fmt: skip

    base = reset_peak_memory(device)  # the model and the data loaded
    estimate(x_all[:batch])  # warm-up
    sync(device)
    t0 = time.perf_counter()
    estimate(x_all)
    sync(device)
    return {"seconds": time.perf_counter() - t0, "peak": peak_memory_mib(device) - base}


def measured(args: argparse.Namespace, batch: int, chunk: int, device) -> dict:
    """:func:`one_setting`: on CUDA in this process, on the CPU in a fresh one."""
    cmd = [__file__, "--one", str(batch), str(chunk)]
    cmd += ["--points", str(args.points), "--samples", str(args.samples)]
    cmd += ["--device", args.device, "--repeats", "1"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    here = lambda: one_setting(args.points, args.samples, batch, chunk, device)  # noqa: E731
    return measured_apart(device, here, cmd)


def settings(samples: int) -> list[tuple[int, int]]:
    """(batch, chunk) pairs of the grid; a chunk never exceeds K."""
    out = []
    for batch in BATCHES:
        for rows in ROWS:
            chunk = min(samples, max(1, rows // batch))
            if (batch, chunk) not in out:
                out.append((batch, chunk))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", type=int, default=200, help="data points per setting")
    parser.add_argument("--samples", type=int, default=1000, help="K")
    parser.add_argument(
        "--one", nargs=2, type=int, metavar=("BATCH", "CHUNK"), help=argparse.SUPPRESS
    )
    args, device = parse_args(parser, argv, repeats=2)
    if args.one:
        print(json.dumps(one_setting(args.points, args.samples, *args.one, device)))
        return 0
    grid = settings(args.samples)
    if device.type == "cuda":  # the first call's allocations (cuBLAS workspaces) in no setting
        one_setting(1, args.samples, 1, args.samples, device)
    runs: dict[tuple[int, int], list[dict]] = {s: [] for s in grid}
    for r in range(args.repeats):
        shift = r * len(grid) // args.repeats
        for batch, chunk in grid[shift:] + grid[:shift]:
            runs[batch, chunk].append(measured(args, batch, chunk, device))
            print(f"batch {batch}, chunk {chunk}: {runs[batch, chunk][-1]}", file=sys.stderr)
    draws = args.points * args.samples
    rows = [
        f"| batch | chunk | rows per pass | points x samples / s | {peak_memory_name(device)} "
        "growth |",
        "|---|---|---|---|---|",
    ]
    for batch, chunk in grid:
        seconds = statistics.median(m["seconds"] for m in runs[batch, chunk])
        peak = max(m["peak"] for m in runs[batch, chunk])
        rows.append(
            f"| {batch} | {chunk} | {batch * chunk:,} | {draws / seconds:,.0f} | {peak:,.0f} MiB |"
        )
    body = "\n".join(
        [
            f"{describe(device)}; {args.points} test points x K = {args.samples}, as `evaluate` "
            f"runs them (diagnostics and IWAE_1,10,100 included); median of {args.repeats} "
            f"runs{', each setting in its own process' if device.type == 'cpu' else ''}; "
            "peak: the largest of the runs.",
            "",
            *rows,
        ]
    )
    print(body)
    if args.write:
        write_section(f"evaluate sizes ({device.type})", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
