r"""Pictures as matplotlib figures: samples, reconstructions, curves, mixtures; no files.

Each function returns a ``Figure``; :func:`ppl_vae.runs.files.save_figure` writes one.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg", force=False)

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from ppl_vae.data import Data  # noqa: E402
from ppl_vae.guides import AmortizedGuide  # noqa: E402
from ppl_vae.mixture import BernoulliMixture, GaussianMixture  # noqa: E402
from ppl_vae.model import VAEModel  # noqa: E402

__all__ = [
    "close_figure",
    "image_grid",
    "metrics_figure",
    "mixture_figure",
    "reconstructions_figure",
    "samples_figure",
]


def close_figure(fig) -> None:
    """Frees a figure made here (pyplot keeps every open figure alive)."""
    plt.close(fig)


def image_grid(images: Tensor, ncols: int = 8) -> Tensor:
    """Tiles ``(n, 1, h, w)`` images into one ``(rows*h, ncols*w)`` tensor, 1-pixel gaps."""
    n, _, h, w = images.shape
    rows = (n + ncols - 1) // ncols
    grid = torch.ones(rows * (h + 1) - 1, ncols * (w + 1) - 1)
    for i, img in enumerate(images.detach().cpu()):
        r, c = divmod(i, ncols)
        grid[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = img[0]
    return grid


@torch.no_grad()
def samples_figure(model: VAEModel, data: Data, n: int = 64):
    """``n`` decoded prior draws (means of p(x|z)) as an image grid, or a 2-D scatter."""
    x = model.sample(n if data.is_image else 2000, mean=data.is_image)
    fig, ax = plt.subplots(figsize=(6, 6))
    if data.is_image:
        ax.imshow(image_grid(x.clamp(0, 1)).numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"{n} samples from the prior, E[x|z]")
        ax.axis("off")
    else:
        _scatter(ax, data.test, x, "data (test)", "model samples")
    return fig


@torch.no_grad()
def reconstructions_figure(model: VAEModel, guide: AmortizedGuide, data: Data, n: int = 32):
    """Test points above E[x|z] for z drawn from q(z|x) (rows of originals over recons)."""
    g = torch.Generator(device=data.device).manual_seed(0)
    x = data.encode(data.test[: n if data.is_image else 2000], generator=g)
    z = guide.distribution(x)()  # a Pyro distribution draws when called (zuko flows only so)
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
    return fig


def _scatter(ax, data: Tensor, model: Tensor, data_label: str, model_label: str) -> None:
    d, m = data.cpu().numpy(), model.cpu().numpy()
    ax.scatter(d[:, 0], d[:, 1], s=3, alpha=0.4, label=data_label)
    ax.scatter(m[:, 0], m[:, 1], s=3, alpha=0.4, label=model_label)
    ax.set_aspect("equal")
    ax.legend(loc="upper right", markerscale=4)


def metrics_figure(
    metrics: list[dict], title: str = "", train_label: str = "train ELBO (objective)"
):
    """The training objective and the test ELBO per epoch (nats per example)."""
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
    return fig


@torch.no_grad()
def mixture_figure(mixture, data: Data):
    """The density over the test points (2-D data) or the component means as images.

    Returns ``None`` for data that are neither 2-D nor images.
    """
    if isinstance(mixture, BernoulliMixture) and len(data.event_shape) == 3:
        order = mixture.weights_.argsort(descending=True)[:100]
        means = mixture.means_[order].reshape(-1, *data.event_shape).float()
        fig, ax = plt.subplots(figsize=(7, 7))
        ax.imshow(image_grid(means, ncols=10).numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"{mixture.n_components} component means, by weight (first 100)")
        ax.axis("off")
    elif isinstance(mixture, GaussianMixture) and data.event_shape == (2,):
        fig, ax = plt.subplots(figsize=(6, 6))
        _density_panel(ax, mixture, data.test)
        ax.set_title(
            f"{mixture.n_components}-component {mixture.covariance_type} Gaussian mixture: "
            f"test log-lik. {mixture.score(data.test.to(mixture.means_)):.3f}",
            fontsize=9,
        )
    else:
        return None
    return fig


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
