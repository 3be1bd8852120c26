r"""The sufficient statistics of a set of points, computed once if they fit, read in chunks."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

__all__ = [
    "CACHE_BYTES",
    "ChunkedStatistics",
    "PassSpace",
    "affine_joint",
    "chunk_rows",
    "joint_out",
]

CACHE_BYTES = 2**30  # keep the sufficient statistics of the training set if they fit in this


def chunk_rows(width: int, x: Tensor) -> int:
    """Rows per pass: a few MiB on CPU (the chunk stays in cache for both products), more on GPU."""
    target = 2**22 if x.device.type == "cpu" else 2**28
    return max(64, target // (max(width, 1) * x.element_size()))


def joint_out(space: Tensor | None, k: int, stats: Tensor) -> Tensor | None:
    """The (K, n) view of the work space ``space`` that a chunk's joint is written into (n: the
    rows of its statistics ``stats``), or None (a new tensor) without one."""
    return None if space is None else space[: k * stats.shape[0]].view(k, stats.shape[0])


def affine_joint(a: Tensor, b: Tensor, stats: Tensor, space: Tensor | None = None) -> Tensor:
    """The joint A T(x)^T + b (K, n) of a chunk's statistics ``stats`` (n, F), with A (K, F) and
    b (K,), written into the work space ``space`` if given (see :func:`joint_out`)."""
    return torch.addmm(b.unsqueeze(1), a, stats.T, out=joint_out(space, a.shape[0], stats))


class PassSpace:
    """Tensors a pass writes each chunk's joint (K, n) and its per-point rows (1, n) into.

    A fresh tensor per chunk costs the page faults of new memory each time the allocator has
    given it back: 13-19% of a float32 diag pass for the joint, and a (1, n) operation took
    40-80 us instead of 3-18 (docs/BENCHMARKS.md, em).
    """

    def __init__(self, k: int, rows: int, like: Tensor):
        self.k, self.joint = k, like.new_empty(k * rows)  # flat: a chunk's (K, n) is contiguous
        self._rows = like.new_empty(2, rows)

    def row(self, i: int, n: int) -> Tensor:
        """Row ``i`` (0 or 1) as a (1, n) tensor."""
        return self._rows[i, :n].unsqueeze(0)


class ChunkedStatistics:
    """The sufficient statistics T(x) of the points ``x``, in chunks of rows.

    They are computed once and kept if they take at most ``CACHE_BYTES`` (and ``cache``);
    otherwise each chunk's are computed when it is read, into one work space kept for all
    chunks (so a chunk's statistics are valid until the next is read). ``work_width`` is the
    number of values per row a pass works on, if more than T(x) has (it sets the rows per
    chunk).
    """

    def __init__(
        self,
        statistics: Callable[..., Tensor],
        x: Tensor,
        work_width: int | None = None,
        cache: bool = True,
    ):
        width = statistics(x[:1]).shape[1]
        self.statistics, self.x, self.width = statistics, x, width
        # no more rows than there are points: the work spaces are sized by it (a GPU chunk is
        # 2^28 bytes, so 100k points would otherwise get space for 10 times their rows)
        self.rows_per_chunk = min(chunk_rows(work_width or width, x), max(1, x.shape[0]))
        fits = cache and x.shape[0] * width * x.element_size() <= CACHE_BYTES
        self.cached = statistics(x) if fits else None
        self._work = None  # the chunks' statistics are written here when not cached
        self._space = None

    def pass_space(self, k: int) -> PassSpace:
        """Work space for one chunk of a pass over these points with ``k`` components, kept for
        the whole fit."""
        if self._space is None or self._space.k != k:
            self._space = PassSpace(k, self.rows_per_chunk, self.x)
        return self._space

    def chunks(self) -> Iterator[tuple[int, Tensor]]:
        """Yields (first row, statistics of the rows from there) over the whole set."""
        for start in range(0, self.x.shape[0], self.rows_per_chunk):
            stop = start + self.rows_per_chunk
            if self.cached is not None:
                yield start, self.cached[start:stop]
            else:  # one work space for all chunks (a fresh one per chunk costs page faults)
                if self._work is None:
                    self._work = self.x.new_empty(self.rows_per_chunk * self.width)
                yield start, self.statistics(self.x[start:stop], self._work)
