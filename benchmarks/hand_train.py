r"""A hand-written MNIST VAE training script: the reference of ``benchmarks/end_to_end.py``.

What a user would write in bare PyTorch to do what ``ppl-vae train --dataset mnist`` does with
its defaults: the same networks (MLP 784-200-200, tanh, z = 50, a diagonal Gaussian q(z|x)),
the same loss (the ELBO with the KL term in closed form), dynamic binarization, batch 100, Adam
1e-3 (torch's default implementation), the test ELBO after every epoch, then a checkpoint (the
state dicts and the optimizer's) and two pictures, 64 samples and 16 reconstructions, as PNGs.
Data, networks and draws live on ``--device``, as ``ppl-vae train --device`` keeps them. No
validation, no resumable run directory, no checks.

Run: ``python benchmarks/hand_train.py --data ../shared/data --epochs 2 --out DIR``
(``--device cuda`` on a GPU).
"""

from __future__ import annotations

import argparse
import time
from itertools import pairwise
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torchvision.datasets import MNIST  # noqa: E402

LATENT = 50


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers with tanh between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def negative_elbo(encoder: nn.Module, decoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-image negative ELBO, the KL term in closed form."""
    loc, raw = encoder(x).chunk(2, dim=-1)
    scale = F.softplus(raw) + 1e-6
    z = loc + scale * torch.randn_like(loc)
    log_px = -F.binary_cross_entropy_with_logits(decoder(z), x, reduction="none").sum(-1)
    kl = 0.5 * (loc**2 + scale**2 - 1).sum(-1) - scale.log().sum(-1)
    return kl - log_px


def grid(images: torch.Tensor, rows: int, path: Path) -> None:
    """Images (n, 784) drawn as a grid of ``rows`` rows, written as a PNG."""
    cols = images.shape[0] // rows
    tiles = images.reshape(rows, cols, 28, 28).permute(0, 2, 1, 3).reshape(rows * 28, cols * 28)
    fig, ax = plt.subplots(figsize=(cols * 0.6, rows * 0.6))
    ax.imshow(tiles.cpu().numpy(), cmap="gray")
    ax.axis("off")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="folder holding MNIST/raw")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", type=torch.device, default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    device = args.device
    torch.manual_seed(0)
    train = MNIST(args.data, train=True).data.reshape(-1, 784).to(device).float() / 255
    test = MNIST(args.data, train=False).data.reshape(-1, 784).to(device).float() / 255
    test_x = torch.bernoulli(test, generator=torch.Generator(device).manual_seed(0))
    encoder = mlp([784, 200, 200, 2 * LATENT]).to(device)
    decoder = mlp([LATENT, 200, 200, 784]).to(device)
    params = [*encoder.parameters(), *decoder.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        for idx in torch.randperm(train.shape[0], device=device).split(100):
            x = torch.bernoulli(train[idx])
            loss = negative_elbo(encoder, decoder, x).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            test_elbo = -torch.cat([negative_elbo(encoder, decoder, b) for b in test_x.split(1000)])
        print(f"epoch {epoch}: test ELBO {test_elbo.mean():.2f}, {time.perf_counter() - t0:.1f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"encoder": encoder.state_dict(), "decoder": decoder.state_dict(),
         "optimizer": optimizer.state_dict()},
        args.out / "checkpoint.pt",
    )  # fmt: skip
    with torch.no_grad():
        samples = torch.sigmoid(decoder(torch.randn(64, LATENT, device=device)))
        loc = encoder(test_x[:8]).chunk(2, dim=-1)[0]
        recon = torch.cat([test_x[:8], torch.sigmoid(decoder(loc))])
    grid(samples, 8, args.out / "samples.png")
    grid(recon, 2, args.out / "reconstructions.png")


if __name__ == "__main__":
    main()
