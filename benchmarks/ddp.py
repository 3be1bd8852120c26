r"""Training throughput of 2 processes x 1 thread (torchrun, gloo) against 1 process x 1 thread.

The step is the one :func:`ppl_vae.svi.train` takes: the reference MNIST VAE (MLP 784-200-200,
z = 50, Bernoulli, dynamic binarization; 425,284 parameters), the captured ELBO step, one Adam.
Contenders, for each global ``--batch-size`` B:

- ``one``: one process on batches of B;
- ``half``: one process on batches of B/2 -- what each of two ranks computes; one/half is the
  speed-up two processes would reach if communication were free;
- ``shared``: two processes under torchrun, each on its half of every batch, the gradients of
  one flat buffer summed through shared memory after backward (what ``train`` does on one
  machine, :func:`ppl_vae.distributed.reduce_gradients`, :class:`~ppl_vae.distributed.SharedSum`);
- ``flat``: the same, the buffer summed by one gloo all-reduce (``PPL_VAE_SHARED_SUM=0``);
- ``buckets``: the same with 1 MB buckets all-reduced asynchronously as backward produces them
  (parameter hooks, as ``DistributedDataParallel`` overlaps communication with backward).

Each run takes ``--warmup`` untimed steps, then times ``--steps`` steps; throughput is images
per second of the global batch. Contenders alternate, ``--repeats`` times; a speed-up is the
median of the per-repeat ratios. The last two columns are one sum of all the gradients in one
buffer, alone (``--steps`` calls): through shared memory, and gloo's all-reduce, with its share
of the ``flat`` step.

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
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from common import describe, reference_vae, write_section
from torch import Tensor

from ppl_vae.distributed import SharedSum, batch_shard, init, world
from ppl_vae.svi import StepLosses, TrainConfig, collect_params, shard_step, svi_step

HERE = Path(__file__).resolve()


class GradientReducer:
    """Sums gradients over the ranks while backward still runs, bucket by bucket.

    ``params`` are split, in reverse order (backward reaches the last layers first), into
    buckets of about ``bucket_bytes``. A hook on each parameter notes its gradient; when a
    bucket's gradients are all there (and every earlier bucket has gone, so that all ranks
    issue the same all-reduces in the same order) the bucket is scaled by the rank's share,
    flattened and handed to an asynchronous all-reduce, which overlaps the rest of backward.
    :meth:`finish` waits for them and puts the sums into ``.grad``: what
    ``DistributedDataParallel`` does, for a step that never calls a module's ``forward``. Here
    as a contender only: on this machine it was slower than one all-reduce after backward.
    """

    def __init__(self, params: Sequence[Tensor], bucket_bytes: int = 1 << 20):
        self.params = list(params)
        self.buckets: list[list[int]] = [[]]
        size = 0
        for i in reversed(range(len(self.params))):
            if size >= bucket_bytes:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(i)
            size += self.params[i].numel() * self.params[i].element_size()
        self.bucket_of = {i: b for b, bucket in enumerate(self.buckets) for i in bucket}
        self.share, self.stepping = 1.0, False
        self.missing: list[int] = []
        self.sent: list[tuple] = []  # (flat buffer, work) for buckets 0, 1, ...
        self.hooks = [
            p.register_post_accumulate_grad_hook(lambda _, i=i: self._ready(i))
            for i, p in enumerate(self.params)
        ]

    def close(self) -> None:
        """Removes the hooks."""
        for hook in self.hooks:
            hook.remove()

    def start(self, share: float) -> None:
        """Before a step's backward: this rank's share of the batch."""
        self.share, self.stepping = share, True
        self.missing = [len(bucket) for bucket in self.buckets]
        self.sent = []

    def _ready(self, i: int) -> None:
        if not self.stepping:  # a backward outside a step (a check of the recorded step)
            return
        self.missing[self.bucket_of[i]] -= 1
        while len(self.sent) < len(self.buckets) and self.missing[len(self.sent)] == 0:
            self._send(len(self.sent))

    def _send(self, b: int) -> None:
        grads = []
        for i in self.buckets[b]:
            p = self.params[i]
            grads.append((p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1))
        flat = torch.cat(grads).mul_(self.share)
        self.sent.append((flat, dist.all_reduce(flat, dist.ReduceOp.SUM, async_op=True)))

    def finish(self) -> None:
        """After backward: waits for every bucket and replaces the gradients by the sums."""
        self.stepping = False
        while len(self.sent) < len(self.buckets):
            self._send(len(self.sent))
        for b, (flat, work) in enumerate(self.sent):
            work.wait()
            offset = 0
            for i in self.buckets[b]:
                p = self.params[i]
                p.grad = flat[offset : offset + p.numel()].view_as(p)
                offset += p.numel()


def worker(batch: int, steps: int, warmup: int, reducer: str, out: str) -> None:
    """One timed run (in each rank under torchrun); rank 0 writes the figures to ``out``."""
    os.environ["PPL_VAE_SHARED_SUM"] = "1" if reducer == "shared" else "0"
    torch.set_num_threads(1)
    init(torch.device("cpu"))
    w = world()
    data, model, guide = reference_vae(torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    params = collect_params(model, guide, data.encode(data.train[:batch], generator=g), 60000)
    optimizer = torch.optim.Adam(params.values(), lr=1e-3)
    loss = StepLosses(model, guide, params, config=TrainConfig(batch_size=batch))(1.0)
    plist = list(params.values())
    buckets = GradientReducer(plist) if w.distributed and reducer == "buckets" else None
    batches = []  # enough epochs' batches for every step (an epoch has 60,000 / batch)
    while len(batches) < warmup + steps:
        batches += list(data.batches(batch, "train", generator=g))
    batches = batches[: warmup + steps]
    num_data = data.train.shape[0]

    def step(x):
        if buckets is not None:
            part = batch_shard(x.shape[0], w)
            buckets.start((part.stop - part.start) / x.shape[0])
            return svi_step(loss, optimizer, x[part], num_data, before_update=buckets.finish)
        if w.distributed:
            return shard_step(loss, optimizer, x, params=plist, num_data=num_data, w=w)
        return svi_step(loss, optimizer, x, num_data)

    for x in batches[:warmup]:
        step(x)
    if w.distributed:
        dist.barrier()
    t0 = time.perf_counter()
    for x in batches[warmup:]:
        step(x)
    float(step(batches[0]))  # one more step, read back: everything before it has run
    seconds = (time.perf_counter() - t0) / (steps + 1)
    reduce_seconds, shared_seconds = None, None
    if w.distributed:
        flat = torch.zeros(sum(p.numel() for p in plist))  # every gradient, one buffer
        summer = SharedSum.of(flat.numel(), flat)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(steps):
            dist.all_reduce(flat)
        reduce_seconds = (time.perf_counter() - t0) / steps
        if summer is not None:
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(steps):
                summer([flat])
            shared_seconds = (time.perf_counter() - t0) / steps
    if w.main:
        figures = {"step": seconds, "reduce": reduce_seconds, "shared": shared_seconds}
        Path(out).write_text(json.dumps(figures))
    if w.distributed:  # no rank leaves the group while another still works
        dist.barrier()
        dist.destroy_process_group()


CONTENDERS = {
    "one": (1, 1, "flat"),
    "half": (1, 2, "flat"),
    "shared": (2, 1, "shared"),
    "flat": (2, 1, "flat"),
    "buckets": (2, 1, "buckets"),
}
# processes, batch divisor, reducer


def launch(name: str, batch: int, steps: int, warmup: int, out: Path) -> dict:
    processes, divisor, reducer = CONTENDERS[name]
    args = [str(HERE), "--worker", "--batch-size", str(batch // divisor), "--steps", str(steps)]
    args += ["--warmup", str(warmup), "--reducer", reducer, "--out", str(out)]
    if processes == 1:
        command = [sys.executable, *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={processes}", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, env=env, capture_output=True, text=True)
    return json.loads(out.read_text())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[100, 500])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--reducer", default="flat", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args, unknown = parser.parse_known_args(argv)
    if any(a.split("=")[0] == "--device" for a in unknown):
        sys.exit("ddp.py measures CPU processes (gloo) and takes no --device; run it without")
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.worker:
        worker(args.batch_size[0], args.steps, args.warmup, args.reducer, args.out)
        return 0
    rows = []
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"ppl_vae_ddp_{os.getpid()}.json"
    for batch in args.batch_size:
        runs: dict[str, list[dict]] = {name: [] for name in CONTENDERS}
        for r in range(args.repeats):
            names = list(CONTENDERS)
            k = r % len(names)
            for name in names[k:] + names[:k]:  # the order rotated
                runs[name].append(launch(name, batch, args.steps, args.warmup, out))

        def speedup(name, runs=runs):
            ratios = [a["step"] / b["step"] for a, b in zip(runs["one"], runs[name], strict=True)]
            return statistics.median(ratios)

        step = {name: statistics.median(m["step"] for m in v) for name, v in runs.items()}
        reduce = statistics.median(m["reduce"] for m in runs["flat"])
        shared = statistics.median(m["shared"] for m in runs["shared"])
        rows.append(
            f"| {batch} | {batch / step['one']:,.0f} | {speedup('half'):.2f} | "
            f"{batch / step['shared']:,.0f} | **{speedup('shared'):.2f}** | "
            f"{batch / step['flat']:,.0f} | {speedup('flat'):.2f} | "
            f"{batch / step['buckets']:,.0f} | {speedup('buckets'):.2f} | "
            f"{shared * 1e3:.2f} ms ({shared / step['shared']:.0%}) | "
            f"{reduce * 1e3:.2f} ms ({reduce / step['flat']:.0%}) |"
        )
        print(rows[-1], file=sys.stderr)
    out.unlink(missing_ok=True)
    torch.set_num_threads(1)
    lo = os.environ.get("GLOO_SOCKET_IFNAME")
    body = "\n".join(
        [
            f"{describe(torch.device('cpu'))} per process"
            + (f", GLOO_SOCKET_IFNAME={lo}" if lo else "")
            + f"; {args.steps} timed steps after {args.warmup}, median of {args.repeats} "
            "rotating repeats; speed-ups against one process on the whole batch.",
            "",
            "| global batch | 1 process, images/s | bound: 1 process on half | "
            "2 processes, shared-memory sum (train), images/s | speed-up | "
            "2 processes, gloo all-reduce, images/s | speed-up | "
            "2 processes, gloo buckets overlapping backward | speed-up | "
            "shared-memory sum alone (share) | gloo all-reduce alone (share) |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print(body)
    if args.write:
        write_section("ddp (cpu, gloo" + (f", {lo})" if lo else ")"), body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
