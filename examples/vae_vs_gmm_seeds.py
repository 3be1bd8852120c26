r"""The CLI's VAE against an 8-component Gaussian mixture on a 2-D set, over several data draws.

A single draw of 10,000 training and 2,000 test points cannot tell apart two models whose
held-out log-likelihoods differ by less than a thousandth of a nat: the paired standard error
is about 0.0005 nats per point, and a model that fits its training draw a little better or
worse than another moves by as much from one draw to the next. This script repeats the
comparison over data seeds (``--seed`` draws the data set, and seeds the training):

- the VAE: ``ppl-vae train --dataset SET --seed S`` with the command line's defaults for 2-D
  sets (``ppl_vae/presets.py``), then ``ppl-vae evaluate --checkpoint last`` (importance
  sampling, ``--num-samples`` draws per test point); a run folder that already holds its
  ``evaluate.json`` is reused, so an interrupted sweep continues where it stopped;
- an 8-component full-covariance mixture fitted by EM to the same training points twice: as
  ``ppl-vae em --dataset SET --seed S`` fits it (one k-means start seeded by S, ``tol=1e-3``)
  and the best of 10 starts (``tol=1e-6``); each scored exactly on the same test points;
- for ring8, the true density (8 Gaussians of sd 0.1 on a circle of radius 2).

Each difference is paired over the test points of its draw (± its standard error); the last
rows give the mean difference over the draws, ± the standard error of that mean.

Run (wall-clock times measured with two runs at once on the two cores):
    python examples/vae_vs_gmm_seeds.py --quick   # one draw, 3 epochs, 200 draws: ~40 s
    python examples/vae_vs_gmm_seeds.py --dataset ring8 --seeds 0-6 --out runs/vae-vs-gmm
        # 400 epochs per draw: about 3 minutes each
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ppl_vae import DataConfig, GaussianMixture, load_data

RING8_SD, RING8_RADIUS = 0.1, 2.0


def ring8_log_density(x: torch.Tensor) -> torch.Tensor:
    """log p(x) of ring8's generating mixture (``ppl_vae.data.ring8``), per point."""
    angle = torch.arange(8, dtype=x.dtype) * (2 * math.pi / 8)
    centres = RING8_RADIUS * torch.stack([angle.cos(), angle.sin()], 1)
    var = RING8_SD**2
    log_k = -((x[:, None] - centres) ** 2).sum(-1) / (2 * var) - math.log(2 * math.pi * var)
    return torch.logsumexp(log_k, 1) - math.log(8)


def vae_log_px(dataset: str, seed: int, run: Path, train_args: list[str], samples: int):
    """The per-point test log p(x) of the CLI's VAE for data seed ``seed`` (trained if needed)."""
    record = run / "evaluate.json"
    if not record.exists():
        cli = [sys.executable, "-m", "ppl_vae"]
        common = ["--seed", str(seed), "--quiet"]
        train = ["train", "--dataset", dataset, "--out", str(run), *common, *train_args]
        subprocess.run([*cli, *train], check=True)
        evaluate = ["evaluate", "--run", str(run), "--checkpoint", "last"]
        subprocess.run([*cli, *evaluate, "--num-samples", str(samples), *common], check=True)
    return torch.tensor(json.loads(record.read_text())["log_px"], dtype=torch.float64)


def mixture_log_px(train: torch.Tensor, test: torch.Tensor, **options) -> torch.Tensor:
    gmm = GaussianMixture(n_components=8, covariance_type="full", **options)
    return gmm.fit(train).score_samples(test)


def paired(d: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of the mean of per-point (or per-draw) differences."""
    return d.mean().item(), (d.std() / math.sqrt(len(d))).item()


def fmt(pair: tuple[float, float]) -> str:
    return f"{pair[0]:+.5f} ± {pair[1]:.5f}"


def parse_seeds(text: str) -> list[int]:
    if "-" in text:
        first, last = (int(s) for s in text.split("-"))
        return list(range(first, last + 1))
    return [int(s) for s in text.split(",")]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="ring8", choices=("pinwheel", "moons", "ring8"))
    parser.add_argument("--seeds", default="0-6", help="data seeds: FIRST-LAST or S1,S2,...")
    parser.add_argument("--num-samples", type=int, default=5000, help="IS draws per point")
    parser.add_argument("--out", default=None, help="folder of the runs (default: temporary)")
    parser.add_argument("--quick", action="store_true", help="one draw, 3 epochs, 200 draws")
    args = parser.parse_args(argv)
    seeds = [0] if args.quick else parse_seeds(args.seeds)
    samples = 200 if args.quick else args.num_samples
    train_args = ["--epochs", "3", "--lr-schedule", "constant"] if args.quick else []
    out = Path(args.out or tempfile.mkdtemp(prefix="vae-vs-gmm-"))

    names = ["VAE − GMM-8 (em defaults)", "VAE − GMM-8 (best of 10)"]
    if args.dataset == "ring8":
        names += ["VAE − truth", "GMM-8 (best of 10) − truth"]
    rows, diffs = [], {name: [] for name in names}
    for seed in seeds:
        data = load_data(DataConfig(dataset=args.dataset, seed=seed))
        train, test = data.train.double(), data.test.double()
        vae = vae_log_px(args.dataset, seed, out / f"vae-{seed}", train_args, samples)
        # as `ppl-vae em --dataset SET --seed S` fits it: --seed seeds the start too
        em = mixture_log_px(train, test, tol=1e-3, seed=seed)
        best = mixture_log_px(train, test, tol=1e-6, n_init=10, seed=seed)
        per_point = [vae - em, vae - best]
        cells = [f"{m.mean():.4f}" for m in (em, best, vae)]
        if args.dataset == "ring8":
            truth = ring8_log_density(test)
            per_point += [vae - truth, best - truth]
            cells.insert(0, f"{truth.mean():.4f}")
        for name, d in zip(names, per_point, strict=True):
            diffs[name].append(d.mean().item())
        rows.append([str(seed), *cells, *(fmt(paired(d)) for d in per_point)])

    head = ["data seed", "GMM-8, em defaults", "GMM-8, best of 10", "VAE (IS)", *names]
    if args.dataset == "ring8":
        head.insert(1, "true density")
    print(f"{args.dataset}: test log-likelihood, nats per point (runs in {out})")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    means = {}
    for name, values in diffs.items():
        means[name] = paired(torch.tensor(values, dtype=torch.float64)) if len(values) > 1 else None
        if means[name] is not None:
            print(f"mean over {len(values)} draws, {name}: {fmt(means[name])}")
    return {"rows": rows, "means": means, "differences": diffs}


if __name__ == "__main__":
    main()
