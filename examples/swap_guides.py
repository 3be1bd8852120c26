r"""One model, three guides: the same VAE trained with q(z|x) swapped, ELBO and log p(x) compared.

The model is ppl_vae's ``VAEModel`` (``build_vae``: p(z) = N(0, I), MLP 200-200 tanh decoder,
Bernoulli p(x|z)) on dynamically binarized MNIST. It is trained three times, from the same
initial decoder, on the same data, for the same epochs and seed, each time with another guide:

- ``gaussian``: q(z|x) = N(mu(x), diag sigma(x)^2), the library's default;
- ``iaf``: the Gaussian followed by inverse autoregressive flow steps
  (``VAEConfig(guide="iaf")``);
- ``full-cov``: q(z|x) = N(mu(x), L(x) L(x)^T), written below as a plain Pyro function (an
  encoder in ``pyro.module``, one ``pyro.sample("z", MultivariateNormal(...))`` in the
  ``"data"`` plate); ``train`` and ``log_likelihood`` take it like any other guide.

Each trained pair is then scored on the same test images (one fixed binarization) with
``log_likelihood_diagnostics(model, guide, x, num_samples=K)``: the ELBO and the
importance-sampled log p(x) from the same K draws, with standard errors over the test points.
The gap log p(x) - ELBO is the average KL(q(z|x) || p(z|x)) the guide leaves; a richer guide
should shrink it, and its standard error is small because it is paired point by point.

Run (wall-clock times measured on one CPU thread, another run busy on the second core):
    python examples/swap_guides.py --quick   # 5k images, 2 epochs, 200 points x 100 draws: ~20 s
    python examples/swap_guides.py --out docs/img/swap_guides.png   # the defaults: 6.5-7 min

MNIST is read from --data-dir, else $PPL_VAE_DATA, else ~/.cache/ppl_vae (see the README).
"""

from __future__ import annotations

import argparse
import math
import time

import matplotlib.pyplot as plt
import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ppl_vae import (
    DataConfig,
    TrainConfig,
    VAEConfig,
    build_vae,
    load_data,
    log_likelihood_diagnostics,
    train,
)
from ppl_vae.runs.files import save_figure


def full_covariance_guide(event_shape, latent_dim: int, hidden: int = 200):
    """q(z|x) = N(mu(x), L(x) L(x)^T) as a plain Pyro function ``guide(x, num_data=None)``."""
    d = latent_dim
    rows, cols = torch.tril_indices(d, d)
    on_diagonal = rows == cols
    encoder = nn.Sequential(
        nn.Flatten(), nn.Linear(math.prod(event_shape), hidden), nn.Tanh(),
        nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, d + len(rows)),
    )  # fmt: skip
    with torch.no_grad():  # start as a diagonal Gaussian: the off-diagonal entries are 0
        off = d + (~on_diagonal).nonzero().squeeze(-1)
        encoder[-1].weight[off] = 0.0
        encoder[-1].bias[off] = 0.0

    def guide(x, num_data=None):
        pyro.module("full_cov_encoder", encoder)
        out = encoder(x)
        loc, entries = out[..., :d], out[..., d:]
        entries = torch.where(on_diagonal, nn.functional.softplus(entries) + 1e-5, entries)
        scale_tril = out.new_zeros(*out.shape[:-1], d, d)
        scale_tril[..., rows, cols] = entries
        scale = 1.0 if num_data is None else num_data / x.shape[0]  # mini-batch -> full data
        with pyro.plate("data", x.shape[0]), pyro.poutine.scale(scale=scale):
            pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=scale_tril))

    return guide


def make_pair(name: str, data, latent_dim: int, seed: int):
    """The model and the guide ``name``; the model's initial parameters depend on the seed only."""
    pyro.set_rng_seed(seed)
    if name == "full-cov":
        model, _ = build_vae(VAEConfig(latent_dim=latent_dim), data)
        return model, full_covariance_guide(data.event_shape, latent_dim)
    return build_vae(VAEConfig(latent_dim=latent_dim, guide=name), data)


def score(model, guide, x, num_samples: int, seed: int) -> dict:
    torch.manual_seed(seed)
    r = log_likelihood_diagnostics(model, guide, x, num_samples=num_samples)
    n = x.shape[0]
    gap = r.log_px - r.elbo
    return {
        "elbo": r.elbo.mean().item(),
        "elbo_se": (r.elbo.std() / n**0.5).item(),
        "log_px": r.log_px.mean().item(),
        "log_px_se": (r.log_px.std() / n**0.5).item(),
        "gap": gap.mean().item(),
        "gap_se": (gap.std() / n**0.5).item(),
        "ess": r.ess.mean().item(),
    }


def figure(rows: list[dict], title: str):
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    ys = range(len(rows))
    for offset, key, label, colour in (
        (-0.12, "elbo", "test ELBO", "C0"),
        (0.12, "log_px", "importance-sampled log p(x)", "C3"),
    ):
        left.errorbar([r[key] for r in rows], [y + offset for y in ys],
                      xerr=[r[key + "_se"] for r in rows], fmt="o", color=colour, capsize=4,
                      label=label)  # fmt: skip
    right.errorbar([r["gap"] for r in rows], list(ys), xerr=[r["gap_se"] for r in rows],
                   fmt="s", color="C2", capsize=4)  # fmt: skip
    for r, y in zip(rows, ys, strict=True):
        label = f"{r['gap']:.2f} ± {r['gap_se']:.2f}"
        right.annotate(label, (r["gap"], y), textcoords="offset points", xytext=(0, 8),
                       ha="center", fontsize=9)  # fmt: skip
    for ax in (left, right):
        ax.set_yticks(list(ys), [r["guide"] for r in rows])
        ax.set_ylim(len(rows) - 0.5, -1.1)  # room above the first row for the legend
        ax.grid(axis="x", alpha=0.3)
    left.set_xlabel("nats per test image (mean ± s.e.)")
    left.set_ylabel("guide q(z|x)")
    left.set_title("ELBO and log p(x) from the same draws")
    left.legend(loc="upper center", ncol=2, fontsize=8)
    right.set_xlabel("log p(x) − ELBO, nats (mean ± paired s.e.)")
    right.set_title("gap = average KL(q(z|x) ‖ p(z|x))")
    right.set_xlim(0, 1.25 * max(r["gap"] + r["gap_se"] for r in rows))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--guides", default="gaussian,iaf,full-cov", help="guide names, in order")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--latent-dim", type=int, default=50)
    parser.add_argument("--num-train", type=int, default=None, help="first N training images")
    parser.add_argument("--points", type=int, default=1000, help="test images scored")
    parser.add_argument("--num-samples", type=int, default=1000, help="K, draws per test image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="swap_guides.png", help="where the figure goes")
    parser.add_argument(
        "--quick", action="store_true", help="5k images, 2 epochs, 200 points x 100 draws"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.num_train, args.epochs, args.points, args.num_samples = 5000, 2, 200, 100
    torch.set_num_threads(1)

    data = load_data(DataConfig("mnist", "dynamic", data_dir=args.data_dir))
    if args.num_train is not None:
        data = data.head(args.num_train)
    x = data.encode(data.test[: args.points], generator=torch.Generator().manual_seed(args.seed))
    config = TrainConfig(epochs=args.epochs, seed=args.seed)
    rows = []
    for name in args.guides.split(","):
        model, guide = make_pair(name, data, args.latent_dim, args.seed)
        t0 = time.perf_counter()
        metrics = train(model, guide, data, config, quiet=True)
        seconds = time.perf_counter() - t0
        rows.append({"guide": name, "test_elbo_all": metrics[-1]["test_elbo"], "seconds": seconds,
                     **score(model, guide, x, args.num_samples, args.seed)})  # fmt: skip
        print(f"  {name}: trained in {seconds:.0f} s, log p(x) {rows[-1]['log_px']:.2f}",
              flush=True)  # fmt: skip

    print(f"\n{len(data.train):,} training images, {args.epochs} epochs, seed {args.seed}; "
          f"{args.points} test images x K={args.num_samples} draws")  # fmt: skip
    print("| guide | test ELBO (all test) | ELBO ± se | log p(x) ± se | gap ± se | ESS | train s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['guide']} | {r['test_elbo_all']:.2f} | {r['elbo']:.2f} ± {r['elbo_se']:.2f} | "
            f"{r['log_px']:.2f} ± {r['log_px_se']:.2f} | {r['gap']:.3f} ± {r['gap_se']:.3f} | "
            f"{r['ess']:.1f} | {r['seconds']:.0f} |"
        )
    title = (
        f"one VAE model (z={args.latent_dim}), three guides: MNIST, {len(data.train):,} images, "
        f"{args.epochs} epochs; {args.points} test images, K={args.num_samples}"
    )
    print(f"wrote {save_figure(figure(rows, title), args.out)}")
    return rows


if __name__ == "__main__":
    main()
