r"""The sandwich ELBO <= IWAE_k <= log p(x), made visible on one trained VAE.

For a model p(x, z) and a guide q(z|x), with importance weights w_j = p(x, z_j) / q(z_j|x) and
z_1, ..., z_k drawn from q,

    ELBO = E[log w_1]  <=  IWAE_k = E[log (1/k) sum_j w_j]  <=  IWAE_2k  <=  ...  <=  log p(x)

(Burda et al. 2015). ``log_likelihood_diagnostics(model, guide, x, num_samples=K,
iwae_ks=(1, 2, 4, ..., K))`` returns all of them from the same K draws per point: the ELBO, the
IWAE_k bound for each k (averaged over the K/k disjoint groups of k draws when k divides K,
over cyclic windows of k draws otherwise), and the importance-sampled log p(x) itself, which is
IWAE_K. With k a power of 2 dividing K, each bound is at most the next one for every single
point, not only in expectation (log of a mean of group means >= mean of their logs). The
effective sample size (sum w)^2 / sum w^2 of k draws, from separate calls with
``num_samples=k``, says how far the guide is from the posterior: it would be k if q(z|x) were
p(z|x).

The model is the default VAE (``build_vae(VAEConfig())``: z = 50, MLP 200-200 tanh, Gaussian
guide, Bernoulli p(x|z)) trained by ``train`` on dynamically binarized MNIST; ``--run DIR``
sweeps a run trained by ``ppl-vae train`` instead.

Run (wall-clock times measured on one CPU thread, another run busy on the second core):
    python examples/marginal_likelihood.py --quick   # 5k images, 2 epochs, 100 points, K=256: ~15 s
    python examples/marginal_likelihood.py --out docs/img/marginal_likelihood.png   # ~4.5 min
    python examples/marginal_likelihood.py --run runs/mnist --max-k 4096

MNIST is read from --data-dir, else $PPL_VAE_DATA, else ~/.cache/ppl_vae (see the README).
"""

from __future__ import annotations

import argparse
import time

import matplotlib.pyplot as plt
import pyro
import torch
from matplotlib.ticker import FuncFormatter

from ppl_vae import (
    DataConfig,
    TrainConfig,
    VAEConfig,
    build_vae,
    load_data,
    log_likelihood_diagnostics,
    train,
)
from ppl_vae.runs import load_run
from ppl_vae.runs.files import save_figure


def trained_pair(args):
    """A trained model and guide with their data: loaded from --run, or trained here."""
    if args.run:
        run = load_run(args.run, "cpu", data_dir=args.data_dir)
        return run.model, run.guide, run.data, f"run {args.run}"
    data = load_data(DataConfig("mnist", "dynamic", data_dir=args.data_dir))
    if args.num_train is not None:
        data = data.head(args.num_train)
    pyro.set_rng_seed(args.seed)
    model, guide = build_vae(VAEConfig(), data)
    metrics = train(model, guide, data, TrainConfig(epochs=args.epochs, seed=args.seed), quiet=True)
    print(f"trained {args.epochs} epochs: test ELBO {metrics[-1]['test_elbo']:.2f}", flush=True)
    what = f"MNIST VAE (z=50, Gaussian guide), {len(data.train)} images, {args.epochs} epochs"
    return model, guide, data, what


def sweep(model, guide, x, max_k: int, seed: int) -> dict:
    ks = [2**i for i in range(max_k.bit_length()) if 2**i <= max_k]
    torch.manual_seed(seed)
    r = log_likelihood_diagnostics(model, guide, x, num_samples=max_k, iwae_ks=ks)
    n = x.shape[0]
    ess = {}
    for k in ks:  # fresh draws: the ESS of k draws, averaged over the points
        torch.manual_seed(seed + k)
        ess[k] = log_likelihood_diagnostics(model, guide, x, num_samples=k).ess.mean().item()
    return {
        "ks": ks,
        "elbo": r.elbo.mean().item(),
        "log_px": r.log_px.mean().item(),
        "log_px_se": (r.log_px.std() / n**0.5).item(),
        "gap_se": ((r.log_px - r.elbo).std() / n**0.5).item(),
        "iwae": {k: r.iwae[k].mean().item() for k in ks},
        "ess": ess,
    }


def figure(s: dict, what: str, n: int):
    ks = s["ks"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
    left.axhline(s["log_px"], color="C3", ls="--", label=f"log p(x), K={ks[-1]}: {s['log_px']:.2f}")
    left.plot(ks, [s["iwae"][k] for k in ks], "o-", color="C1", label="IWAE_k")
    left.axhline(s["elbo"], color="C0", ls=":", label=f"ELBO: {s['elbo']:.2f}")
    left.set_xscale("log", base=2)
    left.set_xlabel("k, importance samples inside the log")
    left.set_ylabel("nats per test image")
    left.set_title(
        f"ELBO ≤ IWAE_k ≤ log p(x) (same draws; s.e. over images {s['log_px_se']:.2f},\n"
        f"paired s.e. of log p(x) − ELBO {s['gap_se']:.2f})",
        fontsize=10,
    )
    left.legend(loc="center right", fontsize=9)
    right.loglog(ks, [s["ess"][k] for k in ks], "o-", color="C2", base=2, label="mean ESS")
    right.loglog(ks, ks, "k--", lw=1, base=2, label="ESS = k (q = posterior)")
    right.set_xlabel("k, draws from q(z|x)")
    right.set_ylabel("effective sample size (Σw)² / Σw²")
    right.set_title("effective sample size of k draws", fontsize=10)
    right.legend(loc="upper left", fontsize=9)
    for ax in (left, right):
        ax.grid(alpha=0.3, which="both")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    right.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    fig.suptitle(f"{what}; {n} test images", fontsize=10)
    fig.tight_layout()
    return fig


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", default=None, help="a run directory to sweep instead of training")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--num-train", type=int, default=None, help="first N training images")
    parser.add_argument("--points", type=int, default=500, help="test images")
    parser.add_argument("--max-k", type=int, default=2048, help="K: draws per image (a power of 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="marginal_likelihood.png", help="where the figure goes")
    parser.add_argument(
        "--quick", action="store_true", help="5k images, 2 epochs, 100 points, K=256"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.num_train, args.epochs, args.points, args.max_k = 5000, 2, 100, 256
    if args.max_k < 1 or args.max_k & (args.max_k - 1):
        parser.error(f"--max-k must be a power of 2, got {args.max_k}")
    torch.set_num_threads(1)

    model, guide, data, what = trained_pair(args)
    x = data.encode(data.test[: args.points], generator=torch.Generator().manual_seed(args.seed))
    t0 = time.perf_counter()
    s = sweep(model, guide, x, args.max_k, args.seed)
    print(f"{args.points} test images, K={args.max_k}, {time.perf_counter() - t0:.0f} s")
    print(f"ELBO {s['elbo']:.3f}")
    print(f"log p(x) {s['log_px']:.3f} ± {s['log_px_se']:.3f}")
    print("| k | IWAE_k | log p(x) - IWAE_k | IWAE_k - ELBO | ESS of k draws | ESS / k |")
    print("|---|---|---|---|---|---|")
    for k in s["ks"]:
        b, e = s["iwae"][k], s["ess"][k]
        print(f"| {k} | {b:.3f} | {s['log_px'] - b:.3f} | {b - s['elbo']:.3f} | {e:.2f} | "
              f"{e / k:.3f} |")  # fmt: skip
    print(f"wrote {save_figure(figure(s, what, args.points), args.out)}")
    return s


if __name__ == "__main__":
    main()
