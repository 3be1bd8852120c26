r"""Pictures of a trained VAE: prior samples and reconstructions."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from ppl_vae.data import Data
from ppl_vae.guides import AmortizedGuide
from ppl_vae.model import VAEModel

__all__ = [
    "image_grid",
    "plot_metrics",
    "plot_mixture",
    "plot_reconstructions",
    "plot_samples",
]


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def image_grid(images: Tensor, ncols: int = 8) -> Tensor:
    """Tiles ``(n, 1, h, w)`` images into one ``(rows*h, ncols*w)`` tensor, 1-pixel gaps."""
    n, _, h, w = images.shape
    rows = (n + ncols - 1) // ncols
    grid = torch.ones(rows * (h + 1) - 1, ncols * (w + 1) - 1)
    for i, img in enumerate(images.detach().cpu()):
        r, c = divmod(i, ncols)
        grid[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = img[0]
    return grid


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)


@torch.no_grad()
def plot_samples(model: VAEModel, data: Data, path: str | os.PathLike, n: int = 64) -> Path:
    """Saves ``n`` decoded prior draws (means of p(x|z)) as an image grid or a 2-D scatter."""
    plt = _figure()
    path = Path(path)
    x = model.sample(n if data.is_image else 2000, mean=data.is_image)
    fig, ax = plt.subplots(figsize=(6, 6))
    if data.is_image:
        ax.imshow(image_grid(x.clamp(0, 1)).numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"{n} samples from the prior, E[x|z]")
        ax.axis("off")
    else:
        _scatter(ax, data.test, x, "data (test)", "model samples")
    _save(fig, path)
    plt.close(fig)
    return path


@torch.no_grad()
def plot_reconstructions(
    model: VAEModel, guide: AmortizedGuide, data: Data, path: str | os.PathLike, n: int = 32
) -> Path:
    """Saves test points beside E[x|z] for z drawn from q(z|x) (rows of originals over recons)."""
    plt = _figure()
    path = Path(path)
    g = torch.Generator(device=data.device).manual_seed(0)
    x = data.encode(data.test[: n if data.is_image else 2000], generator=g)
    z = guide.distribution(x).sample()
    recon = model.observation(z).mean
    fig, ax = plt.subplots(figsize=(6, 6))
    if data.is_image:
        pairs = []
        for start in range(0, n, 8):
            pairs += [x[start : start + 8], recon[start : start + 8]]
        ax.imshow(image_grid(torch.cat(pairs).clamp(0, 1)).numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title("test images (odd rows) and reconstructions (even rows)")
        ax.axis("off")
    else:
        _scatter(ax, x, recon, "data (test)", "reconstructions E[x|z], z ~ q(z|x)")
    _save(fig, path)
    plt.close(fig)
    return path


def _scatter(ax, data: Tensor, model: Tensor, data_label: str, model_label: str) -> None:
    d, m = data.cpu().numpy(), model.cpu().numpy()
    ax.scatter(d[:, 0], d[:, 1], s=3, alpha=0.4, label=data_label)
    ax.scatter(m[:, 0], m[:, 1], s=3, alpha=0.4, label=model_label)
    ax.set_aspect("equal")
    ax.legend(loc="upper right", markerscale=4)


def plot_metrics(
    metrics: list[dict],
    path: str | os.PathLike,
    title: str = "",
    train_label: str = "train ELBO (objective)",
) -> Path:
    """Saves the training objective and the test ELBO per epoch (nats per example)."""
    plt = _figure()
    path = Path(path)
    epochs = [m["epoch"] for m in metrics]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(epochs, [m["train_elbo"] for m in metrics], label=train_label)
    ax.plot(epochs, [m["test_elbo"] for m in metrics], label="test ELBO")
    last = metrics[-1]["test_elbo"]
    top = max(max(m["train_elbo"], m["test_elbo"]) for m in metrics)
    ax.set_ylim(min(last, metrics[-1]["train_elbo"]) - 15, top + 3)
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per example")
    ax.set_title(title or f"final test ELBO {last:.2f}")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)
    plt.close(fig)
    return path


@torch.no_grad()
def plot_mixture(mixture, data: Data, path: str | os.PathLike) -> Path | None:
    """Saves the density over the test points (2-D data) or the component means as images.

    Returns the path, or None (nothing written) for data that are neither 2-D nor images.
    """
    from ppl_vae.mixture import BernoulliMixture, GaussianMixture

    path = Path(path)
    if isinstance(mixture, BernoulliMixture) and len(data.event_shape) == 3:
        plt = _figure()
        order = mixture.weights_.argsort(descending=True)[:100]
        means = mixture.means_[order].reshape(-1, *data.event_shape).float()
        fig, ax = plt.subplots(figsize=(7, 7))
        ax.imshow(image_grid(means, ncols=10).numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"{mixture.n_components} component means, by weight (first 100)")
        ax.axis("off")
    elif isinstance(mixture, GaussianMixture) and data.event_shape == (2,):
        plt = _figure()
        fig, ax = plt.subplots(figsize=(6, 6))
        _density_panel(ax, mixture, data.test)
        ax.set_title(
            f"{mixture.n_components}-component {mixture.covariance_type} Gaussian mixture: "
            f"test log-lik. {mixture.score(data.test.to(mixture.means_)):.3f}",
            fontsize=9,
        )
    else:
        return None
    _save(fig, path)
    plt.close(fig)
    return path


def _density_panel(ax, mixture, points: Tensor, size: int = 200) -> None:
    """Log-density contours on a grid around ``points``, the points, and the component means."""
    pts = points.cpu().double()
    lo, hi = pts.min(0).values, pts.max(0).values
    pad = 0.1 * (hi - lo)
    xs = torch.linspace(lo[0] - pad[0], hi[0] + pad[0], size, dtype=torch.float64)
    ys = torch.linspace(lo[1] - pad[1], hi[1] + pad[1], size, dtype=torch.float64)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    grid = torch.stack([gx.flatten(), gy.flatten()], 1)
    density = mixture.score_samples(grid.to(mixture.means_)).exp().reshape(size, size).cpu()
    ax.contourf(gx.numpy(), gy.numpy(), density.numpy(), levels=20, cmap="viridis")
    ax.scatter(pts[:, 0], pts[:, 1], s=1, c="white", alpha=0.3)
    means = mixture.means_.cpu()
    ax.scatter(means[:, 0], means[:, 1], marker="x", c="red", s=30, label="component means")
    ax.set_aspect("equal")
    ax.legend(loc="upper right", fontsize=8)
