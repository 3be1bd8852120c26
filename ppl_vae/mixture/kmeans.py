r"""k-means (Lloyd's algorithm) from k-means++ seeds, in PyTorch, for initialising EM."""

from __future__ import annotations

import torch
from torch import Tensor

from ppl_vae.mixture.rows import Rows

__all__ = ["kmeans", "kmeans_plusplus", "nearest"]


def nearest(x: Tensor, centers: Tensor) -> Tensor:
    """Index of the nearest row of ``centers`` for every row of ``x``."""
    d = (centers * centers).sum(1) - 2 * (x @ centers.T)
    return d.argmin(1)


def kmeans_plusplus(x: Tensor, k: int, g: torch.Generator, rows: Rows | None = None) -> Tensor:
    """Indices of k-means++ seeds (Arthur & Vassilvitskii 2007): each next one drawn with
    probability proportional to its squared distance from the nearest seed so far.

    Draws come from the CPU generator ``g``; the indices are a CPU tensor of shape (k,), global
    row indices when ``x`` is a shard (``rows``): the distances of all shards are gathered so
    that every rank draws the same seeds.
    """
    rows = rows or Rows(x)
    sq = (x * x).sum(1)

    def distances(index: int) -> Tensor:
        point, norm = rows.take(x, [index])[0], rows.take(sq, [index])[0]
        return (sq - 2 * (x @ point) + norm).clamp_min_(0)

    index = int(torch.randint(rows.total, (1,), generator=g))
    seeds = [index]
    d2 = distances(index)
    for _ in range(1, k):
        weights = rows.gather(d2).to("cpu", torch.float64)
        if not weights.sum() > 0:  # every point coincides with a seed
            index = int(torch.randint(rows.total, (1,), generator=g))
        else:
            index = int(torch.multinomial(weights, 1, generator=g))
        seeds.append(index)
        d2 = torch.minimum(d2, distances(index))
    return torch.tensor(seeds)


def kmeans(
    x: Tensor,
    k: int,
    g: torch.Generator,
    max_iter: int = 100,
    tol: float = 1e-4,
    rows: Rows | None = None,
):
    """Lloyd's k-means from k-means++ seeds; returns the label of every point (of the shard).

    Stops when no label changes or the centres move less (summed squared distance) than
    ``tol`` times the mean per-dimension variance of ``x``, as scikit-learn does. An empty
    cluster keeps its centre. With ``rows`` of a shard, counts, sums, the variance and the
    stopping test are over all shards.
    """
    rows = rows or Rows(x)
    centers = rows.take(x, kmeans_plusplus(x, k, g, rows))
    limit = tol * rows.var(x).mean()
    labels = nearest(x, centers)
    for _ in range(max_iter):
        onehot = torch.nn.functional.one_hot(labels, k).to(x.dtype)
        counts = rows.reduce(onehot.sum(0))
        sums = rows.reduce(onehot.T @ x)
        moved = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centers)
        shift = ((moved - centers) ** 2).sum()
        centers = moved
        new = nearest(x, centers)
        changed = rows.reduce(torch.tensor(float(not torch.equal(new, labels)), device=x.device))
        if not changed > 0 or shift <= limit:
            return new
        labels = new
    return labels
