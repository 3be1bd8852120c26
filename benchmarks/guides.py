r"""Training-step time of every guide relative to the diagonal Gaussian, interleaved in one run.

The reference MNIST setting: MLP 784-200-200, z of dimension 50, Bernoulli likelihood, batch
100 of dynamically binarized images, ``Trace_ELBO`` captured and replayed as in
:func:`ppl_vae.train.train`, Adam over all parameters. Flow guides have ``--flow-length``
steps. Each repeat times ``--steps`` steps of every guide in turn (each after 3 untimed steps);
the figure is the median over repeats, so a slow spell on a shared machine hits every guide
alike.

Run: ``python benchmarks/guides.py --write`` (``--write`` updates docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch

from ppl_vae import GUIDES, DataConfig, VAEConfig, build_vae, load_data
from ppl_vae.train import TrainConfig, collect_params, make_loss, step_loss, svi_step

sys.path.insert(0, str(Path(__file__).resolve().parent))
from svi_step import parse_timing_args, write_section  # noqa: E402


def make_stepper(name: str, data, flow_length: int, device: torch.device):
    """A closure running one SVI step of the guide ``name``, and its parameter count."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model, guide = build_vae(VAEConfig(guide=name, flow_length=flow_length), data)
    g = torch.Generator(device=device).manual_seed(0)
    x = data.encode(data.train[:100], generator=g)
    num_data = data.train.shape[0]
    params = collect_params(model, guide, x, num_data)
    optimizer = torch.optim.Adam(params.values(), lr=1e-3)
    loss = step_loss(make_loss(TrainConfig(loss="elbo")), model, guide, params)  # as in train

    def step():
        with pyro.validation_enabled(False):
            svi_step(loss, optimizer, x, num_data)

    return step, sum(p.numel() for p in guide.parameters())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--guides", default=",".join(g for g in GUIDES if not g.startswith("zuko")))
    parser.add_argument("--flow-length", type=int, default=4)
    args, device, name = parse_timing_args(parser, argv, repeats=5, steps=10)
    data = load_data(DataConfig("mnist", "dynamic"), device)
    names = args.guides.split(",")
    if "gaussian" not in names:
        names.insert(0, "gaussian")
    steppers = {g: make_stepper(g, data, args.flow_length, device) for g in names}
    times: dict[str, list[float]] = {g: [] for g in names}
    for _ in range(args.repeats):
        for g, (step, _) in steppers.items():
            pyro.clear_param_store()  # every guide registers as "guide": make this one current
            for _ in range(3):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[g].append((time.perf_counter() - t0) / args.steps)
    median = {g: statistics.median(v) for g, v in times.items()}
    rows = [
        f"| `{g}` | {steppers[g][1]:,} | {median[g] * 1e3:.1f} | "
        f"**{median[g] / median['gaussian']:.2f}** |"
        for g in names
    ]
    print("\n".join(rows))
    table = "\n".join(
        [
            f"Device: {device.type} ({name}), torch {torch.__version__}, pyro {pyro.__version__}, "
            f"{torch.get_num_threads()} threads; batch 100, z = 50, MLP 784-200-200, "
            f"flow length {args.flow_length}; median of {args.repeats} repeats of {args.steps} "
            "steps, guides interleaved.",
            "",
            "| guide | guide parameters | ms per step | relative to `gaussian` |",
            "|---|---|---|---|",
            *rows,
        ]
    )
    if args.write:
        write_section(f"guides ({device.type})", table, " ".join(["python", *sys.argv]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
