r"""The initial responsibilities EM starts from, by name (``init``): k-means, seeds, random."""

from __future__ import annotations

import torch
from torch import Tensor

from ppl_vae.mixture.kmeans import kmeans, kmeans_plusplus
from ppl_vae.mixture.rows import Rows
from ppl_vae.registry import Registry

__all__ = ["INITS"]

INITS: Registry[Tensor] = Registry("init")
"""Each factory maps (x, k, generator, rows=None) to responsibilities (N, k) of the points x;
``rows`` is passed only when x is one shard of the points (torchrun)."""


def _one_per_component(index: Tensor, k: int, x: Tensor, rows: Rows) -> Tensor:
    """Responsibilities (n, k) that put point ``index[j]`` (a global row) in component j and
    leave the rest 0."""
    which, local = rows.local_index(index)
    return torch.zeros(x.shape[0], k, dtype=x.dtype, device=x.device).index_put_(
        (local.to(x.device), which.to(x.device)), torch.ones((), dtype=x.dtype)
    )


@INITS.register("kmeans", help="labels of k-means (Lloyd's, from k-means++ seeds)")
def _init_kmeans(x: Tensor, k: int, g: torch.Generator, rows: Rows | None = None) -> Tensor:
    return torch.nn.functional.one_hot(kmeans(x, k, g, rows=rows), k).to(x.dtype)


@INITS.register("k-means++", help="k-means++ seeds, one per component; other points unassigned")
def _init_kmeans_plusplus(
    x: Tensor, k: int, g: torch.Generator, rows: Rows | None = None
) -> Tensor:
    # like scikit-learn: only the seeds are assigned
    rows = rows or Rows(x)
    return _one_per_component(kmeans_plusplus(x, k, g, rows), k, x, rows)


@INITS.register("random", help="uniform random responsibilities, normalised")
def _init_random(x: Tensor, k: int, g: torch.Generator, rows: Rows | None = None) -> Tensor:
    rows = rows or Rows(x)
    resp = rows.local_rows(torch.rand(rows.total, k, generator=g, dtype=torch.float64)).to(x)
    return resp / resp.sum(1, keepdim=True)


@INITS.register("random_from_data", help="one random point per component")
def _init_random_from_data(
    x: Tensor, k: int, g: torch.Generator, rows: Rows | None = None
) -> Tensor:
    rows = rows or Rows(x)
    return _one_per_component(torch.randperm(rows.total, generator=g)[:k], k, x, rows)
