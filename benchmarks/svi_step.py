r"""Times one SVI step of ppl_vae against a hand-written PyTorch step, interleaved in one run.

Four steps on the same networks, batch, data and optimizer settings:

- ``ppl_vae``: what :func:`ppl_vae.svi.train` runs -- the ELBO of the Pyro model and guide
  (``ppl_vae.losses.TraceELBO`` or ``TraceMeanFieldELBO``, equal to Pyro's ``Trace_ELBO`` and
  ``TraceMeanField_ELBO`` in value and gradient), captured once as a graph of tensor operations
  and replayed (:class:`ppl_vae.capture.CapturedLoss`), one ``torch.optim.Adam`` over all
  parameters, validation off after the first trace, no host synchronisation;
- ``eager``: the same without the capture (``--no-capture``): the Pyro program runs each step;
- ``hand``: the same ELBO written with bare tensor formulas (sampled KL for ``elbo``, analytic KL
  for ``meanfield``), the same Adam;
- ``stock``: ``pyro.infer.SVI`` + ``pyro.optim.Adam`` + the same ELBO, validation on (Pyro's
  defaults).

Each repeat runs every step in turn, in an order rotated from repeat to repeat (5 warm-up steps,
then ``--steps`` timed ones). Times are medians over repeats; a ratio is the median of the
per-repeat ratios, so that a slow spell of the machine, which hits the steps of one repeat
alike, cancels. It also times one MNIST epoch of ``train`` and the data handling
(permutation, gather, dynamic binarization) of the same epoch.

Run: ``python benchmarks/svi_step.py --write`` (``--write`` updates docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys

import pyro
import torch
import torch.nn.functional as F
from common import (
    describe,
    interleave,
    medians,
    parse_args,
    reference_vae,
    time_calls,
    training_step,
    write_section,
)
from pyro.infer import SVI

from ppl_vae import TrainConfig, train
from ppl_vae.svi import collect_params, make_loss, step_loss

LOG_2PI = math.log(2 * math.pi)


def hand_step(model, guide, optimizer, x, num_data, analytic_kl):
    """The ELBO of the same networks in bare PyTorch; returns the loss tensor."""
    loc, raw = guide.head(guide.encoder(x)).chunk(2, dim=-1)
    scale = F.softplus(raw) + 1e-6
    z = loc + scale * torch.randn_like(loc)
    logits = model.decoder(z)
    log_px = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(-1)
    if analytic_kl:
        kl = 0.5 * (loc**2 + scale**2 - 1).sum(-1) - scale.log().sum(-1)
    else:
        log_q = (-0.5 * ((z - loc) / scale) ** 2 - scale.log() - 0.5 * LOG_2PI).sum(-1)
        log_p = (-0.5 * z**2 - 0.5 * LOG_2PI).sum(-1)
        kl = log_q - log_p
    loss = (kl - log_px).sum() * (num_data / x.shape[0])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def time_steps(batch: int, loss: str, repeats: int, steps: int, device: torch.device) -> dict:
    data, model, guide = reference_vae(device)
    num_data = data.train.shape[0]
    x = torch.bernoulli(data.train[:batch])
    params = collect_params(model, guide, x, num_data)
    optimizer = torch.optim.Adam(params.values(), lr=1e-3)
    elbo = make_loss(TrainConfig(batch_size=batch, loss=loss))
    stock_loss = pyro.infer.Trace_ELBO if loss == "elbo" else pyro.infer.TraceMeanField_ELBO
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), stock_loss())
    captured = step_loss(elbo, model, guide, params, capture=True)
    eager = step_loss(elbo, model, guide, params, capture=False)

    def hand():
        return hand_step(model, guide, optimizer, x, num_data, analytic_kl=loss == "meanfield")

    contenders = {
        "ppl_vae": training_step(captured, optimizer, x, num_data),
        "eager": training_step(eager, optimizer, x, num_data),
        "hand": hand,
        "stock": lambda: svi.step(x, num_data),
    }
    times = interleave(contenders, repeats, device, calls=steps, warmup=5, rotate=True)
    ratios = {
        f"{k}/hand": statistics.median(a / b for a, b in zip(v, times["hand"], strict=True))
        for k, v in times.items()
    }
    return medians(times) | ratios


def time_epoch(device: torch.device) -> dict:
    """One MNIST epoch of ``train`` (batch 100) and the data handling of one epoch."""
    data, model, guide = reference_vae(device)
    epoch, _ = time_calls(
        lambda: train(model, guide, data, TrainConfig(epochs=1, batch_size=100), quiet=True),
        device,
    )
    g = torch.Generator(device=device).manual_seed(0)

    def handle():
        for _x in data.batches(100, "train", generator=g):
            pass

    return {"epoch_s": epoch, "data_s": medians(interleave({"data": handle}, 5, device))["data"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="100,1000")
    args, device = parse_args(parser, argv, repeats=21, steps=10)
    rows = []
    for loss in ("elbo", "meanfield"):
        for batch in (int(b) for b in args.batches.split(",")):
            t = time_steps(batch, loss, args.repeats, args.steps, device)
            rows.append(
                f"| {loss} | {batch} | {t['hand'] * 1e3:.2f} | {t['ppl_vae'] * 1e3:.2f} | "
                f"{t['eager'] * 1e3:.2f} | {t['stock'] * 1e3:.2f} | "
                f"**{t['ppl_vae/hand']:.3f}** | {t['eager/hand']:.3f} | {t['stock/hand']:.3f} |"
            )
            print(rows[-1], flush=True)
    e = time_epoch(device)
    epoch_line = (
        f"One MNIST epoch of `train` (600 steps of batch 100, plus the test ELBO): "
        f"{e['epoch_s']:.2f} s; data handling of one epoch (permutation, gather, dynamic "
        f"binarization of 60k images): {e['data_s']:.3f} s = "
        f"**{100 * e['data_s'] / e['epoch_s']:.1f}%** of the epoch."
    )
    print(epoch_line)
    table = "\n".join(
        [
            f"{describe(device)}; {args.repeats} repeats of {args.steps} steps; "
            "times are medians, ratios medians of the per-repeat ratios.",
            "",
            "| loss | batch | hand ms | ppl_vae ms | eager ms | stock SVI ms | ppl_vae / hand | "
            "eager / hand | stock / hand |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            epoch_line,
        ]
    )
    if args.write:
        write_section(f"svi_step ({device.type})", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
