r"""The Gaussian mixture's E- and M-step, one computation per covariance type and dtype.

:func:`computation` picks one when a fit starts; the mixture then calls it without asking which
it is. Points are centred on the data mean (``mu`` below is a mean minus that shift).

*Moments* (every covariance type in float64; ``diag`` and ``spherical`` in float32): the
log-density is linear in the sufficient statistics :math:`T(x) = (x, x_i x_j)_{i \le j}` (or
:math:`x_i^2`, or :math:`|x|^2`), so the E-step is one product :math:`T(x) A` and the M-step's
sums one product :math:`r^\top T(x)`. *Scatter* (``full`` and ``tied`` in float32): the expansion
:math:`x^\top P x - 2 x^\top P \mu + \mu^\top P \mu` rounds to about machine epsilon times the
squared Mahalanobis distance from the data mean, too much in float32 for thin components far
from it; so, as scikit-learn, :math:`\|(x - \mu_k) U_k\|^2` from one product
:math:`x [U_1 \dots U_K]`, and the M-step sums the scatter about the current means.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from ppl_vae.errors import InputError
from ppl_vae.mixture import native
from ppl_vae.mixture.chunks import affine_joint, chunk_rows, joint_out
from ppl_vae.registry import Registry

__all__ = ["COVARIANCE_TYPES", "LOG_2PI", "Computation", "computation"]

LOG_2PI = math.log(2 * math.pi)

COVARIANCE_TYPES: Registry[tuple[int, ...]] = Registry("covariance type")
"""The covariance types; each factory maps (K, D) to the shape of the precisions."""
COVARIANCE_TYPES.register("full", lambda k, d: (k, d, d), help="one (D, D) covariance each")
COVARIANCE_TYPES.register("tied", lambda k, d: (d, d), help="one (D, D) covariance shared by all")
COVARIANCE_TYPES.register("diag", lambda k, d: (k, d), help="one diagonal covariance each")
COVARIANCE_TYPES.register("spherical", lambda k, d: (k,), help="one variance each")


def _outer(v: Tensor) -> Tensor:
    """v v^T for every row of ``v``, (K, D) -> (K, D, D)."""
    return v.unsqueeze(-1) * v.unsqueeze(-2)


Centre = Callable[[], Tensor]
"""The current (centred) means, (K, D), computed when called: the scatter's centre."""


# -- precisions from a covariance estimate -----------------------------------------------------


def _matrix_precisions(cov: Tensor, reg_covar: float) -> tuple[Tensor, Tensor, Tensor]:
    """(covariances, U, precisions) of (K, D, D) or (D, D) covariances plus ``reg_covar`` I."""
    cov.diagonal(dim1=-2, dim2=-1).add_(reg_covar)
    lower, info = torch.linalg.cholesky_ex(cov)
    if (info != 0).any():
        which = (
            f"of component(s) {(info != 0).nonzero().flatten().tolist()}"
            if info.dim()
            else "(tied)"
        )
        raise InputError(
            f"the covariance {which} is singular even with reg_covar={reg_covar:g}; "
            f"increase reg_covar (e.g. to 1e-3), use fewer components or scale the data"
            + (", or fit in float64" if cov.dtype == torch.float32 else "")
        )
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    u = torch.linalg.solve_triangular(lower, eye, upper=False).mT
    return cov, u, u @ u.mT


def _vector_precisions(var: Tensor, reg_covar: float) -> tuple[Tensor, Tensor, Tensor]:
    """(variances, their rsqrt, precisions) of (K, D) or (K,) variances plus ``reg_covar``."""
    var = var + reg_covar
    if not (var > 0).all():
        raise InputError(
            f"a component's variance is not positive even with reg_covar={reg_covar:g}; "
            f"increase reg_covar (e.g. to 1e-3), use fewer components or scale the data"
        )
    return var, var.rsqrt(), 1 / var


# -- the computations ----------------------------------------------------------------------------


class Computation:
    """The moments form: ``statistics``, ``natural`` (A, b), the default ``joint`` and ``sums``.

    A subclass gives :meth:`statistics`, :meth:`_linear` (or :meth:`natural`) and
    :meth:`covariance`, and ``precisions``, which adds ``reg_covar`` and factors the estimate.
    """

    centres_first = False  # the first sums are taken about the weighted means (scatter)
    cache = True  # keep the statistics of the training set (if they fit); False: per chunk
    precisions = staticmethod(_matrix_precisions)

    def work_width(self, k: int, d: int) -> int | None:
        """Values per row a pass works on, if more than the statistics have."""
        return None

    def whole_pass(self, x: Tensor, k: int) -> Callable[..., tuple[Tensor, Tensor, float]] | None:
        """A compiled pass over all the centred points ``x`` for ``k`` components that takes
        :meth:`natural`'s tensors, or None (the mixture's pass goes chunk by chunk)."""
        return None

    def statistics(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """T(x) of centred points, shape (n, F); ``out``, if given, a flat work space of at
        least n F values the statistics may be written into (reused from chunk to chunk)."""
        raise NotImplementedError

    def _linear(self, mu: Tensor, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """P mu (K, D), the coefficients of the quadratic statistics, log det U (K,)."""
        raise NotImplementedError

    def _halves(self, weights: Tensor, mu: Tensor, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """A's columns for x (P mu, (K, D)) and for the quadratic statistics, and b (K,)."""
        pmu, quad, log_det = self._linear(mu, u)
        d = mu.shape[1]
        b = weights.log() - 0.5 * (mu * pmu).sum(-1) + log_det - 0.5 * d * LOG_2PI
        return pmu, quad, b

    def natural(self, weights: Tensor, mu: Tensor, u: Tensor) -> tuple[Tensor, ...]:
        """A (K, F) and b (K,) with log w_k + log p(x | k) = A T(x) + b."""
        pmu, quad, b = self._halves(weights, mu, u)
        return torch.cat([pmu, quad], 1), b

    def joint(
        self, stats: Tensor, natural: tuple[Tensor, ...], out: Tensor | None = None
    ) -> Tensor:
        """log w_k + log p(x_n | k) for a chunk, shape (K, n); ``out``: a flat work space of at
        least K n values to write it into, or None."""
        return affine_joint(*natural, stats, out)

    def sums(self, resp: Tensor, stats: Tensor, centre: Centre) -> Tensor:
        """The M-step's sums over a chunk from responsibilities (K, n)."""
        return resp @ stats

    def covariance(
        self, stats: Tensor, nk: Tensor, nk_eps: Tensor, mu: Tensor, centre: Centre
    ) -> Tensor:
        """The covariance estimate (before ``reg_covar``) from the sums, the counts ``nk``
        (``nk_eps``: plus 10 eps, scikit-learn's) and the new means ``mu``."""
        raise NotImplementedError


class _FullMoments(Computation):
    # Made per chunk, feature-major, they cost no more than reading a cache of D (D + 3) / 2
    # values per point (docs/BENCHMARKS.md), so the extra memory is one chunk's.
    cache = False

    def statistics(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """T(x) as a (n, F) view of a feature-major (F, n) tensor (in ``out`` if given)."""
        n, d = x.shape
        f = d + d * (d + 1) // 2
        out = x.new_empty(f, n) if out is None else out[: f * n].view(f, n)
        out[:d] = x.T
        start = d
        for i in range(d):  # rows x_i x_j, j >= i: one broadcast product of contiguous rows each
            torch.mul(out[i : i + 1], out[i:d], out=out[start : start + d - i])
            start += d - i
        return out.T

    def _linear(self, mu: Tensor, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        k, d = mu.shape
        u = u.expand(k, d, d)
        p = u @ u.mT
        pmu = (p @ mu.unsqueeze(-1)).squeeze(-1)
        rows, cols = torch.triu_indices(d, d, device=mu.device)
        quad = p[:, rows, cols] * torch.where(rows == cols, -0.5, -1.0).to(p.dtype)
        return pmu, quad, u.diagonal(dim1=-2, dim2=-1).log().sum(-1)

    @staticmethod
    def _second_moments(stats: Tensor, d: int) -> Tensor:
        """S = sum_n r x x^T (K, D, D) from its upper triangle."""
        rows, cols = torch.triu_indices(d, d, device=stats.device)
        s = stats.new_zeros(stats.shape[0], d, d)
        s[:, rows, cols] = stats[:, d:]
        s[:, cols, rows] = stats[:, d:]
        return s

    def covariance(self, stats, nk, nk_eps, mu, centre):
        # sum_n r (x - mu)(x - mu)^T / N_k = S / N_k - (2 - n_k / N_k) mu mu^T
        s = self._second_moments(stats, mu.shape[1])
        correction = 2 - nk / nk_eps
        return s / nk_eps[:, None, None] - correction[:, None, None] * _outer(mu)


class _TiedMoments(_FullMoments):
    def covariance(self, stats, nk, nk_eps, mu, centre):
        # pooled, as scikit-learn: (X^T X - sum_k N_k mu_k mu_k^T) / sum_k N_k
        s = self._second_moments(stats, mu.shape[1])
        return (s.sum(0) - (nk_eps[:, None, None] * _outer(mu)).sum(0)) / nk_eps.sum()


class Squares(NamedTuple):
    """A chunk's diagonal statistics T(x) = (x, x^2), (n, 2 D), as two (n, D) tensors: the points
    themselves (a view, not a copy) and their squares."""

    x: Tensor
    square: Tensor

    @property
    def shape(self) -> torch.Size:
        """(n, 2 D), the shape of T(x) as one tensor."""
        n, d = self.x.shape
        return torch.Size((n, 2 * d))


class _DiagMoments(Computation):
    # Made per chunk: x is read where it is and only x^2 is written, into the pass's work space
    # (copying x beside it into one (n, 2 D) tensor cost 0.9 ms of a 10 ms float32 pass at
    # 100k x 32; the products in two halves cost about what one costs); reading a kept cache of
    # (x, x^2), twice the data, from memory each pass cost more still (docs/BENCHMARKS.md, em).
    # Spherical's cache, one column more than the data, stays (made per chunk it was 10% slower).
    cache = False
    precisions = staticmethod(_vector_precisions)

    def statistics(self, x: Tensor, out: Tensor | None = None) -> Squares:
        n, d = x.shape
        square = x.new_empty(n, d) if out is None else out[: d * n].view(n, d)
        return Squares(x, torch.mul(x, x, out=square))

    def _linear(self, mu: Tensor, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        prec = u * u
        return mu * prec, -0.5 * prec, u.log().sum(-1)

    def natural(self, weights: Tensor, mu: Tensor, u: Tensor) -> tuple[Tensor, ...]:
        """A's two halves apart, (P mu (K, D), -P / 2 (K, D), b): the joint takes one product
        with each of x and x^2."""
        return self._halves(weights, mu, u)

    def whole_pass(self, x: Tensor, k: int) -> Callable[..., tuple[Tensor, Tensor, float]] | None:
        """On a CPU with AVX-512, float32, K <= 16: products, responsibilities and sums of 16
        points at a time in registers (:func:`ppl_vae.mixture.native.diag_pass`)."""
        return native.diag_pass(x, k)

    def joint(self, stats: Squares, natural, out=None):
        a_x, a_square, b = natural
        return affine_joint(a_x, b, stats.x, out).addmm_(a_square, stats.square.T)

    def sums(self, resp: Tensor, stats: Squares, centre: Centre) -> Tensor:
        d = stats.x.shape[1]
        out = resp.new_empty(resp.shape[0], 2 * d)
        torch.mm(resp, stats.x, out=out[:, :d])
        torch.mm(resp, stats.square, out=out[:, d:])
        return out

    def covariance(self, stats, nk, nk_eps, mu, centre):
        d = mu.shape[1]  # scikit-learn's estimate: E_r[x^2] - mu^2
        return stats[:, d:] / nk_eps[:, None] - mu * mu


class _SphericalMoments(Computation):
    precisions = staticmethod(_vector_precisions)

    def statistics(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        return torch.cat([x, (x * x).sum(1, keepdim=True)], 1)

    def _linear(self, mu: Tensor, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        prec = u * u
        return mu * prec[:, None], -0.5 * prec[:, None], mu.shape[1] * u.log()

    def covariance(self, stats, nk, nk_eps, mu, centre):
        d = mu.shape[1]  # the mean of diag's estimate over dimensions, from E_r[|x|^2]
        return (stats[:, d] / nk_eps - (mu * mu).sum(1)) / d


class _FullScatter(Computation):
    centres_first = True

    def work_width(self, k: int, d: int) -> int | None:
        # a chunk holds its points and their (K, n) joint; the (n, K D) product is made in
        # blocks of its own size (joint), so the M-step's sums, whose cost per call hardly
        # grows with the rows, run once per chunk of about 8 such blocks (docs/BENCHMARKS.md)
        return d + k

    def statistics(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        return x

    def natural(self, weights: Tensor, mu: Tensor, u: Tensor) -> tuple[Tensor, ...]:
        """U_k's columns (D, D K), -mu_k U_k (D K,) and b (K,); column j K + k is column j of
        U_k (components innermost: the sum over j then adds whole rows of K values)."""
        k, d = mu.shape
        u = u.expand(k, d, d)
        log_det = u.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        b = weights.log() + log_det - 0.5 * d * LOG_2PI
        u_all = u.permute(1, 2, 0).reshape(d, d * k)
        offset = -(mu.unsqueeze(1) @ u).squeeze(1).T.reshape(d * k)
        work = [u_all.new_empty(0)]  # a work space reused by chunks
        return u_all, offset, b, work, self._bands(u)

    @staticmethod
    def _bands(u: Tensor) -> list[tuple[int, int]]:
        """Column ranges [j0, j1) of the U_k whose rows from j1 on are zero.

        U_k is upper triangular (as its log-determinant above takes it), so column j of
        (x - mu_k) U_k reads only the first j + 1 values of x; in bands of columns, each band's
        product reads only the first j1 rows of U. Four bands for D = 32 do 5/8 of the
        arithmetic in 0.77-0.84 of the time (docs/BENCHMARKS.md, em).
        """
        d = u.shape[-1]
        count = min(4, max(1, d // 8))  # narrower bands lose more in speed than they save
        edges = [round(d * i / count) for i in range(count + 1)]
        return list(itertools.pairwise(edges))

    def joint(self, stats, natural, out=None):
        u_all, offset, b, work, bands = natural  # (D, D K), (D K,), (K,), [(rows, D K)], ...
        n, k = stats.shape[0], b.shape[0]
        rows = min(n, chunk_rows(u_all.shape[1], stats))
        if work[0].shape[0] < rows:  # one (rows, K D) block per pass rather than one per chunk
            work[0] = u_all.new_empty(rows, u_all.shape[1])
        out = stats.new_empty(k, n) if out is None else joint_out(out, k, stats)
        for start in range(0, n, rows):
            x = stats[start : start + rows]
            y = work[0][: x.shape[0]]
            for j0, j1 in bands:  # columns j0 K .. j1 K - 1 of the product
                c0, c1 = j0 * k, j1 * k
                torch.addmm(offset[c0:c1], x[:, :j1], u_all[:j1, c0:c1], out=y[:, c0:c1])
            y.square_()
            distance = y.view(x.shape[0], -1, k).sum(1).T  # |(x - mu_k) U_k|^2, (K, rows)
            torch.add(b.unsqueeze(1), distance, alpha=-0.5, out=out[:, start : start + rows])
        return out

    def sums(self, resp: Tensor, stats: Tensor, centre: Centre) -> Tensor:
        """sum_n r x and the scatter sum_n r (x - c_k)(x - c_k)^T about the current means c_k.

        A pair (point, component) whose responsibility is below eps^2 (1.4e-14 in float32) is
        left out of the scatter: it would change it by eps^2 times its squared distance, far below
        the sum's rounding unless that point is some 10^7 variances away. When at most a quarter
        of the pairs remain (each point mostly in a few components, as once clusters separate),
        the scatter is summed over the remaining pairs only, each component's with one product;
        otherwise over all pairs with one batched product.
        """
        c = centre()
        keep = resp > torch.finfo(resp.dtype).eps ** 2
        counts = keep.sum(1)
        if 4 * int(counts.sum()) > resp.numel():  # in blocks of rows: z is (K, rows, D)
            rows = chunk_rows(c.numel(), stats)
            scatter = None
            for start in range(0, stats.shape[0], rows):
                x, r = stats[start : start + rows], resp[:, start : start + rows]
                z = (x.unsqueeze(0) - c.unsqueeze(1)).mul_(r.sqrt()[..., None])
                scatter = z.mT @ z if scatter is None else scatter.baddbmm_(z.mT, z)
        else:
            k_of, n_of = keep.nonzero(as_tuple=True)  # ordered by component
            z = stats.index_select(0, n_of)
            w = resp[k_of, n_of].sqrt_().unsqueeze(1)
            d = stats.shape[1]
            scatter = stats.new_zeros(resp.shape[0], d, d)
            counts = counts.tolist()
            for k, (part, wk) in enumerate(zip(z.split(counts), w.split(counts), strict=True)):
                if part.shape[0]:
                    part.sub_(c[k]).mul_(wk)
                    torch.mm(part.T, part, out=scatter[k])
        return torch.cat([resp @ stats, scatter.flatten(1)], 1)

    @staticmethod
    def _scatter(stats: Tensor, nk: Tensor, mu: Tensor, centre: Tensor) -> Tensor:
        """sum_n r (x - mu)(x - mu)^T from the scatter S about c: S - e d^T - d e^T + n d d^T."""
        d = mu.shape[1]
        scatter = stats[:, d:].reshape(-1, d, d)
        e = stats[:, :d] - nk[:, None] * centre  # sum_n r (x - c)
        delta = mu - centre
        cross = e.unsqueeze(-1) * delta.unsqueeze(-2)
        return scatter - cross - cross.mT + nk[:, None, None] * _outer(delta)

    def covariance(self, stats, nk, nk_eps, mu, centre):
        return self._scatter(stats, nk, mu, centre()) / nk_eps[:, None, None]


class _TiedScatter(_FullScatter):
    def covariance(self, stats, nk, nk_eps, mu, centre):
        return self._scatter(stats, nk, mu, centre()).sum(0) / nk_eps.sum()


_MOMENTS = {
    "full": _FullMoments(),
    "tied": _TiedMoments(),
    "diag": _DiagMoments(),
    "spherical": _SphericalMoments(),
}
_FLOAT32 = {**_MOMENTS, "full": _FullScatter(), "tied": _TiedScatter()}


def computation(covariance_type: str, dtype: torch.dtype) -> Computation:
    """The computation of a mixture with ``covariance_type`` fitted in ``dtype``."""
    return (_FLOAT32 if dtype == torch.float32 else _MOMENTS)[covariance_type]
