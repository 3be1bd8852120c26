r"""Gaussian mixtures fitted by EM against a VAE, on the same 2-D data and the same metric.

The metric is the held-out log-likelihood, in nats per test point (higher is better; NLL is its
negative):

- 2-D sets ``pinwheel``, ``moons``, ``ring8`` (``load_data(DataConfig(name))``: 10,000 training
  and 2,000 test points): full-covariance Gaussian mixtures with K = 1, 4, 8, 16, 32 (float64,
  k-means initialisation, best of 3, ``tol=1e-5``, up to 1000 iterations), whose test
  log-likelihood is exact; and a VAE with a 2-D latent space and a Gaussian p(x|z) (learned
  per-dimension sigma; MLP 200-200, tanh), trained for 30 epochs with a 10-epoch KL warm-up,
  whose test log p(x) is estimated by importance sampling with the guide as proposal and 1000
  draws per point (``ppl_vae.evaluate_run``). The figure puts, for each set, the test points,
  the mixture's log-density (``--figure-k`` components, exact) and the VAE's (importance-sampled
  on a 100 x 100 grid, ``--grid-samples`` draws per grid point) side by side, on shared colour
  levels (1-nat steps over the 12 nats below the mixture's maximum), with the held-out
  log-likelihood in the titles.
- statically binarized MNIST (60,000 / 10,000, one fixed Bernoulli draw from seed 0): Bernoulli
  mixtures (MAP-EM, Beta(2, 2) prior) with K = 10, 50, 100, flattened to 784 pixels, float32;
  table only (``--mnist-ks ""`` skips them).

Everything is printed as one Markdown table at the end.

Run (wall-clock times measured on one CPU thread, another run busy on the second core):
    python examples/em_vs_vae.py --quick   # ring8, K = 1 and 8, 2 epochs, no MNIST: ~15 s
    python examples/em_vs_vae.py --figure docs/img/em_vs_vae.png   # the defaults: 2.5-5 min

MNIST is read from --data-dir, else $PPL_VAE_DATA, else ~/.cache/ppl_vae (see the README).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from ppl_vae import (
    BernoulliMixture,
    DataConfig,
    EvaluateConfig,
    GaussianMixture,
    TrainConfig,
    VAEConfig,
    evaluate_run,
    load_data,
    log_likelihood,
    train_run,
)
from ppl_vae.runs.files import save_figure


def fit_gaussian_mixtures(data, ks, seed: int) -> list[dict]:
    train, test = data.train.double(), data.test.double()
    rows = []
    for k in ks:
        t0 = time.perf_counter()
        gm = GaussianMixture(k, "full", tol=1e-5, max_iter=1000, n_init=3, seed=seed)
        gm.fit(train)
        rows.append(
            {
                "model": f"GMM full K={k}",
                "k": k,
                "train": gm.score(train),
                "test": gm.score(test),
                "iterations": gm.n_iter_,
                "seconds": time.perf_counter() - t0,
                "mixture": gm,
            }
        )
        print(f"  {rows[-1]['model']}: test {rows[-1]['test']:.4f}", flush=True)
    return rows


def fit_vae(name: str, epochs: int, samples: int, runs_dir: Path) -> dict:
    t0 = time.perf_counter()
    run = train_run(
        DataConfig(name),
        VAEConfig(latent_dim=2),
        TrainConfig(epochs=epochs, kl_warmup=min(10, epochs)),
        runs_dir / f"vae-{name}",
        "cpu",
        quiet=True,
        pictures=False,
    )
    trained = time.perf_counter() - t0
    result = evaluate_run(run, EvaluateConfig(num_samples=samples))
    return {
        "model": f"VAE z=2, {epochs} epochs",
        "train": None,
        "test": -result["nll"],
        "test_se": result["nll_standard_error"],
        "elbo": result["elbo"],
        "ess": result["ess"],
        "iterations": epochs,
        "seconds": trained,
        "eval_seconds": time.perf_counter() - t0 - trained,
        "run": run,
    }


def vae_log_density(run, grid: torch.Tensor, samples: int) -> torch.Tensor:
    """Importance-sampled log p(x) of the VAE at every grid point (guide as proposal)."""
    torch.manual_seed(0)
    pieces = [
        log_likelihood(run.model, run.guide, grid[i : i + 2000], num_samples=samples)
        for i in range(0, len(grid), 2000)
    ]
    return torch.cat(pieces)


def figure(panels: list[tuple], k: int, grid_samples: int, is_samples: int):
    rows = len(panels)
    fig, axes = plt.subplots(
        rows, 3, figsize=(10, 2.95 * rows), squeeze=False, layout="constrained"
    )
    for row, (name, data, gmm, vae) in zip(axes, panels, strict=True):
        test = data.test.double()
        lo, hi = test.min(0).values, test.max(0).values
        pad = 0.1 * (hi - lo)
        size = 100
        xs = torch.linspace(lo[0] - pad[0], hi[0] + pad[0], size, dtype=torch.float64)
        ys = torch.linspace(lo[1] - pad[1], hi[1] + pad[1], size, dtype=torch.float64)
        gx, gy = torch.meshgrid(xs, ys, indexing="xy")
        grid = torch.stack([gx.flatten(), gy.flatten()], 1)
        log_p = {
            "gmm": gmm["mixture"].score_samples(grid).reshape(size, size),
            "vae": vae_log_density(vae["run"], grid.float(), grid_samples).reshape(size, size),
        }
        # shared levels: the 12 nats below the mixture's exact maximum (values outside are
        # clipped, so an importance-sampling outlier cannot wash out the colour scale)
        top = math.ceil(log_p["gmm"].max().item() * 2) / 2
        levels = torch.linspace(top - 12, top, 13).numpy()  # 1-nat steps
        row[0].scatter(test[:, 0], test[:, 1], s=1, alpha=0.5)
        row[0].set_title(f"{name}: {len(test):,} test points", fontsize=9)
        titles = {
            "gmm": f"EM Gaussian mixture, full, K={k}\nheld-out log-lik {gmm['test']:.3f}",
            "vae": f"VAE, z=2: held-out log-lik {vae['test']:.3f}\n"
            f"(importance-sampled, {is_samples} draws)",
        }
        for ax, key in zip(row[1:], ("gmm", "vae"), strict=True):
            values = log_p[key].clamp(levels[0], levels[-1]).numpy()
            filled = ax.contourf(gx.numpy(), gy.numpy(), values, levels=levels, cmap="viridis")
            ax.set_title(titles[key], fontsize=9)
        fig.colorbar(filled, ax=row[1:], label="log p(x), nats", shrink=0.9, ticks=levels[::2])
        for ax in row:
            ax.set_xlim(xs[0], xs[-1])
            ax.set_ylim(ys[0], ys[-1])
            ax.set_aspect("equal")
            ax.set_xlabel("x1")
        row[0].set_ylabel("x2")
    fig.suptitle(
        f"log-density on shared levels per row: data, EM Gaussian mixture (exact), VAE "
        f"(importance-sampled on the grid, {grid_samples} draws per point)",
        fontsize=10,
    )
    return fig


def mnist_mixtures(ks, seed: int, data_dir: str | None) -> list[dict]:
    data = load_data(DataConfig("mnist", "static", data_dir=data_dir))
    train, test = data.train.flatten(1), data.test.flatten(1)
    rows = []
    for k in ks:
        t0 = time.perf_counter()
        bm = BernoulliMixture(k, alpha=1.0, tol=1e-3, max_iter=300, seed=seed).fit(train)
        rows.append(
            {
                "model": f"Bernoulli mixture K={k}",
                "train": bm.score(train),
                "test": bm.score(test),
                "iterations": bm.n_iter_,
                "converged": bm.converged_,
                "seconds": time.perf_counter() - t0,
            }
        )
        print(f"  {rows[-1]['model']}: test NLL {-rows[-1]['test']:.2f}", flush=True)
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default="pinwheel,moons,ring8")
    parser.add_argument("--ks", default="1,4,8,16,32", help="Gaussian mixture sizes")
    parser.add_argument("--figure-k", type=int, default=16, help="mixture shown in the figure")
    parser.add_argument("--epochs", type=int, default=30, help="VAE training epochs")
    parser.add_argument("--is-samples", type=int, default=1000, help="IS draws per test point")
    parser.add_argument("--grid-samples", type=int, default=200, help="IS draws per grid point")
    parser.add_argument("--mnist-ks", default="10,50,100", help="Bernoulli mixture sizes")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--runs-dir", default=None, help="keep the VAE runs here")
    parser.add_argument("--figure", default="em_vs_vae.png", help="where the figure goes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="ring8 only, K = 1 and 8, 2 epochs, few draws"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.datasets, args.ks, args.figure_k, args.mnist_ks = "ring8", "1,8", 8, ""
        args.epochs, args.is_samples, args.grid_samples = 2, 100, 20
    torch.set_num_threads(1)
    ks = [int(k) for k in args.ks.split(",") if k]
    if args.figure_k not in ks:
        ks.append(args.figure_k)

    results, panels = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        runs_dir = Path(args.runs_dir or tmp)
        for name in [n for n in args.datasets.split(",") if n]:
            print(name, flush=True)
            data = load_data(DataConfig(name))
            gmms = fit_gaussian_mixtures(data, ks, args.seed)
            vae = fit_vae(name, args.epochs, args.is_samples, runs_dir)
            print(f"  {vae['model']}: test {vae['test']:.4f} ± {vae['test_se']:.4f}", flush=True)
            results[name] = gmms + [vae]
            shown = next(g for g in gmms if g["k"] == args.figure_k)
            panels.append((name, data, shown, vae))
        if panels:
            fig = figure(panels, args.figure_k, args.grid_samples, args.is_samples)
            print(f"wrote {save_figure(fig, args.figure)}", flush=True)
    mnist_ks = [int(k) for k in args.mnist_ks.split(",") if k]
    if mnist_ks:
        print("mnist (static binarization)", flush=True)
        results["mnist"] = mnist_mixtures(mnist_ks, args.seed, args.data_dir)

    print("\n| data set | model | test log-lik (nats/point) | train log-lik | iterations | s |")
    print("|---|---|---|---|---|---|")
    for name, rows in results.items():
        for r in rows:
            train = "" if r["train"] is None else f"{r['train']:.4f}"
            test = f"{r['test']:.4f}"
            if "test_se" in r:
                test += f" ± {r['test_se']:.4f}"
            print(
                f"| {name} | {r['model']} | {test} | {train} | {r['iterations']} | "
                f"{r['seconds']:.1f} |"
            )
    return results


if __name__ == "__main__":
    main()
