r"""The sufficient statistics of a set of points, computed once if they fit, read in chunks."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from torch import Tensor

__all__ = ["CACHE_BYTES", "ChunkedStatistics", "chunk_rows"]

CACHE_BYTES = 2**30  # keep the sufficient statistics of the training set if they fit in this


def chunk_rows(width: int, x: Tensor) -> int:
    """Rows per pass: a few MiB on CPU (the chunk stays in cache for both products), more on GPU."""
    target = 2**22 if x.device.type == "cpu" else 2**28
    return max(64, target // (max(width, 1) * x.element_size()))


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
        self.rows_per_chunk = chunk_rows(work_width or width, x)
        fits = cache and x.shape[0] * width * x.element_size() <= CACHE_BYTES
        self.cached = statistics(x) if fits else None
        self._work = None  # the chunks' statistics are written here when not cached

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
