r"""Where the points given to ``fit`` sit among all the points EM fits.

In one process they are the whole set. Under ``torchrun`` with ``sharded`` set on a mixture,
each rank holds a contiguous shard (rank order) of one training set: every sum over points is
summed over the ranks, and the initialisations draw global row indices with the same generator
on every rank, so that N ranks fit the mixture one process fits on all the points (to rounding).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ppl_vae.distributed import all_gather_objects, all_reduce_sum, world

__all__ = ["Rows"]


class Rows:
    """The rows ``x`` are of the whole set: ``offset`` onwards, of ``total``."""

    def __init__(self, x: Tensor, sharded: bool = False):
        self.n = x.shape[0] if x.dim() > 0 else 0
        self.sharded = sharded and world().distributed
        if self.sharded:
            counts = all_gather_objects(self.n)
            self.offset, self.total = sum(counts[: world().rank]), sum(counts)
        else:
            self.offset, self.total = 0, self.n

    def reduce(self, t: Tensor) -> Tensor:
        """``t`` summed over the shards (in place); ``t`` in one process."""
        return all_reduce_sum(t) if self.sharded else t

    def local_rows(self, t: Tensor) -> Tensor:
        """This shard's rows of ``t``, a tensor over all ``total`` rows."""
        return t[self.offset : self.offset + self.n] if self.sharded else t

    def mean(self, x: Tensor) -> Tensor:
        """The mean of the rows of the whole set, per column."""
        return self.reduce(x.sum(0)) / self.total if self.sharded else x.mean(0)

    def var(self, x: Tensor) -> Tensor:
        """The unbiased variance of the rows of the whole set, per column."""
        if not self.sharded:
            return x.var(0)
        return self.reduce(((x - self.mean(x)) ** 2).sum(0)) / (self.total - 1)

    def take(self, x: Tensor, index: Sequence[int] | Tensor) -> Tensor:
        """Rows ``index`` (global) of the whole set of which ``x`` is the shard, on every rank."""
        index = torch.as_tensor(index, dtype=torch.long)
        if not self.sharded:
            return x[index.to(x.device)]
        out = x.new_zeros((len(index), *x.shape[1:]))
        which, local = self.local_index(index)
        out[which.to(x.device)] = x[local.to(x.device)]
        return self.reduce(out)

    def gather(self, t: Tensor) -> Tensor:
        """Every shard's ``t`` (rows of this shard) concatenated: a tensor over all rows."""
        if not self.sharded:
            return t
        return torch.cat([p.to(t.device) for p in all_gather_objects(t.cpu())])

    def local_index(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """Of global row indices: the positions that fall in this shard and their local rows."""
        index = index.cpu()
        where = torch.nonzero((index >= self.offset) & (index < self.offset + self.n)).flatten()
        return where, index[where] - self.offset
