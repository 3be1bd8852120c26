r"""Times one SVI step of ppl_vae against a hand-written PyTorch step, interleaved in one run.

Six steps on the same networks, batches, data and learning rate:

- ``ppl_vae``: what :func:`ppl_vae.svi.train` runs -- the ELBO of the Pyro model and guide
  (``ppl_vae.losses.TraceELBO`` or ``TraceMeanFieldELBO``, equal to Pyro's ``Trace_ELBO`` and
  ``TraceMeanField_ELBO`` in value and gradient), captured once as a graph of tensor operations
  and replayed (:class:`ppl_vae.capture.CapturedLoss`), one Adam over all parameters, fused
  where torch has it (:func:`ppl_vae.optim.adam`), validation off after the first trace, no
  host synchronisation;
- ``compiled``: ``ppl_vae`` with the record through ``torch.compile`` (``--compile``);
- ``graphed`` (CUDA only): ``ppl_vae`` with each step replayed as a CUDA graph, what ``train``
  runs on a GPU (:class:`ppl_vae.graphs.GraphedSteps`, ``--cuda-graphs``);
- ``eager``: the same without the capture (``--no-capture``): the Pyro program runs each step;
- ``hand``: the same ELBO written with bare tensor formulas (sampled KL for ``elbo``, analytic KL
  for ``meanfield``), ``torch.optim.Adam`` with its defaults, as a hand-written loop has it;
- ``hand compiled``: the hand-written loss through ``torch.compile`` with fused Adam, the
  strongest reference;
- ``stock``: ``pyro.infer.SVI`` + ``pyro.optim.Adam`` + the same ELBO, validation on (Pyro's
  defaults).

The eager contenders are timed first, for every row, before anything is compiled in the
process, and the compiled ones after, each row beside the hand-written eager step again: once
inductor has compiled the hand-written loss, torch's eager ``binary_cross_entropy_with_logits``
runs 4.6 times as fast in that process (1.8 against 8.3 ms at batch 1000), which made the
hand-written eager step of a mixed run faster than any user's eager script. Every contender
steps through the same sequence of 30 distinct binarized training batches, in turn, as training
does (on one batch repeated a thousand times the networks overfit it, and the steps then time
logits no training step sees). Each repeat runs every step in turn, in an order rotated from
repeat to repeat (5 warm-up steps, then ``--steps`` timed ones). Times are medians over
repeats; a ratio is the median of the per-repeat ratios, so that a slow spell of the machine,
which hits the steps of one repeat alike, cancels. It also times one MNIST epoch of ``train``
and the data handling (permutation, gather, dynamic binarization) of the same epoch; on CUDA also
the second epoch of a two-epoch run (the first makes the records and captures the graphs).

Run: ``python benchmarks/svi_step.py --write`` (``--write`` updates docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
from collections.abc import Callable

import pyro
import torch
import torch.nn.functional as F
from common import (
    describe,
    interleave,
    medians,
    parse_args,
    reference_batch,
    reference_vae,
    time_calls,
    training_step,
    write_section,
)
from pyro.infer import SVI
from torch import Tensor

from ppl_vae import TrainConfig, train
from ppl_vae.graphs import WARMUP, GraphedSteps
from ppl_vae.optim import adam
from ppl_vae.svi import make_loss, step_loss, svi_step

LOG_2PI = math.log(2 * math.pi)
BATCHES_CYCLED = 30  # distinct batches each contender steps through, in turn
COMPILED = ("compiled", "hand_compiled", "hand")  # the second phase's contenders


def hand_step(model, guide, optimizer, x, num_data, analytic_kl, loss_fn=None):
    """One step of the ELBO of the same networks in bare PyTorch (``loss_fn``: the loss,
    default :func:`hand_loss`, e.g. compiled); returns the loss tensor."""
    loss = (loss_fn or hand_loss)(model, guide, x, num_data, analytic_kl)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def hand_loss(model, guide, x, num_data: int, analytic_kl: bool):
    """The negative ELBO of the batch ``x``, scaled to ``num_data`` points, by hand."""
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
    return (kl - log_px).sum() * (num_data / x.shape[0])


def time_steps(
    batch: int, loss: str, repeats: int, steps: int, device: torch.device, phase: str
) -> dict:
    """Times the contenders of ``phase``: ``eager`` (ppl_vae, eager, hand, stock) or
    ``compiled`` (compiled, hand compiled and hand again); on CUDA the eager phase also has
    ``graphed``; see the module's docstring."""
    data, model, guide, x, params = reference_batch(device, batch)
    num_data = data.train.shape[0]
    # each contender steps through the same sequence of distinct binarized batches, as training
    # does: stepping on one batch a thousand times overfits it, and the logits it then makes
    # are not a training step's (torch's cross-entropy of the hand-written step took a quarter
    # of its time on them)
    generator = torch.Generator(device=data.train.device).manual_seed(0)
    batches = [x] + [
        torch.bernoulli(data.train[i : i + batch], generator=generator)
        for i in range(batch, min(num_data, BATCHES_CYCLED * batch), batch)
    ]
    optimizer = torch.optim.Adam(params.values(), lr=1e-3)  # what a hand-written loop uses
    fused = adam(params.values(), lr=1e-3)  # what train uses (fused where torch has it)
    elbo = make_loss(TrainConfig(batch_size=batch, loss=loss))
    stock_loss = pyro.infer.Trace_ELBO if loss == "elbo" else pyro.infer.TraceMeanField_ELBO
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), stock_loss())
    captured = step_loss(elbo, model, guide, params, capture=True)
    compiled = step_loss(elbo, model, guide, params, capture=True, compile=True)
    eager = step_loss(elbo, model, guide, params, capture=False)
    analytic = loss == "meanfield"
    hand_compiled = torch.compile(hand_loss, dynamic=False)

    def hand(x):
        return hand_step(model, guide, optimizer, x, num_data, analytic)

    def hand_fast(x):
        return hand_step(model, guide, fused, x, num_data, analytic, loss_fn=hand_compiled)

    graphs = GraphedSteps(svi_step)

    def cycling(step: Callable[[Tensor], Tensor]) -> Callable[[], Tensor]:
        order = itertools.cycle(batches)
        return lambda: step(next(order))

    steps_by_name = {
        "ppl_vae": training_step(captured, fused, num_data=num_data),
        "eager": training_step(eager, fused, num_data=num_data),
        "hand": hand,
        "stock": lambda x: svi.step(x, num_data),
        "compiled": training_step(compiled, fused, num_data=num_data),
        "hand_compiled": hand_fast,
        "graphed": training_step(captured, fused, num_data=num_data, step=graphs),
    }
    names = ("ppl_vae", "eager", "hand", "stock") if phase == "eager" else COMPILED
    if phase == "eager" and device.type == "cuda":
        names += ("graphed",)
    contenders = {name: cycling(steps_by_name[name]) for name in names}
    for name in set(names) & set(COMPILED):  # compile outside the timing
        contenders[name]()
        contenders[name]()
    if "graphed" in names:  # record, warm up and capture outside the timing
        for _ in range(2 + WARMUP):
            contenders["graphed"]()
        if graphs.off is not None or not graphs.graphs:
            raise RuntimeError(f"no CUDA graph was captured: {graphs.off}")
    times = interleave(contenders, repeats, device, calls=steps, warmup=5, rotate=True)
    ratios = {
        f"{k}/hand": statistics.median(a / b for a, b in zip(v, times["hand"], strict=True))
        for k, v in times.items()
    }
    return medians(times) | ratios


def time_epoch(device: torch.device) -> dict:
    """One MNIST epoch of ``train`` (batch 100) and the data handling of one epoch; on CUDA
    also ``second_s``, the second epoch of a two-epoch run (its ``seconds`` metric)."""
    data, model, guide = reference_vae(device)
    epoch, _ = time_calls(
        lambda: train(model, guide, data, TrainConfig(epochs=1, batch_size=100), quiet=True),
        device,
    )
    second = {}
    if device.type == "cuda":
        data, model, guide = reference_vae(device)
        metrics = train(model, guide, data, TrainConfig(epochs=2, batch_size=100), quiet=True)
        second = {"second_s": metrics[-1]["seconds"]}
    g = torch.Generator(device=device).manual_seed(0)

    def handle():
        for _x in data.batches(100, "train", generator=g):
            pass

    data_s = medians(interleave({"data": handle}, 5, device))["data"]
    return {"epoch_s": epoch, "data_s": data_s, **second}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="100,1000")
    parser.add_argument("--losses", default="elbo,meanfield", help="the rows' losses")
    args, device = parse_args(parser, argv, repeats=21, steps=10)
    cases = [(loss, int(b)) for loss in args.losses.split(",") for b in args.batches.split(",")]
    # every eager contender before anything is compiled in this process (see the docstring)
    results = {case: time_steps(*case[::-1], args.repeats, args.steps, device, "eager")
               for case in cases}  # fmt: skip
    cuda = device.type == "cuda"
    rows = []
    for loss, batch in cases:
        t = results[loss, batch]
        c = time_steps(batch, loss, args.repeats, args.steps, device, "compiled")
        graph = f" {t['graphed'] * 1e3:.3f} | **{t['graphed/hand']:.3f}** |" if cuda else ""
        rows.append(
            f"| {loss} | {batch} | {t['hand'] * 1e3:.2f} | {t['ppl_vae'] * 1e3:.2f} | "
            f"{t['eager'] * 1e3:.2f} | {t['stock'] * 1e3:.2f} | **{t['ppl_vae/hand']:.3f}** | "
            f"{t['eager/hand']:.3f} | {t['stock/hand']:.3f} |{graph} {c['hand'] * 1e3:.2f} | "
            f"{c['compiled'] * 1e3:.2f} | {c['hand_compiled'] * 1e3:.2f} | "
            f"{c['compiled/hand']:.3f} | {c['hand_compiled/hand']:.3f} |"
        )
        print(rows[-1], flush=True)
    e = time_epoch(device)
    epoch_line = (
        f"One MNIST epoch of `train` (600 steps of batch 100, plus the test ELBO): "
        f"{e['epoch_s']:.2f} s; data handling of one epoch (permutation, gather, dynamic "
        f"binarization of 60k images): {e['data_s']:.3f} s = "
        f"**{100 * e['data_s'] / e['epoch_s']:.1f}%** of the epoch."
        + (f" Second epoch of a two-epoch run: {e['second_s']:.2f} s." if cuda else "")
    )
    print(epoch_line)
    table = "\n".join(
        [
            f"{describe(device)}; {args.repeats} repeats of {args.steps} steps; "
            "times are medians, ratios medians of the per-repeat ratios.",
            "",
            "| loss | batch | hand ms | ppl_vae ms | eager ms | stock SVI ms | ppl_vae / hand "
            "| eager / hand | stock / hand |"
            + (" CUDA graph ms | CUDA graph / hand |" if cuda else "")
            + " after compiling: hand ms | ppl_vae compiled ms | "
            "hand compiled + fused Adam ms | compiled / hand | hand compiled / hand |",
            "|---" * (16 if cuda else 14) + "|",
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
