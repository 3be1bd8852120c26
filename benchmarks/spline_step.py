r"""The ``spline`` guide's training step: Pyro's spline step against ppl_vae's, side by side.

Pyro's :class:`~pyro.distributions.transforms.ConditionalSplineAutoregressive` selects the
points outside its interval by boolean indexing, so the step runs eagerly (what ``spline`` ran
before :mod:`ppl_vae.splines`); ppl_vae's step chooses them by ``torch.where`` and is timed both
eagerly and captured, as :func:`ppl_vae.svi.train` runs it. The three share one guide's
networks (Pyro's step is built on the same MADEs) and the reference MNIST setting of
``benchmarks/guides.py``; each repeat times ``--steps`` steps of each in turn (after 3 untimed
steps), and the figure is the median over repeats.

Run: ``python benchmarks/spline_step.py --write`` (``--write`` updates docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings

import pyro
import torch
from common import (
    describe,
    interleave,
    medians,
    parse_args,
    reference_vae,
    training_step,
    write_section,
)
from pyro.distributions.transforms import ConditionalSplineAutoregressive

from ppl_vae import TrainConfig, VAEConfig
from ppl_vae.svi import collect_params, make_loss, step_loss


def make_stepper(variant: str, flow_length: int, device: torch.device):
    """One SVI step of the spline guide: ``pyro`` (eager), ``ours`` (eager) or ``captured``."""
    data, model, guide = reference_vae(device, VAEConfig(guide="spline", flow_length=flow_length))
    if variant == "pyro":
        guide = copy.deepcopy(guide)
        for i, step in enumerate(guide.steps):
            spline = step.spline
            guide.steps[i] = ConditionalSplineAutoregressive(
                step.input_dim, step.nn, count_bins=spline.bins, bound=spline.bound
            )
    g = torch.Generator(device=device).manual_seed(0)
    x = data.encode(data.train[:100], generator=g)
    num_data = data.train.shape[0]
    params = collect_params(model, guide, x, num_data)
    optimizer = torch.optim.Adam(params.values(), lr=1e-3)
    capture = variant == "captured"
    loss = step_loss(make_loss(TrainConfig(loss="elbo")), model, guide, params, capture=capture)
    return training_step(loss, optimizer, x, num_data)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flow-length", type=int, default=4)
    args, device = parse_args(parser, argv, repeats=5, steps=10)
    variants = ("pyro", "ours", "captured")
    steppers = {v: make_stepper(v, args.flow_length, device) for v in variants}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the captured step must not fall back
        times = interleave(
            steppers,
            args.repeats,
            device,
            calls=args.steps,
            warmup=3,
            before=lambda _: pyro.clear_param_store(),  # every guide registers as "guide"
        )
    median = medians(times)
    labels = {
        "pyro": "Pyro's spline step, eager (before)",
        "ours": "`ppl_vae.splines`, eager",
        "captured": "`ppl_vae.splines`, captured (as `train` runs it)",
    }
    rows = [
        f"| {labels[v]} | {median[v] * 1e3:.1f} | **{median[v] / median['pyro']:.2f}** |"
        for v in variants
    ]
    table = "\n".join(
        [
            f"{describe(device)}; batch 100, z = 50, MLP 784-200-200, spline guide of "
            f"{args.flow_length} steps; median of {args.repeats} repeats of {args.steps} steps, "
            "interleaved.",
            "",
            "| step | ms per step | relative to Pyro's |",
            "|---|---|---|",
            *rows,
        ]
    )
    print(table)
    if args.write:
        write_section(f"spline step ({device.type})", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
