r"""k-means (Lloyd's algorithm) from k-means++ seeds, in PyTorch, for initialising EM."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["_kmeans", "_kmeans_plusplus", "_nearest"]


def _nearest(x: Tensor, centers: Tensor) -> Tensor:
    """Index of the nearest row of ``centers`` for every row of ``x``."""
    d = (centers * centers).sum(1) - 2 * (x @ centers.T)
    return d.argmin(1)


def _kmeans_plusplus(x: Tensor, k: int, g: torch.Generator) -> Tensor:
    """Indices of k-means++ seeds (Arthur & Vassilvitskii 2007): each next one drawn with
    probability proportional to its squared distance from the nearest seed so far.

    Draws come from the CPU generator ``g``; the indices are a CPU tensor of shape (k,).
    """
    n = x.shape[0]
    sq = (x * x).sum(1)
    index = int(torch.randint(n, (1,), generator=g))
    seeds = [index]
    d2 = (sq - 2 * (x @ x[index]) + sq[index]).clamp_min_(0)
    for _ in range(1, k):
        weights = d2.to("cpu", torch.float64)
        if not weights.sum() > 0:  # every point coincides with a seed
            index = int(torch.randint(n, (1,), generator=g))
        else:
            index = int(torch.multinomial(weights, 1, generator=g))
        seeds.append(index)
        d2 = torch.minimum(d2, (sq - 2 * (x @ x[index]) + sq[index]).clamp_min_(0))
    return torch.tensor(seeds)


def _kmeans(x: Tensor, k: int, g: torch.Generator, max_iter: int = 100, tol: float = 1e-4):
    """Lloyd's k-means from k-means++ seeds; returns the label of every point.

    Stops when no label changes or the centres move less (summed squared distance) than
    ``tol`` times the mean per-dimension variance of ``x``, as scikit-learn does. An empty
    cluster keeps its centre.
    """
    centers = x[_kmeans_plusplus(x, k, g).to(x.device)]
    limit = tol * x.var(0).mean()
    labels = _nearest(x, centers)
    for _ in range(max_iter):
        onehot = torch.nn.functional.one_hot(labels, k).to(x.dtype)
        counts = onehot.sum(0)
        sums = onehot.T @ x
        moved = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centers)
        shift = ((moved - centers) ** 2).sum()
        centers = moved
        new = _nearest(x, centers)
        if torch.equal(new, labels) or shift <= limit:
            return new
        labels = new
    return labels
