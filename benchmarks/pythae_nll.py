r"""Importance-sampled log p(x) against a peer library's: pythae's ``VAE.get_nll``, same model.

The reference VAE (MLP 784-200-200-z50, tanh, Bernoulli decoder, seed 0), trained for
``--epochs`` epochs (default 1) with ``ppl_vae.svi.train`` at its defaults, is handed to pythae
as it is: its encoder gives pythae's ``embedding`` (the mean of q(z|x)) and ``log_covariance``
(twice the log of q's scale), its decoder's sigmoid is pythae's ``reconstruction``, so both
libraries estimate log p(x) with the same q, prior and decoder. On the same ``--points``
binarized test images, with K = ``--samples`` draws per image:

- ``ppl_vae``: :func:`ppl_vae.importance.log_likelihood` at ``ppl-vae evaluate``'s defaults
  (points in batches of 100, 10,000 decoder rows per pass on a CPU);
- ``pythae (batch B)``: ``model.get_nll(x, n_samples=K, batch_size=B)``, which loops over the
  images and, for each, over K / B batches of B copies of it (encoder included);
- ``bare``: the decoder's forward pass and the Bernoulli log-probability alone (the one
  ``log_likelihood`` uses, :func:`ppl_vae.distributions.bernoulli_log_prob`) on the same
  number of rows (points x K), in passes of 10,000 rows, from latents drawn beforehand: what
  any estimator must pay.

The contenders alternate, ``--repeats`` times; medians. Throughput is points x samples per
second; "time / ppl_vae's" above 1 is ppl_vae's speed-up. The estimates (mean log p(x), nats
per image) are printed beside, as a check that both estimate the same quantity (they differ
by Monte Carlo noise only).

Run: ``python benchmarks/pythae_nll.py --threads 1 --write`` (updates docs/BENCHMARKS.md).
Needs ``pythae`` (``pip install pythae``, best in a virtual environment of its own with the
system's site packages: it is not one of ppl_vae's dependencies).
"""

from __future__ import annotations

import argparse
import sys

import torch
from common import describe, interleave, medians, parse_args, reference_vae, write_section

from ppl_vae.distributions import bernoulli_log_prob
from ppl_vae.importance import default_chunk_size, log_likelihood
from ppl_vae.svi import TrainConfig, train


def pythae_model(model, guide):
    """The reference VAE as a ``pythae.models.VAE``, sharing its modules."""
    from pythae.models import VAE, VAEConfig
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseEncoder

    class Encoder(BaseEncoder):
        def __init__(self):
            super().__init__()
            self.guide = guide

        def forward(self, x):
            q = self.guide.distribution(x.reshape(x.shape[0], 1, 28, 28))
            return ModelOutput(embedding=q.mean, log_covariance=2 * q.stddev.log())

    class Decoder(BaseDecoder):
        def __init__(self):
            super().__init__()
            self.decoder = model.decoder

        def forward(self, z):
            logits = self.decoder(z).reshape(z.shape[0], 1, 28, 28)
            return ModelOutput(reconstruction=torch.sigmoid(logits))

    config = VAEConfig(input_dim=(1, 28, 28), latent_dim=50, reconstruction_loss="bce")
    return VAE(config, encoder=Encoder(), decoder=Decoder()).eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--pythae-batch", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--epochs", type=int, default=1, help="training epochs before timing")
    args, device = parse_args(parser, argv, repeats=3)
    try:
        import pythae  # noqa: F401
    except ImportError:
        parser.error("pythae is not installed: pip install pythae (see this script's docstring)")
    data, model, guide = reference_vae(device)
    if args.epochs:
        train(model, guide, data, TrainConfig(epochs=args.epochs), quiet=True)
    g = torch.Generator(device).manual_seed(0)
    x = torch.bernoulli(data.test[: args.points], generator=g)
    peer = pythae_model(model, guide)
    rows, k = 10_000, args.samples
    z = torch.randn(rows, 50, device=device)
    target = x.reshape(1, args.points, -1).expand(k, -1, -1).reshape(-1, 784)
    estimates: dict[str, float] = {}

    @torch.no_grad()
    def bare():
        for start in range(0, args.points * k, rows):
            logits = model.decoder(z[: min(rows, args.points * k - start)]).reshape(-1, 784)
            part = target[start : start + logits.shape[0]]
            bernoulli_log_prob(logits, part).sum(-1)

    chunk = default_chunk_size(100, device)

    def ours():  # as ppl-vae evaluate does it: 100 points at a time
        ll = [
            log_likelihood(model, guide, b, num_samples=k, chunk_size=chunk) for b in x.split(100)
        ]
        estimates["ppl_vae log_likelihood"] = float(torch.cat(ll).mean())

    contenders = {"bare decoder + Bernoulli log-prob": bare, "ppl_vae log_likelihood": ours}
    for b in args.pythae_batch:

        @torch.no_grad()
        def theirs(b=b):
            estimates[f"pythae get_nll (batch {b})"] = float(peer.get_nll(x, k, batch_size=b))

        contenders[f"pythae get_nll (batch {b})"] = theirs
    for fn in contenders.values():  # warm-up
        fn()
    med = medians(interleave(contenders, args.repeats, device))
    ours_s = med["ppl_vae log_likelihood"]
    lines = [
        f"{describe(device)}; reference VAE (seed 0, "
        f"{args.epochs} epochs of ppl_vae.train), {args.points} binarized test "
        f"images x K = {k}; {args.repeats} interleaved repeats, medians.",
        "",
        "| contender | seconds | points x samples / s | time / ppl_vae's | mean log p(x) |",
        "|---|---|---|---|---|",
    ]
    for name, s in med.items():
        estimate = f"{estimates[name]:.2f}" if name in estimates else ""
        lines.append(
            f"| {name} | {s:.2f} | {args.points * k / s:,.0f} | **{s / ours_s:.2f}** | {estimate} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_section(f"importance vs pythae ({device.type})", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
