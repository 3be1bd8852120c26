r"""Times one M2 training step: recorded, run each step, and Pyro's TraceEnum_ELBO, interleaved.

Kingma et al.'s M2 (``VAEConfig(model="m2")``: z of 50, one hidden layer of 500 softplus units)
on MNIST, one step of ``ppl-vae train --model m2 --labeled 100`` = the loss of one unlabelled
batch (the label summed out) plus that of one labelled batch with the classification term, its
gradient and one Adam update. Three ways of computing the same loss:

- ``ppl_vae``: what :func:`ppl_vae.svi.train` runs -- the objective
  (:class:`ppl_vae.semisupervised.SemiSupervised`, whose sum over the ten labels is written out
  as one batched run of the labelled programs) recorded once as a graph of tensor operations and
  replayed (:class:`ppl_vae.capture.CapturedLoss`);
- ``eager``: the same without the record (``--no-capture``): the Pyro programs run each step;
- ``pyro``: Pyro's own estimators on the same programs -- ``TraceEnum_ELBO`` with the guide's
  label enumerated in parallel for the unlabelled batch, ``Trace_ELBO`` for the labelled one, plus
  the same classification term (``tests/test_m2.py`` checks that the sum equals ours in value
  and gradients).

Each repeat runs every step in turn, in an order rotated from repeat to repeat (5 warm-up steps,
then ``--steps`` timed ones); times are medians over repeats, a ratio the median of the
per-repeat ratios.

Run: ``python benchmarks/m2_step.py --write`` (``--write`` updates docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys

import pyro
import torch
from common import (
    describe,
    interleave,
    medians,
    mnist,
    parse_args,
    training_step,
    write_section,
)
from pyro.infer import Trace_ELBO, TraceEnum_ELBO

from ppl_vae import VAEConfig, build_vae
from ppl_vae.m2 import paper_alpha
from ppl_vae.semisupervised import SemiSupervised, labelled_split
from ppl_vae.svi import collect_params, step_loss


def time_steps(batch: int, labelled: int, repeats: int, steps: int, device) -> dict:
    data = mnist(device)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model, guide = build_vae(VAEConfig(model="m2", labeled=labelled), data)
    index = labelled_split(data, labelled, guide.num_classes, 0)
    alpha = paper_alpha(data.train.shape[0], labelled)
    objective = SemiSupervised(data, index, alpha=alpha, batch_size=batch, seed=0)
    num_data = data.train.shape[0] - labelled
    x = torch.bernoulli(data.train[:batch])
    xl, yl, scale = objective.step_args(0, None)
    params = collect_params(model, guide, x, num_data=num_data)
    optimizer = torch.optim.Adam(params.values(), lr=1e-3)
    enum, plain = TraceEnum_ELBO(max_plate_nesting=1), Trace_ELBO()

    def pyro_loss():
        unlabelled = enum.differentiable_loss(model, guide, x, num_data=num_data)
        labelled_elbo = plain.differentiable_loss(model, guide, xl, yl, num_data=scale)
        log_qy = torch.log_softmax(guide.classifier(xl), -1).gather(-1, yl.unsqueeze(-1))
        return unlabelled + labelled_elbo - alpha * (scale / len(xl)) * log_qy.sum()

    batches = (x, num_data, xl, yl, scale)
    contenders = {
        "ppl_vae": training_step(
            step_loss(objective, model, guide, params, capture=True), optimizer, *batches
        ),
        "eager": training_step(
            step_loss(objective, model, guide, params, capture=False), optimizer, *batches
        ),
        "pyro": training_step(pyro_loss, optimizer),
    }
    times = interleave(contenders, repeats, device, calls=steps, warmup=5, rotate=True)
    ratios = {
        f"{k}/ppl_vae": statistics.median(a / b for a, b in zip(v, times["ppl_vae"], strict=True))
        for k, v in times.items()
    }
    return medians(times) | ratios


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="100")
    parser.add_argument("--labelled", type=int, default=100)
    args, device = parse_args(parser, argv, repeats=11, steps=5)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        t = time_steps(batch, args.labelled, args.repeats, args.steps, device)
        rows.append(
            f"| {batch} | {t['ppl_vae'] * 1e3:.1f} | {t['eager'] * 1e3:.1f} | "
            f"{t['pyro'] * 1e3:.1f} | **{t['eager/ppl_vae']:.3f}** | {t['pyro/ppl_vae']:.3f} |"
        )
        print(rows[-1], flush=True)
    table = "\n".join(
        [
            f"{describe(device)}; {args.repeats} repeats of {args.steps} steps; "
            f"{args.labelled} labelled points, labelled and unlabelled batches of the same size; "
            "times are medians, ratios medians of the per-repeat ratios.",
            "",
            "| batch | ppl_vae ms | eager ms | Pyro TraceEnum ms | eager / ppl_vae | "
            "Pyro / ppl_vae |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print(table)
    if args.write:
        write_section(f"m2_step ({device.type})", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
