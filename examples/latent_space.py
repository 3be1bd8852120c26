r"""A VAE with a 2-D latent space on MNIST: the decoder's manifold and the encoder's map.

With z in two dimensions the whole latent space can be looked at (Kingma & Welling 2014, Fig. 4):

- the manifold: E[x|z] decoded on a 20 x 20 grid of prior quantiles of z
  (``ppl_vae.plots.manifold_figure``); neighbouring cells decode to similar images, and each digit
  class fills a region;
- the scatter of the posterior means E[z|x] of 5,000 test images, coloured by their digit
  (``ppl_vae.plots.latent_figure``, labels from ``Data.test_labels``).

The VAE is ``VAEConfig(latent_dim=2)`` (MLP 200-200 tanh, Gaussian guide, Bernoulli p(x|z)),
trained on dynamically binarized MNIST by ``ppl_vae.train_run`` into ``--run-dir`` (a temporary
folder unless given; ``ppl-vae plot --run DIR`` can redraw it).

Run (wall-clock times measured on one CPU thread, another run busy on the second core):
    python examples/latent_space.py --quick   # 2 epochs: ~20 s
    python examples/latent_space.py --out-dir docs/img   # 30 epochs on 60k images: 2-3 min

MNIST is read from --data-dir, else $PPL_VAE_DATA, else ~/.cache/ppl_vae (see the README).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ppl_vae import DataConfig, TrainConfig, VAEConfig, train_run
from ppl_vae.plots import latent_figure, manifold_figure
from ppl_vae.runs.files import save_figure


def label_manifold_axes(fig, n: int, cell: int = 28) -> None:
    """Puts the grid's z values on the manifold's axes (the plot hides them); a smaller PNG."""
    ax = fig.axes[0]
    ax.axis("on")
    # about one pixel per image pixel at save_figure's 120 dpi, drawn without smoothing and in
    # 32 grey levels: the same picture in a PNG of under 200 KB instead of over 400 KB
    fig.set_size_inches(6.8, 6.8)
    image = ax.images[0]
    image.set_interpolation("nearest")
    image.set_data(np.round(np.asarray(image.get_array()) * 31) / 31)
    p = torch.linspace(0.5 / n, 1 - 0.5 / n, n, dtype=torch.float64)
    q = torch.distributions.Normal(0.0, 1.0).icdf(p)
    picks = list(range(0, n, max(1, n // 5))) + ([n - 1] if (n - 1) % max(1, n // 5) else [])
    centres = [i * (cell + 1) + cell / 2 for i in picks]
    ax.set_xticks(centres, [f"{q[i]:.2f}" for i in picks])
    ax.set_yticks(centres, [f"{q[n - 1 - i]:.2f}" for i in picks])
    ax.set_xlabel(f"z1 (cells at prior quantiles {0.5 / n:g} ... {1 - 0.5 / n:g})")
    ax.set_ylabel("z2")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", type=int, default=20, help="manifold cells per side")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--run-dir", default=None, help="keep the run here (default: temporary)")
    parser.add_argument("--out-dir", default=".", help="where the two PNGs go")
    parser.add_argument("--quick", action="store_true", help="2 epochs")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    data_config = DataConfig("mnist", "dynamic", data_dir=args.data_dir)
    train_config = TrainConfig(epochs=2 if args.quick else args.epochs, seed=args.seed)
    out = Path(args.out_dir)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(args.run_dir or tmp) / "latent2"
        run = train_run(
            data_config, VAEConfig(latent_dim=2), train_config, run_dir, "cpu",
            quiet=True, pictures=False,
        )  # fmt: skip
        trained = time.perf_counter() - t0
        fig = manifold_figure(run.model, n=args.grid)
        label_manifold_axes(fig, args.grid)
        manifold = save_figure(fig, out / "latent_manifold.png")
        scatter = save_figure(latent_figure(run.guide, run.data), out / "latent_scatter.png")
    last = run.metrics[-1]
    print(f"{len(run.data.train)} training images, {last['epoch']} epochs in {trained:.0f} s: "
          f"train ELBO {last['train_elbo']:.2f}, test ELBO {last['test_elbo']:.2f}")  # fmt: skip
    print(f"wrote {manifold} and {scatter}")
    return {"metrics": run.metrics, "files": [manifold, scatter]}


if __name__ == "__main__":
    main()
