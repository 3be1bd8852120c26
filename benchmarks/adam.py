r"""Fused against default Adam: the reference SVI step and the update alone, interleaved.

The reference MNIST VAE (MLP 784-200-200, z = 50, 425,284 parameters), the step as
:func:`ppl_vae.svi.train` runs it (``meanfield`` captured and replayed), with two optimizers
over the same parameters:

- ``default``: ``torch.optim.Adam(params, lr)``, torch's default implementation (the
  single-tensor loop on a CPU; ``foreach`` on CUDA) -- what training built before;
- ``fused``: :func:`ppl_vae.optim.adam`, what training builds now (``fused=True`` where torch
  has the kernel, else ``foreach``).

Each repeat times ``--steps`` whole steps with each optimizer (after 5 untimed), then
``--steps`` updates alone (``optimizer.step()`` on fixed gradients), in an order rotated from
repeat to repeat; ratios are medians of the per-repeat ratios.

Run: ``python benchmarks/adam.py --threads 1 --write`` (``--write`` updates
docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys

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

from ppl_vae import TrainConfig
from ppl_vae.optim import adam, is_fused
from ppl_vae.svi import make_loss, step_loss


def time_batch(batch: int, repeats: int, steps: int, device: torch.device) -> dict:
    """Seconds per whole step and per update alone, each optimizer; and their ratios."""
    data, model, guide, x, params = reference_batch(device, batch)
    num_data = data.train.shape[0]
    optimizers = {
        "default": torch.optim.Adam(params.values(), lr=1e-3),
        "fused": adam(params.values(), lr=1e-3),
    }
    loss = step_loss(make_loss(TrainConfig(batch_size=batch, loss="meanfield")), model, guide,
                     params)  # fmt: skip
    grads = {k: torch.randn_like(p) * 1e-2 for k, p in params.items()}

    def update(opt):
        def run():
            for k, p in params.items():
                p.grad = grads[k]
            opt.step()

        return run

    contenders = {
        f"step {k}": training_step(loss, opt, x, num_data) for k, opt in optimizers.items()
    }
    contenders |= {f"update {k}": update(opt) for k, opt in optimizers.items()}
    times = interleave(contenders, repeats, device, calls=steps, warmup=5, rotate=True)
    for p in params.values():
        p.grad = None
    out = medians(times)
    for what in ("step", "update"):
        pairs = zip(times[f"{what} fused"], times[f"{what} default"], strict=True)
        out[f"{what} ratio"] = statistics.median(a / b for a, b in pairs)
    out["count"] = sum(p.numel() for p in params.values())
    out["kind"] = "fused" if is_fused(optimizers["fused"]) else "foreach"
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="100,1000")
    args, device = parse_args(parser, argv, repeats=21, steps=10)
    rows, kind, count = [], "", 0
    for batch in (int(b) for b in args.batches.split(",")):
        t = time_batch(batch, args.repeats, args.steps, device)
        kind, count = t["kind"], t["count"]
        rows.append(
            f"| {batch} | {t['step default'] * 1e3:.2f} | {t['step fused'] * 1e3:.2f} | "
            f"**{t['step ratio']:.3f}** | {t['update default'] * 1e3:.3f} | "
            f"{t['update fused'] * 1e3:.3f} | **{t['update ratio']:.3f}** |"
        )
        print(rows[-1], flush=True)
    table = "\n".join(
        [
            f"{describe(device)}; the reference VAE's {count:,} parameters, `meanfield` step "
            f"captured; {args.repeats} repeats of {args.steps} steps, rotated; times are "
            f"medians, ratios medians of the per-repeat ratios. `fused` is "
            f"`ppl_vae.optim.adam` ({kind} here).",
            "",
            "| batch | step, default Adam ms | step, fused ms | fused / default | "
            "update alone, default ms | update alone, fused ms | fused / default |",
            "|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print(table)
    if args.write:
        write_section(f"adam ({device.type})", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
