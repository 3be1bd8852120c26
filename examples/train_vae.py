r"""A variational autoencoder on binarized MNIST, written out as plain Pyro functions.

The generative model is p(z) p(x|z) with p(z) = N(0, I) and p(x|z) a product of Bernoullis whose
logits come from a decoder network; the guide q(z|x) = N(mu(x), diag sigma(x)^2) is amortized by
an encoder network. SVI maximises the evidence lower bound

    ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z)) <= log p(x)

with reparameterized gradients (``Trace_ELBO``), through ppl_vae's training loop.

Run:
    python examples/train_vae.py --quick           # a few hundred steps, under a minute on CPU
    python examples/train_vae.py --epochs 20 --out runs/example

MNIST is read from --data-dir, else $PPL_VAE_DATA, else ~/.cache/ppl_vae (see the README).
"""

import argparse

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ppl_vae import DataConfig, TrainConfig, load_data, train
from ppl_vae.plots import image_grid
from ppl_vae.runs import RunDir

LATENT, HIDDEN, PIXELS = 50, 200, 784

decoder = nn.Sequential(
    nn.Linear(LATENT, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh(),
    nn.Linear(HIDDEN, PIXELS),
)  # fmt: skip
encoder = nn.Sequential(
    nn.Flatten(), nn.Linear(PIXELS, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh(),
    nn.Linear(HIDDEN, 2 * LATENT),
)  # fmt: skip


def model(x, num_data=None):
    """p(z) p(x|z): one latent z and one image x per row, in the "data" plate."""
    pyro.module("decoder", decoder)
    scale = 1.0 if num_data is None else num_data / len(x)  # mini-batch -> full-data ELBO
    with pyro.plate("data", len(x)), pyro.poutine.scale(scale=scale):
        z = pyro.sample("z", dist.Normal(torch.zeros(len(x), LATENT), 1.0).to_event(1))
        logits = decoder(z).reshape(x.shape)
        pyro.sample("x", dist.Bernoulli(logits=logits).to_event(3), obs=x)


def guide(x, num_data=None):
    """q(z|x) = N(mu(x), diag sigma(x)^2), amortized by the encoder."""
    pyro.module("encoder", encoder)
    loc, raw_scale = encoder(x).chunk(2, dim=-1)
    scale = 1.0 if num_data is None else num_data / len(x)
    with pyro.plate("data", len(x)), pyro.poutine.scale(scale=scale):
        pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw_scale)).to_event(1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="5k training images, 2 epochs")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=None, help="run directory (metrics and checkpoint)")
    args = parser.parse_args(argv)

    data = load_data(DataConfig("mnist", "dynamic", data_dir=args.data_dir))
    if args.quick:  # a small slice keeps the smoke run short
        data = data.head(5000, 1000)
    config = TrainConfig(epochs=2 if args.quick else args.epochs, batch_size=100, lr=1e-3)
    run = RunDir(args.out) if args.out else None  # metrics.jsonl and checkpoint.pt, per epoch
    if run is not None:
        run.start(None, [])
    metrics = train(model, guide, data, config, checkpoint=run and run.save, on_epoch=print)

    with torch.no_grad():  # decode 16 prior draws
        z = torch.randn(16, LATENT)
        means = torch.sigmoid(decoder(z)).reshape(16, 1, 28, 28)
    print(f"final test ELBO {metrics[-1]['test_elbo']:.2f} nats; "
          f"sample grid {tuple(image_grid(means, ncols=4).shape)}")  # fmt: skip


if __name__ == "__main__":
    main()
