r"""The recorded SVI step against the same record through ``torch.compile`` (``--compile``).

On the reference VAE (MLP 784-200-200, z = 50, tanh, MNIST, the default mean-field loss), at
each batch size of ``--batches`` (default 100 and 1000): the time to compile the record (its
first call, the check against the program included:
:attr:`ppl_vae.capture.CapturedLoss.compile_seconds`), then one training step (loss,
gradients, fused Adam as ``train`` makes it) of the record, of the compiled record and of the
hand-written eager step of ``benchmarks/svi_step.py``, interleaved with the order rotated,
medians; and the number of steps after which compiling pays, compile time over the time saved
per step ("never" where the compiled step is not faster). Inductor keeps compiled kernels in a
cache on disk; the benchmark compiles into a fresh one (``TORCHINDUCTOR_CACHE_DIR``
unless set), so the compile time is a first run's.

Run: ``python benchmarks/compile_step.py --threads 1 --write`` (``--write`` updates
docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-"))

import pyro  # noqa: E402
import torch
from common import (
    describe,
    interleave,
    medians,
    parse_args,
    reference_batch,
    training_step,
    write_section,
)
from svi_step import hand_step

from ppl_vae.optim import adam
from ppl_vae.svi import TrainConfig, make_loss, step_loss


def compare(batch: int, repeats: int, steps: int, device: torch.device) -> dict:
    data, model, guide, x, params = reference_batch(device, batch)
    num_data = data.train.shape[0]
    optimizer = adam(params.values(), lr=1e-3)
    elbo = make_loss(TrainConfig(batch_size=batch))
    record = step_loss(elbo, model, guide, params, capture=True)
    compiled = step_loss(elbo, model, guide, params, capture=True, compile=True)
    with pyro.validation_enabled(False):
        for loss in (record, compiled):  # the program's call, then the record (compiled)
            loss(x, num_data)
            loss(x, num_data)
    contenders = {
        "record": training_step(record, optimizer, x, num_data),
        "compiled": training_step(compiled, optimizer, x, num_data),
        "hand": lambda: hand_step(model, guide, optimizer, x, num_data, analytic_kl=True),
    }
    times = interleave(contenders, repeats, device, calls=steps, warmup=3, rotate=True)
    ratio = {
        f"{k}/hand": statistics.median(a / b for a, b in zip(v, times["hand"], strict=True))
        for k, v in times.items()
    }
    return medians(times) | ratio | {"compile_s": compiled.compile_seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="100,1000")
    args, device = parse_args(parser, argv, repeats=7, steps=20)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        r = compare(batch, args.repeats, args.steps, device)
        saved = r["record"] - r["compiled"]
        pays = f"{r['compile_s'] / saved:,.0f}" if saved > 0 else "never"
        rows.append(
            f"| {batch} | {1e3 * r['record']:.2f} | {1e3 * r['compiled']:.2f} | "
            f"{1e3 * r['hand']:.2f} | {r['record/hand']:.3f} | **{r['compiled/hand']:.3f}** | "
            f"{r['compile_s']:.1f} | {pays} |"
        )
        print(rows[-1], flush=True)
    table = "\n".join(
        [
            f"{describe(device)}; reference VAE, mean-field loss, fused Adam; ms per step, "
            f"medians of {args.repeats} interleaved repeats of {args.steps} steps; ratios are "
            f"medians of per-repeat ratios.",
            "",
            "| batch | record ms | compiled ms | hand eager ms | record/hand | compiled/hand | "
            "compile s | steps to pay |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print(table)
    if args.write:
        write_section(f"compiled step ({device.type})", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
