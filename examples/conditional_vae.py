r"""A conditional VAE completes MNIST digits from one quadrant; -log p(y|x) against a baseline.

As in Pyro's ``examples/cvae`` (Sohn et al. 2015), each image is split into the visible
quadrants x (``--visible 1``: the bottom-left one) and the hidden pixels y. The model is
p(z|x) p(y|x, z), a prior network and a Bernoulli per hidden pixel; the guide is q(z|x, y)
(``VAEConfig(model="cvae")``: ``ppl_vae.cvae``, networks of 500-500 relu, z = 200). A
deterministic baseline p(y|x), an MLP of x, is trained first (``fit_baseline``) and the CVAE's
generation network starts from it; then SVI maximises the conditional ELBO
E_q[log p(y|x, z)] - KL(q(z|x, y) || p(z|x)) with ppl_vae's training loop.

On the same test points (one fixed binarization), the script prints the CVAE's -log p(y|x)
estimated by importance sampling with q(z|x, y) as proposal (``log_likelihood`` of the
programs, K draws per point), the baseline's exact -log p(y|x), their paired difference, and
the same estimate for the untrained CVAE. The baseline predicts each hidden pixel
independently given x; the CVAE's z lets the pixels vary together (one digit or another), so
it can assign more probability to the true completion. The figure shows, per test image, the
input, the truth and completions drawn at z ~ p(z|x) (``ppl_vae.plots.completions_figure``).

Run (wall-clock times measured on one CPU thread, another run busy on the second core):
    python examples/conditional_vae.py --quick   # 5k images, 1 + 2 epochs, 200 x K=100: ~15 s
    python examples/conditional_vae.py   # the defaults: all of MNIST, 10 + 10 epochs
    python examples/conditional_vae.py --num-train 20000 --baseline-epochs 3 --epochs 5 \
        --points 500 --num-samples 200 --out docs/img/conditional_vae.png   # the README's: ~1.5 min

MNIST is read from --data-dir, else $PPL_VAE_DATA, else ~/.cache/ppl_vae (see the README).
"""

from __future__ import annotations

import argparse
import time

import pyro
import torch

from ppl_vae import (
    DataConfig,
    TrainConfig,
    VAEConfig,
    build_vae,
    load_data,
    log_likelihood,
    train,
)
from ppl_vae.cvae_images import fit_baseline
from ppl_vae.plots import completions_figure
from ppl_vae.runs.files import save_figure


def negative_log_likelihood(model, guide, images, num_samples: int, seed: int) -> torch.Tensor:
    """-log p(y_i|x_i) per image, importance-sampled with q(z|x, y) (the same draws per seed).

    The programs split the images themselves, and y is their only observed site: the library's
    ``log_likelihood`` of them is log p(y|x) (``conditional_log_likelihood(model, guide, x, y)``
    is the same for programs called on the pair).
    """
    torch.manual_seed(seed)
    return -log_likelihood(model, guide, images, num_samples=num_samples)


def mean_se(values: torch.Tensor) -> str:
    return f"{values.mean():.2f} ± {values.std() / len(values) ** 0.5:.2f}"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--visible", type=int, default=1, choices=(1, 2, 3), help="quadrants shown")
    parser.add_argument("--baseline-epochs", type=int, default=10, help="0: no baseline")
    parser.add_argument("--epochs", type=int, default=10, help="CVAE epochs")
    parser.add_argument("--num-train", type=int, default=None, help="first N training images")
    parser.add_argument("--points", type=int, default=1000, help="test images scored")
    parser.add_argument("--num-samples", type=int, default=1000, help="K, draws per test image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="conditional_vae.png", help="where the figure goes")
    parser.add_argument(
        "--quick", action="store_true", help="5k images, 1 + 2 epochs, 200 points x 100 draws"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.num_train, args.baseline_epochs, args.epochs = 5000, 1, 2
        args.points, args.num_samples = 200, 100
    torch.set_num_threads(1)

    data = load_data(DataConfig("mnist", "dynamic", data_dir=args.data_dir))
    if args.num_train is not None:
        data = data.head(args.num_train)
    pyro.set_rng_seed(args.seed)
    config = VAEConfig(
        model="cvae", visible=args.visible, baseline_epochs=args.baseline_epochs or None
    )
    model, guide = build_vae(config, data)
    g = torch.Generator().manual_seed(args.seed)
    images = data.encode(data.test[: args.points], generator=g)  # one fixed binarization
    untrained = negative_log_likelihood(model, guide, images, args.num_samples, args.seed)

    t0 = time.perf_counter()
    if args.baseline_epochs:
        losses = fit_baseline(model, data, args.baseline_epochs, seed=args.seed)
        print(f"baseline: {len(losses)} epochs, train -log p(y|x) {losses[-1]:.2f}", flush=True)
    metrics = train(
        model, guide, data, TrainConfig(epochs=args.epochs, seed=args.seed), quiet=True,
        on_epoch=lambda m: print(f"CVAE epoch {m['epoch']}: test ELBO of y|x "
                                 f"{m['test_elbo']:.2f}", flush=True),
    )  # fmt: skip
    seconds = time.perf_counter() - t0

    cvae = negative_log_likelihood(model, guide, images, args.num_samples, args.seed)
    print(f"\n{len(data.train):,} training images, {args.visible} quadrant(s) visible, trained "
          f"in {seconds:.0f} s; {args.points} test images, K={args.num_samples}")  # fmt: skip
    print("| model | test -log p(y given x), nats (mean ± se) |")  # no | in a cell
    print("|---|---|")
    print(f"| untrained CVAE (importance-sampled) | {mean_se(untrained)} |")
    rows = {"untrained": untrained.mean().item(), "cvae": cvae.mean().item()}
    if args.baseline_epochs:
        baseline = -model.baseline_log_likelihood(images)
        print(f"| baseline (exact) | {mean_se(baseline)} |")
        rows["baseline"] = baseline.mean().item()
    print(f"| CVAE (importance-sampled) | {mean_se(cvae)} |")
    if args.baseline_epochs:
        print(f"CVAE - baseline, paired: {mean_se(cvae - baseline)} nats")
    print(f"wrote {save_figure(completions_figure(model, data), args.out)}")
    return {"metrics": metrics, **rows}


if __name__ == "__main__":
    main()
