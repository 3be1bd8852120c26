r"""Pictures as matplotlib figures: samples, reconstructions, curves, mixtures; no files.

Each function returns a ``matplotlib.figure.Figure`` built without pyplot, so importing or
calling them leaves matplotlib's backend and pyplot's figure list as they were;
:func:`ppl_vae.runs.files.save_figure` writes one, and a notebook shows one as it is.
"""

from __future__ import annotations

import math

import matplotlib
import matplotlib.lines
import matplotlib.ticker
import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from ppl_vae.cvae import HIDDEN
from ppl_vae.cvae_images import ImageCVAEModel
from ppl_vae.data import Data
from ppl_vae.guides import AmortizedGuide
from ppl_vae.importance import log_likelihood
from ppl_vae.m2 import M2Guide, M2Model
from ppl_vae.model import VAEModel
from ppl_vae.selection import best_epoch
from ppl_vae.semisupervised import analogies, seeded_test_points

__all__ = [
    "analogies_figure",
    "close_figure",
    "completions_figure",
    "curves_figure",
    "density_figure",
    "image_grid",
    "interpolation_figure",
    "latent_figure",
    "latent_subset",
    "manifold_figure",
    "mixture_figure",
    "posterior_means",
    "reconstructions_figure",
    "samples_figure",
]


def _figure(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], **kwargs):
    """A figure outside pyplot's state and its axes (``fig.subplots``'s return)."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def close_figure(fig: Figure) -> None:
    """Frees a figure's drawing state; figures made here are not held by pyplot, so this
    only clears it (kept so that callers written for pyplot figures still work)."""
    fig.clear()


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
def samples_figure(model: VAEModel, data: Data, n: int = 64) -> Figure:
    """``n`` decoded prior draws (means of p(x|z)) as an image grid, or a 2-D scatter."""
    x = model.sample(n if data.is_image else 2000, mean=data.is_image)
    fig, ax = _figure(figsize=(6, 6))
    if data.is_image:
        ax.imshow(image_grid(x.clamp(0, 1)).numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"{n} samples from the prior, E[x|z]")
        ax.axis("off")
    else:
        _scatter(ax, data.test, x, "data (test)", "model samples")
    return fig


@torch.no_grad()
def reconstructions_figure(
    model: VAEModel, guide: AmortizedGuide, data: Data, n: int = 32
) -> Figure:
    """Test points above E[x|z] for z drawn from q(z|x) (rows of originals over recons)."""
    g = torch.Generator(device=data.device).manual_seed(0)
    x = data.encode(data.test[: n if data.is_image else 2000], generator=g)
    z = guide.distribution(x)()  # a Pyro distribution draws when called (zuko flows only so)
    recon = model.observation(z).mean
    fig, ax = _figure(figsize=(6, 6))
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


@torch.no_grad()
def completions_figure(model: ImageCVAEModel, data: Data, n: int = 8, draws: int = 5) -> Figure:
    """One row per test image: the input (its visible quadrants, the hidden part gray), the
    true image, and ``draws`` completions (the Bernoulli means of the hidden pixels at z drawn
    from p(z|x))."""
    g = torch.Generator(device=data.device).manual_seed(0)
    images = data.encode(data.test[:n], generator=g)
    x, _ = model.split(images)
    shown = torch.where(x == HIDDEN, torch.full_like(x, 0.5), x)
    rows = torch.stack([shown, images, *model.completions(images, draws)], 1)  # (n, 2+draws, ...)
    fig, ax = _figure(figsize=(1 + 0.6 * (2 + draws), 1 + 0.6 * n))
    grid = image_grid(rows.reshape(-1, *images.shape[1:]).clamp(0, 1), ncols=2 + draws)
    ax.imshow(grid.numpy(), cmap="gray", vmin=0, vmax=1)
    ax.set_title(f"input, truth, {draws} completions", fontsize=8)
    ax.axis("off")
    return fig


@torch.no_grad()
def analogies_figure(
    model: M2Model, guide: M2Guide, data: Data, *, seed: int, n: int = 8
) -> Figure:
    """Kingma et al.'s Figure 1 for the first ``n`` test points: one row per point, its image
    (binarized as for the test accuracy, from ``seed``) then the means of p(x|y, z) for every
    class y, with z the mean of q(z|x, y_true) held fixed along the row."""
    x = seeded_test_points(data, seed)[:n]
    rows = analogies(model, guide, x, data.test_labels[:n].to(x.device))  # (n, K, ...)
    k = rows.shape[1]
    cells = torch.cat([x.unsqueeze(1), rows], 1).reshape(-1, *x.shape[1:])
    fig, ax = _figure(figsize=(1 + 0.5 * (1 + k), 1 + 0.5 * len(x)))
    ax.imshow(image_grid(cells.clamp(0, 1), ncols=1 + k).numpy(), cmap="gray", vmin=0, vmax=1)
    ax.set_title(f"test image, then y = 0..{k - 1} with z = the mean of q(z|x, y_true)", fontsize=8)
    ax.axis("off")
    return fig


def _scatter(ax, data: Tensor, model: Tensor, data_label: str, model_label: str) -> None:
    """Data against model points: a scatter of 2-D points (the first two coordinates of
    larger ones, as the axis labels say), or two histograms of 1-D ones."""
    d, m = data.detach().cpu().double().numpy(), model.detach().cpu().double().numpy()
    if d.shape[1] == 1:
        bins = np.histogram_bin_edges(np.concatenate([d[:, 0], m[:, 0]]), bins=50)
        ax.hist(d[:, 0], bins=bins, density=True, alpha=0.5, label=data_label)
        ax.hist(m[:, 0], bins=bins, density=True, alpha=0.5, label=model_label)
        ax.set_xlabel("x")
        ax.set_ylabel("density")
    else:
        ax.scatter(d[:, 0], d[:, 1], s=3, alpha=0.4, label=data_label)
        ax.scatter(m[:, 0], m[:, 1], s=3, alpha=0.4, label=model_label)
        ax.set_aspect("equal")
        first = " (the first two of " + str(d.shape[1]) + " coordinates)" if d.shape[1] > 2 else ""
        ax.set_xlabel("x1" + first)
        ax.set_ylabel("x2")
    ax.legend(loc="upper right", markerscale=4)


def _elbo_range(metrics: list[dict]) -> tuple[float, float, list[dict]]:
    """The y-limits that show every epoch but leading ones far beneath the rest (more than
    twice the rest's spread below it: they would flatten the rest into a line), and the epochs
    so left out. Leading: the first epoch, and every epoch of a KL delay (at weight 0 the guide
    narrows freely, and the test ELBO, taken at full weight, can lie thousands of nats down).
    A later epoch is always in view."""
    values = [[m["train_elbo"], m["test_elbo"]] for m in metrics]
    delayed = next((i for i, m in enumerate(metrics) if m.get("kl_weight", 1.0) != 0), len(values))
    lead = max(1, delayed)  # the first epoch, and the epochs at KL weight 0 before any other
    top = max(max(v) for v in values)
    out: list[int] = []
    if len(values) - lead >= 2:
        rest = min(min(v) for v in values[lead:])
        floor = rest - 2 * max(top - rest, 1e-3)
        out = [i for i in range(lead) if min(values[i]) < floor]
    bottom = min(min(v) for i, v in enumerate(values) if i not in out)
    pad = 0.06 * max(top - bottom, 1e-3)
    return bottom - pad, top + pad, [metrics[i] for i in out]


def curves_figure(metrics: list[dict], title: str = "") -> Figure:
    """Train, test (and validation) ELBO per epoch (nats per example), the best epoch
    (:func:`ppl_vae.selection.best_epoch`), and the KL weight when it changes; where the
    metrics have ``test_accuracy`` (M2's classifier), a panel of it below.

    Every epoch is in view, except a first epoch or an epoch of a KL delay far below the rest,
    which is named in a note instead; the legend sits below the axes, off the lines.
    """
    epochs = [m["epoch"] for m in metrics]
    with_accuracy = all(m.get("test_accuracy") is not None for m in metrics)
    accuracy = [m["test_accuracy"] for m in metrics] if with_accuracy else []
    fig = Figure(figsize=(7, 6.4 if accuracy else 4.4), layout="constrained")
    if accuracy:
        ax, below = fig.subplots(2, 1, sharex=True, height_ratios=(2, 1))
        below.plot(epochs, accuracy, marker=".", color="tab:green", label="test accuracy")
        below.set_ylabel("test accuracy")
        below.set_title(f"classifier q(y|x); last test accuracy {accuracy[-1]:.4f}", fontsize=9)
        below.grid(alpha=0.3)
    else:
        ax = below = fig.subplots()
    ax.plot(epochs, [m["train_elbo"] for m in metrics], marker=".", label="train (objective)")
    ax.plot(epochs, [m["test_elbo"] for m in metrics], marker=".", label="test ELBO")
    if "validation_elbo" in metrics[-1]:
        held = [m["validation_elbo"] for m in metrics]
        ax.plot(epochs, held, marker=".", label="validation ELBO")
    if len(metrics) > 1:
        ax.axvline(best_epoch(metrics), color="gray", linestyle=":", label="best epoch (best.pt)")
    bottom, top, clipped = _elbo_range(metrics)
    ax.set_ylim(bottom, top)
    if clipped:
        note = "; ".join(
            f"epoch {m['epoch']} below{' (KL weight 0)' if m.get('kl_weight') == 0 else ''}: "
            f"train {m['train_elbo']:.2f}, test {m['test_elbo']:.2f}"
            for m in clipped
        )
        ax.annotate(  # lower right: the curves rise from the left
            note, xy=(0.99, 0.02), xycoords="axes fraction", ha="right", fontsize=8,
            color="dimgray",
        )  # fmt: skip
    below.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    below.set_xlabel("epoch")
    ax.set_ylabel("nats per example")
    last = metrics[-1]
    ax.set_title(title or f"ELBO per epoch; last test ELBO {last['test_elbo']:.2f}")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if accuracy:
        more = below.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    weights = [m.get("kl_weight", 1.0) for m in metrics]
    if len(set(weights)) > 1:  # an annealed KL term
        twin = ax.twinx()
        twin.plot(epochs, weights, color="gray", linestyle="--", label="KL weight")
        twin.set_ylabel("KL weight")
        twin.set_ylim(0, 1.05 * max(weights))
        more = twin.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), frameon=False)
    return fig


@torch.no_grad()
def posterior_means(guide: AmortizedGuide, x: Tensor, draws: int = 256) -> Tensor:
    """E_q[z | x] per row: the guide's mean, or an average of draws for flows."""
    q = guide.distribution(x)
    try:
        return q.mean
    except NotImplementedError:  # flows: a Monte Carlo mean
        return torch.stack([q() for _ in range(draws)]).mean(0)


def _grid(images: Tensor, ax, title: str, ncols: int) -> None:
    ax.imshow(image_grid(images.clamp(0, 1), ncols=ncols).numpy(), cmap="gray", vmin=0, vmax=1)
    ax.set_title(title)
    ax.axis("off")


@torch.no_grad()
def interpolation_figure(
    model: VAEModel, guide: AmortizedGuide, data: Data, rows: int = 6, steps: int = 10
):
    """Decodings along straight lines between the posterior means of pairs of test images."""
    g = torch.Generator(device=data.device).manual_seed(1)
    x = data.encode(data.test[: 2 * rows], generator=g)
    z = posterior_means(guide, x)
    t = torch.linspace(0, 1, steps, device=z.device, dtype=z.dtype)[:, None]
    lines = [(1 - t) * z[2 * r] + t * z[2 * r + 1] for r in range(rows)]
    images = model.observation(torch.cat(lines)).mean
    fig, ax = _figure(figsize=(steps * 0.7, rows * 0.75))
    _grid(images, ax, "decodings from one test image's posterior mean to another's", steps)
    return fig


def latent_subset(num_points: int, n: int, seed: int = 2) -> Tensor:
    """Which test points the latent picture shows, in the order drawn: ``min(n, num_points)``
    distinct indices in a random order from ``seed`` (a uniform subset when there are more
    than ``n`` points; all of them otherwise, shuffled so that no label is always drawn over
    the others)."""
    return torch.randperm(num_points, generator=torch.Generator().manual_seed(seed))[:n]


def _projection(z: Tensor) -> tuple[Tensor, str, tuple[str, str]]:
    """Two coordinates to draw ``z`` by, what they are, and the axes' labels: z itself (2-D),
    z against a random jitter (1-D), or the first two principal components (larger)."""
    if z.shape[1] == 1:  # a strip, spread upwards at random so that points do not hide others
        jitter = torch.rand(len(z), generator=torch.Generator().manual_seed(0))
        return torch.cat([z, jitter[:, None]], 1), "the 1-D latent z", ("z", "jitter")
    if z.shape[1] == 2:
        return z, "the latent z itself", ("z1", "z2")
    centred = z - z.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    what = f"first two principal components of the {z.shape[1]}-D z"
    return centred @ v[:2].T, what, ("PC 1", "PC 2")


@torch.no_grad()
def latent_figure(guide: AmortizedGuide, data: Data, n: int = 3000) -> Figure:
    """The posterior means of at most ``n`` test points (:func:`latent_subset`: a random
    subset, seeded, when the test set is larger, as the title says), coloured by their label
    (digit, arm, component).

    A 2-D latent is drawn as it is; a larger one by the first two principal components of the
    points drawn. The points are one scatter, in the subset's random order.
    """
    total = data.test.shape[0]
    pick = latent_subset(total, n)
    g = torch.Generator(device=data.device).manual_seed(2)
    x = data.encode(data.test[pick.to(data.device)], generator=g)
    z = torch.cat([posterior_means(guide, x[i : i + 500]) for i in range(0, len(x), 500)]).cpu()
    xy, what, axes = _projection(z)
    fig, ax = _figure(figsize=(6.5, 6))
    labels = data.test_labels.cpu()[pick] if data.test_labels is not None else None
    if labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=2, alpha=0.5)
    else:
        classes = labels.unique().tolist()
        cmap = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20"]
        index = torch.searchsorted(torch.tensor(classes, dtype=labels.dtype), labels)
        ax.scatter(xy[:, 0], xy[:, 1], s=2, alpha=0.6, c=cmap(index.numpy()))
        handles = [
            matplotlib.lines.Line2D([], [], linestyle="", marker="o", markersize=6,
                                    color=cmap(i), label=str(c))
            for i, c in enumerate(classes)
        ]  # fmt: skip
        title = "digit" if data.name == "mnist" else "label"
        ax.legend(handles=handles, title=title, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    which = f"a random {len(pick)} of the {total}" if len(pick) < total else f"all {total}"
    ax.set_title(f"posterior means E[z|x] of {which} test points:\n{what}")
    return fig


@torch.no_grad()
def manifold_figure(model: VAEModel, n: int = 20) -> Figure:
    """For a 2-D latent, the decoder's means on a grid of prior quantiles (Kingma & Welling,
    2014, Fig. 4)."""
    p = torch.linspace(0.5 / n, 1 - 0.5 / n, n, dtype=torch.float64)
    q = torch.distributions.Normal(0.0, 1.0).icdf(p).to(model._zero)
    z1, z2 = torch.meshgrid(q, q.flip(0), indexing="xy")  # z2 grows upwards
    images = model.observation(torch.stack([z1.flatten(), z2.flatten()], -1)).mean
    fig, ax = _figure(figsize=(8, 8))
    _grid(images, ax, f"E[x|z] on a {n}x{n} grid of prior quantiles of z (z1 across, z2 up)", n)
    return fig


@torch.no_grad()
def density_figure(model, guide, data: Data, size: int = 60, num_samples: int = 200):
    """2-D data: the test points' histogram density beside the model's importance-sampled
    log p(x) on a grid, on shared colour levels."""
    pts = data.test.cpu().double()
    lo, hi = pts.min(0).values, pts.max(0).values
    pad = 0.1 * (hi - lo)
    xs = torch.linspace(lo[0] - pad[0], hi[0] + pad[0], size, dtype=torch.float64)
    ys = torch.linspace(lo[1] - pad[1], hi[1] + pad[1], size, dtype=torch.float64)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    grid = torch.stack([gx.flatten(), gy.flatten()], 1).to(data.test)
    with torch.random.fork_rng(devices=[data.device] if data.device.type == "cuda" else []):
        torch.manual_seed(3)
        log_p = torch.cat([
            log_likelihood(model, guide, grid[i : i + 400], num_samples=num_samples)
            for i in range(0, len(grid), 400)
        ]).reshape(size, size).cpu()  # fmt: skip
        test = log_likelihood(model, guide, data.test[:2000], num_samples=num_samples).mean()
    box = [[float(xs[0]), float(xs[-1])], [float(ys[0]), float(ys[-1])]]
    counts, xe, ye = np.histogram2d(pts[:, 0].numpy(), pts[:, 1].numpy(), bins=40, range=box)
    area = (xe[1] - xe[0]) * (ye[1] - ye[0])
    with np.errstate(divide="ignore"):
        log_hist = np.log(counts.T / counts.sum() / area)
    top = math.ceil(max(float(log_p.max()), float(np.nanmax(log_hist))))
    levels = np.linspace(top - 8.0, top, 17)  # half-nat steps over the top 8 nats
    fig, axes = _figure(1, 2, figsize=(11, 5), sharex=True, sharey=True)
    axes[0].contourf((xe[:-1] + xe[1:]) / 2, (ye[:-1] + ye[1:]) / 2,
                     np.clip(log_hist, levels[0], None), levels=levels, cmap="viridis")  # fmt: skip
    axes[0].set_title(f"test data ({len(pts)} points)\nlog of the histogram density", fontsize=10)
    filled = axes[1].contourf(gx.numpy(), gy.numpy(), log_p.clamp(min=levels[0]).numpy(),
                              levels=levels, cmap="viridis")  # fmt: skip
    axes[1].set_title(
        f"model: importance-sampled log p(x), K={num_samples}\nmean over the test points "
        f"{test:.3f}",
        fontsize=10,
    )
    for ax in axes:
        ax.set_xlabel("x1")
        ax.set_aspect("equal")
    axes[0].set_ylabel("x2")
    fig.colorbar(filled, ax=axes, label="log density (nats)", shrink=0.85)
    return fig


@torch.no_grad()
def mixture_figure(mixture, data: Data) -> Figure | None:
    """The density over the test points (2-D data) or the component means as images.

    Returns ``None`` for data that are neither 2-D nor images.
    """
    # told apart by their attributes, not their classes: importing ppl_vae.mixture would
    # import scikit-learn (about a second), which the VAE's pictures do not need
    gaussian = hasattr(mixture, "covariance_type")  # GaussianMixture; BernoulliMixture has none
    if not gaussian and len(data.event_shape) == 3:
        order = mixture.weights_.argsort(descending=True)[:100]
        means = mixture.means_[order].reshape(-1, *data.event_shape).float()
        fig, ax = _figure(figsize=(7, 7))
        ax.imshow(image_grid(means, ncols=10).numpy(), cmap="gray", vmin=0, vmax=1)
        first = " (the first 100)" if mixture.n_components > 100 else ""
        ax.set_title(f"{mixture.n_components} component means, by weight{first}")
        ax.axis("off")
    elif gaussian and data.event_shape == (2,):
        fig, ax = _figure(figsize=(6, 6))
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
