r"""Semi-supervised M2 on MNIST: 100 labelled digits, the rest unlabelled; accuracy and log p(x).

Kingma et al. (2014)'s M2 model generates an image x from a label y and a style z,
p(y) p(z) p(x|y, z), with the guide q(y|x) q(z|x, y) (``VAEConfig(model="m2")``:
``ppl_vae.m2``, one hidden layer of 500 softplus units, z = 50). For a labelled point the
ELBO L(x, y) is that of the programs run as ``model(x, y)``, ``guide(x, y)``; for an unlabelled
one the guide's q(y|x) is summed over exactly, U(x) = sum_y q(y|x) (L(x, y) - log q(y|x)),
and the classifier's -log q(y|x) on the labelled points is added with the paper's weight
alpha = 0.1 N. ``SemiSupervised`` makes that the objective of ppl_vae's training loop: an
epoch is one pass over the unlabelled points, each step adding one batch of the labelled ones,
scaled by the labelled set's size (the paper's objective) or, with --balanced, by the
unlabelled set's, which learns the classifier far faster (docs/RESULTS.md, "Semi-supervised M2").

The script prints the classifier's test accuracy after every epoch (argmax q(y|x), one fixed
binarization of the test images) and, at the end, the test log p(x) with the label summed
out, log sum_y p(x, y), each p(x, y) importance-sampled with q(z|x, y) as proposal
(``m2_log_likelihood``, K draws per point and class). The figure is the paper's Figure 1:
each test image's z held fixed at the mean of q(z|x, y_true), decoded with every label
(``ppl_vae.plots.analogies_figure``).

Run (wall-clock times measured on one CPU thread, another run busy on the second core):
    python examples/semi_supervised.py --quick   # 5k images, 100 labelled, 3 epochs: ~25 s
    python examples/semi_supervised.py   # the defaults: all of MNIST, 10 epochs
    python examples/semi_supervised.py --balanced --num-test 2000 --epochs 5 --points 500 \
        --num-samples 50 --out docs/img/semi_supervised.png   # the README's: ~8 min

MNIST is read from --data-dir, else $PPL_VAE_DATA, else ~/.cache/ppl_vae (see the README).
"""

from __future__ import annotations

import argparse
import time

import pyro
import torch

from ppl_vae import DataConfig, TrainConfig, VAEConfig, build_vae, load_data, train
from ppl_vae.m2 import m2_log_likelihood, paper_alpha
from ppl_vae.plots import analogies_figure
from ppl_vae.runs.files import save_figure
from ppl_vae.semisupervised import SemiSupervised, labelled_split, seeded_test_points


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--labelled", type=int, default=100, help="labelled training images")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--num-train", type=int, default=None, help="first N training images")
    parser.add_argument("--num-test", type=int, default=None, help="first N test images")
    parser.add_argument("--points", type=int, default=1000, help="test images for log p(x)")
    parser.add_argument("--num-samples", type=int, default=100, help="K, per image and class")
    parser.add_argument(
        "--balanced",
        action="store_true",
        help="weight each labelled batch as much as the unlabelled one (see the README)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="semi_supervised.png", help="where the figure goes")
    parser.add_argument(
        "--quick", action="store_true", help="5k images, 3 epochs, 1k test images, 200 points x 20"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.num_train, args.num_test, args.epochs = 5000, 1000, 3
        args.points, args.num_samples = 200, 20
    torch.set_num_threads(1)

    data = load_data(DataConfig("mnist", "dynamic", data_dir=args.data_dir))
    if args.num_train is not None or args.num_test is not None:
        data = data.head(args.num_train, args.num_test)
    pyro.set_rng_seed(args.seed)
    model, guide = build_vae(VAEConfig(model="m2", labeled=args.labelled), data)

    # the labelled set: as many of each digit, drawn from the seed; the rest lose their labels
    labelled = labelled_split(data, args.labelled, guide.num_classes, args.seed)
    rest = torch.ones(len(data.train), dtype=torch.bool)
    rest[labelled] = False
    unlabelled = data.subset(torch.nonzero(rest).squeeze(1))
    alpha = paper_alpha(len(data.train), args.labelled)
    config = TrainConfig(epochs=args.epochs, seed=args.seed)  # batches of 100 of each set
    objective = SemiSupervised(
        data,
        labelled,
        alpha=alpha,
        batch_size=config.batch_size,
        seed=args.seed,
        balanced=args.balanced,
    )

    t0 = time.perf_counter()
    metrics = train(
        model, guide, unlabelled, config, objective=objective, quiet=True,
        on_epoch=lambda m: print(f"epoch {m['epoch']}: test accuracy {m['test_accuracy']:.4f}, "
                                 f"test ELBO (label summed out) {m['test_elbo']:.2f}", flush=True),
    )  # fmt: skip
    seconds = time.perf_counter() - t0

    x = seeded_test_points(data, args.seed)[: args.points]
    torch.manual_seed(args.seed)
    log_px = m2_log_likelihood(model, guide, x, num_samples=args.num_samples)
    se = log_px.std() / len(log_px) ** 0.5
    weighting = "balanced" if args.balanced else "the paper's objective"
    print(f"\n{len(data.train):,} training images, {args.labelled} labelled "
          f"(alpha {alpha:g}, {weighting}), {args.epochs} epochs in {seconds:.0f} s")  # fmt: skip
    print(f"final test accuracy {metrics[-1]['test_accuracy']:.4f} "
          f"on {len(data.test):,} test images (chance 0.1)")  # fmt: skip
    print(f"test log p(x), label summed out: {log_px.mean():.2f} ± {se:.2f} nats "
          f"({args.points} images, K={args.num_samples} per class)")  # fmt: skip
    fig = analogies_figure(model, guide, data, seed=args.seed)
    print(f"wrote {save_figure(fig, args.out)}")
    return {"metrics": metrics, "log_px": log_px.mean().item()}


if __name__ == "__main__":
    main()
