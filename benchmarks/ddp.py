r"""Training throughput of 2 processes x 1 thread (torchrun, gloo) against 1 process x 1 thread.

The step is the one :func:`ppl_vae.svi.train` takes: the reference MNIST VAE (MLP 784-200-200,
z = 50, Bernoulli, dynamic binarization), the captured ELBO step, one Adam; under torchrun each
rank steps on its half of every global batch of ``--batch-size`` and the gradients (1.1M
numbers, one flat buffer) are summed by one gloo all-reduce before the update. Each run takes
``--warmup`` untimed steps, then times ``--steps`` steps over the same shuffled batches;
throughput is images per second of the global batch. One-process and two-process runs
alternate, ``--repeats`` times; the ratio is the median of the per-repeat ratios. The
all-reduce's share is its time alone (the same buffer, ``--steps`` calls, each rank) over the
two-process step time.

Run: ``python benchmarks/ddp.py --write`` (updates docs/BENCHMARKS.md). Needs the two cores to
itself: anything else running halves a process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import describe, reference_vae, write_section

from ppl_vae.distributed import init, reduce_gradients, world
from ppl_vae.svi import TrainConfig, _shard_step, _StepLosses, collect_params, svi_step

HERE = Path(__file__).resolve()


def worker(batch: int, steps: int, warmup: int, out: str) -> None:
    """One timed run (in each rank under torchrun); rank 0 writes the figures to ``out``."""
    torch.set_num_threads(1)
    init(torch.device("cpu"))
    w = world()
    data, model, guide = reference_vae(torch.device("cpu"))
    config = TrainConfig(batch_size=batch)
    g = torch.Generator().manual_seed(0)
    params = collect_params(model, guide, data.encode(data.train[:batch], generator=g), 60000)
    optimizer = torch.optim.Adam(params.values(), lr=1e-3)
    loss = _StepLosses(model, guide, params, config)(1.0)
    plist = list(params.values())
    batches = list(data.batches(batch, "train", generator=g))[: warmup + steps]
    num_data = data.train.shape[0]

    def step(x):
        if w.active:
            return _shard_step(loss, optimizer, plist, x, num_data, w)
        return svi_step(loss, optimizer, x, num_data)

    for x in batches[:warmup]:
        step(x)
    if w.active:
        torch.distributed.barrier()
    t0 = time.perf_counter()
    for x in batches[warmup:]:
        step(x)
    float(step(batches[0]))  # one more step, read back: everything before it has run
    seconds = (time.perf_counter() - t0) / (steps + 1)
    reduce_seconds = None
    if w.active:
        for p in plist:
            p.grad = torch.zeros_like(p)
        torch.distributed.barrier()
        t0 = time.perf_counter()
        for _ in range(steps):
            reduce_gradients(plist, 0.5)
        reduce_seconds = (time.perf_counter() - t0) / steps
    if w.main:
        Path(out).write_text(json.dumps({"step": seconds, "reduce": reduce_seconds}))


def launch(processes: int, batch: int, steps: int, warmup: int, out: Path) -> dict:
    args = [str(HERE), "--worker", "--batch-size", str(batch), "--steps", str(steps)]
    args += ["--warmup", str(warmup), "--out", str(out)]
    if processes == 1:
        command = [sys.executable, *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={processes}", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, env=env, capture_output=True, text=True)
    return json.loads(out.read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[100, 200, 500])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.batch_size[0], args.steps, args.warmup, args.out)
        return 0
    rows = []
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"ppl_vae_ddp_{os.getpid()}.json"
    for batch in args.batch_size:
        runs = {1: [], 2: []}
        for _ in range(args.repeats):
            for processes in (1, 2):
                runs[processes].append(launch(processes, batch, args.steps, args.warmup, out))
        ratios = [a["step"] / b["step"] for a, b in zip(runs[1], runs[2], strict=True)]
        one = statistics.median(r["step"] for r in runs[1])
        two = statistics.median(r["step"] for r in runs[2])
        reduce = statistics.median(r["reduce"] for r in runs[2])
        rows.append(
            f"| {batch} | {batch / one:,.0f} | {batch / two:,.0f} | "
            f"**{statistics.median(ratios):.2f}** | {reduce * 1e3:.2f} ms "
            f"({reduce / two:.0%}) |"
        )
        print(rows[-1], file=sys.stderr)
    out.unlink(missing_ok=True)
    torch.set_num_threads(1)
    body = "\n".join(
        [
            f"{describe(torch.device('cpu'))} per process; {args.steps} timed steps after "
            f"{args.warmup}, median of {args.repeats} alternating repeats.",
            "",
            "| global batch | 1 process, images/s | 2 processes, images/s | speed-up | "
            "all-reduce per step (share) |",
            "|---|---|---|---|---|",
            *rows,
        ]
    )
    print(body)
    if args.write:
        write_section("ddp (cpu, gloo)", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
