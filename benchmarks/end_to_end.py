r"""``ppl-vae train`` end to end against a hand-written PyTorch script, interleaved.

Both train the reference VAE on MNIST for ``--epochs`` epochs (default 2) on ``--device`` from
a fresh Python process, as a user runs them: ``ppl-vae train --dataset mnist --epochs 2`` with
its defaults
(the captured step, fused Adam, the test ELBO every epoch, the checkpoint and run directory,
the five pictures) and ``benchmarks/hand_train.py`` (the same networks, loss, batch and rate in
bare PyTorch, torch's default Adam, the test ELBO every epoch, a checkpoint and two pictures).
Each is one wall-clock time from process start to exit, imports included; the two alternate,
the order rotated each repeat; medians, and the median of the per-repeat ratios. Every
process gets ``--threads`` threads (``OMP_NUM_THREADS``).

Run: ``python benchmarks/end_to_end.py --threads 1 --write`` (``PPL_VAE_DATA`` names the folder
holding MNIST/raw; ``--write`` updates docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import describe, medians, parse_args, write_section

HERE = Path(__file__).resolve().parent


def commands(epochs: int, data: str, out: Path, device: str) -> dict[str, list[str]]:
    """The two contenders' command lines on ``device``, each writing under ``out``."""
    return {
        "ppl-vae train": [
            sys.executable, "-m", "ppl_vae", "train", "--dataset", "mnist", "--epochs",
            str(epochs), "--device", device, "--quiet", "--out", str(out / "ppl_vae"),
        ],
        "hand-written": [
            sys.executable, str(HERE / "hand_train.py"), "--data", data, "--epochs",
            str(epochs), "--device", device, "--out", str(out / "hand"),
        ],
    }  # fmt: skip


def run(command: list[str], env: dict[str, str]) -> float:
    """Seconds from start to exit of one process; raises if it fails."""
    t0 = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    args, device = parse_args(parser, argv, repeats=3)
    data = os.environ.get("PPL_VAE_DATA")
    if not data:
        parser.error("set PPL_VAE_DATA to the folder holding MNIST/raw")
    threads = str(args.threads or torch.get_num_threads())
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    times: dict[str, list[float]] = {"ppl-vae train": [], "hand-written": []}
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="e2e-") as tmp:
            cmds = commands(args.epochs, data, Path(tmp), str(device))
            names = list(cmds)[repeat % 2 :] + list(cmds)[: repeat % 2]
            for name in names:
                times[name].append(run(cmds[name], env))
                print(f"repeat {repeat + 1}: {name} {times[name][-1]:.2f} s", flush=True)
    ratios = [a / b for a, b in zip(times["ppl-vae train"], times["hand-written"], strict=True)]
    med = medians(times)
    table = "\n".join(
        [
            f"{describe(device)} per process; MNIST, {args.epochs} epochs from a fresh process "
            f"(imports included), {args.repeats} interleaved repeats; medians, ratio the median "
            f"of the per-repeat ratios.",
            "",
            "| ppl-vae train s | hand-written script s | ppl-vae / hand |",
            "|---|---|---|",
            f"| {med['ppl-vae train']:.2f} | {med['hand-written']:.2f} | "
            f"**{statistics.median(ratios):.3f}** |",
        ]
    )
    print(table)
    if args.write:
        write_section(f"end to end ({device.type})", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
