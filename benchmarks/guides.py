r"""Training-step time of every guide relative to the diagonal Gaussian, interleaved in one run.

The reference MNIST setting: MLP 784-200-200, z of dimension 50, Bernoulli likelihood, batch
100 of dynamically binarized images, ``Trace_ELBO`` captured and replayed as in
:func:`ppl_vae.svi.train`, Adam over all parameters. Flow guides have ``--flow-length``
steps (given only to the guides that take it). Each repeat times ``--steps`` steps of every
guide in turn (each after 3 untimed steps); the figure is the median over repeats, so a slow
spell on a shared machine hits every guide alike.

Run: ``python benchmarks/guides.py --write`` (``--write`` updates docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import sys

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

from ppl_vae import GUIDES, TrainConfig, VAEConfig
from ppl_vae.svi import collect_params, make_loss, step_loss


def make_stepper(name: str, flow_length: int, device: torch.device):
    """A closure running one SVI step of the guide ``name``, and its parameter count."""
    options = {"flow_length": flow_length} if "flow_length" in GUIDES.options(name) else {}
    data, model, guide = reference_vae(device, VAEConfig(guide=name, **options))
    g = torch.Generator(device=device).manual_seed(0)
    x = data.encode(data.train[:100], generator=g)
    num_data = data.train.shape[0]
    params = collect_params(model, guide, x, num_data)
    optimizer = torch.optim.Adam(params.values(), lr=1e-3)
    loss = step_loss(make_loss(TrainConfig(loss="elbo")), model, guide, params)  # as in train
    return training_step(loss, optimizer, x, num_data), sum(p.numel() for p in guide.parameters())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--guides", default=",".join(g for g in GUIDES if not g.startswith("zuko")))
    parser.add_argument("--flow-length", type=int, default=4)
    args, device = parse_args(parser, argv, repeats=5, steps=10)
    names = args.guides.split(",")
    for g in names:
        GUIDES.check(g)
    if "gaussian" not in names:
        names.insert(0, "gaussian")
    steppers = {g: make_stepper(g, args.flow_length, device) for g in names}
    times = interleave(
        {g: step for g, (step, _) in steppers.items()},
        args.repeats,
        device,
        calls=args.steps,
        warmup=3,
        # every guide registers as "guide": make this one current
        before=lambda _: pyro.clear_param_store(),
    )
    median = medians(times)
    rows = [
        f"| `{g}` | {steppers[g][1]:,} | {median[g] * 1e3:.1f} | "
        f"**{median[g] / median['gaussian']:.2f}** |"
        for g in names
    ]
    table = "\n".join(
        [
            f"{describe(device)}; batch 100, z = 50, MLP 784-200-200, "
            f"flow length {args.flow_length}; median of {args.repeats} repeats of {args.steps} "
            "steps, guides interleaved.",
            "",
            "| guide | guide parameters | ms per step | relative to `gaussian` |",
            "|---|---|---|---|",
            *rows,
        ]
    )
    print(table)
    if args.write:
        write_section(f"guides ({device.type})", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
