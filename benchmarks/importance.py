r"""Throughput and peak memory of importance-sampled log p(x) against the bare decoder cost.

For the reference architecture (MLP 784-200-200-z50, tanh, Bernoulli decoder) and one batch of
binarized MNIST test points:

- ``log_likelihood``: :func:`ppl_vae.importance.log_likelihood` with K draws per point (guide
  encoder, draws, prior, guide and decoder log-densities, float64 log-sum-exp);
- ``bare``: the decoder forward pass plus the Bernoulli log-probability (the one ``log_likelihood``
  uses, :func:`ppl_vae.distributions.bernoulli_log_prob`) on the same number of
  rows (points x K), in the same chunks, on pre-drawn latents -- a lower bound on the cost.

The two are interleaved, median of ``--repeats``. Throughput is (points x samples) per second;
the figure of merit is bare time / log_likelihood time. Peak memory is measured for K = 500
and K = 5000 at the same chunk size: on CPU the peak RSS, each in a fresh process, with glibc's
default allocator and with its mmap threshold fixed; on CUDA ``torch.cuda.max_memory_allocated``,
in this process (the allocator's peak is reset before each).

Run: ``python benchmarks/importance.py --write`` (updates docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from common import (
    describe,
    interleave,
    measured_apart,
    medians,
    parse_args,
    peak_memory_mib,
    peak_memory_name,
    reference_vae,
    reset_peak_memory,
    write_section,
)

from ppl_vae.distributions import bernoulli_log_prob
from ppl_vae.importance import log_likelihood


def setup(points: int, device: torch.device):
    """The reference VAE and ``points`` binarized test images."""
    data, model, guide = reference_vae(device)
    x = torch.bernoulli(data.test[:points], generator=torch.Generator(device).manual_seed(0))
    return model, guide, x


def time_both(points, samples, chunk, repeats, device) -> dict:
    model, guide, x = setup(points, device)
    rows = chunk * points
    z = torch.randn(rows, 50, device=device)
    target = x.reshape(1, points, -1).expand(chunk, points, -1).reshape(rows, -1)

    @torch.no_grad()
    def bare():
        done = 0
        while done < samples:
            c = min(chunk, samples - done)
            logits = model.decoder(z[: c * points]).reshape(c * points, -1)
            bernoulli_log_prob(logits, target[: c * points]).sum(-1)
            done += c

    def ours():
        return log_likelihood(model, guide, x, num_samples=samples, chunk_size=chunk)

    ours()  # warm-up
    bare()
    return medians(interleave({"bare": bare, "log_likelihood": ours}, repeats, device))


def peak_memory(points, samples, chunk, device) -> float:
    """MiB: growth of the device's peak memory during the estimate (see
    :func:`common.reset_peak_memory`)."""
    model, guide, x = setup(points, device)
    base = reset_peak_memory(device)
    log_likelihood(model, guide, x, num_samples=samples, chunk_size=chunk)
    return peak_memory_mib(device) - base


def measured_peak(args: argparse.Namespace, samples: int, fixed: bool, device) -> float:
    """:func:`peak_memory` at K = ``samples``: on CUDA in this process, on the CPU in a fresh
    one (a heap of its own), with glibc's mmap threshold fixed at 64 KiB where ``fixed``."""
    cmd = [__file__, "--peak-only", "--points", str(args.points)]
    cmd += ["--samples", str(samples), "--chunk", str(args.chunk), "--device", args.device]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ, **({"MALLOC_MMAP_THRESHOLD_": "65536"} if fixed else {}))
    here = lambda: peak_memory(args.points, samples, args.chunk, device)  # noqa: E731
    return measured_apart(device, here, cmd, env)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", type=int, default=100, help="data points per call")
    parser.add_argument("--samples", type=int, default=5000, help="K")
    parser.add_argument("--chunk", type=int, default=500, help="draws per vectorized pass")
    parser.add_argument("--peak-only", action="store_true", help=argparse.SUPPRESS)
    args, device = parse_args(parser, argv, repeats=3)
    if args.peak_only:
        print(json.dumps(peak_memory(args.points, args.samples, args.chunk, device)))
        return 0
    t = time_both(args.points, args.samples, args.chunk, args.repeats, device)
    draws = args.points * args.samples
    cpu = device.type == "cpu"
    allocators = (False, True) if cpu else (False,)  # glibc's threshold: the CPU heap only
    peaks = {(f, k): measured_peak(args, k, f, device) for f in allocators for k in (500, 5000)}
    body = "\n".join(
        [
            f"{describe(device)}; {args.points} test points x K = {args.samples}, "
            f"chunk {args.chunk} draws ({args.points * args.chunk} decoder rows per pass); "
            f"median of {args.repeats}.",
            "",
            "| | seconds | points x samples / s |",
            "|---|---|---|",
            f"| bare decoder + Bernoulli log-prob | {t['bare']:.2f} | {draws / t['bare']:,.0f} |",
            f"| log_likelihood | {t['log_likelihood']:.2f} | {draws / t['log_likelihood']:,.0f} |",
            "",
            f"Throughput relative to the bare bound: **{t['bare'] / t['log_likelihood']:.3f}** "
            f"(target >= 0.8).",
            "",
            f"Peak memory growth during one call, chunk {args.chunk} ({peak_memory_name(device)}):",
            "",
            "| allocator | K = 500 | K = 5000 |",
            "|---|---|---|",
            f"| default | {peaks[False, 500]:.1f} MiB | {peaks[False, 5000]:.1f} MiB |",
        ]
    )
    if cpu:
        body += (
            f"\n| glibc mmap threshold fixed at 64 KiB | {peaks[True, 500]:.1f} MiB | "
            f"{peaks[True, 5000]:.1f} MiB |\n\n"
            "On CPU, glibc raises its mmap threshold each time a large block is freed, so later "
            "chunks are served from the heap and fragment it; the default row drifts up with the "
            "number of chunks for that reason alone. With the threshold fixed "
            "(`MALLOC_MMAP_THRESHOLD_=65536`), the peak is the same for both K: memory depends on "
            "the chunk size and the number of points, not on K."
        )
    print(body)
    if args.write:
        write_section(f"importance ({device.type})", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
