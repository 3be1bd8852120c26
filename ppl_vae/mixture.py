r"""Gaussian and Bernoulli mixtures fitted by expectation-maximisation (EM), in PyTorch."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import Tensor

from ppl_vae.data import DataConfig, load_data

__all__ = [
    "COVARIANCE_TYPES",
    "INITS",
    "BernoulliMixture",
    "GaussianMixture",
    "MixtureConfig",
    "em_run",
    "make_mixture",
]

CovarianceType = Literal["full", "tied", "diag", "spherical"]
Init = Literal["kmeans", "k-means++", "random", "random_from_data"]
COVARIANCE_TYPES: tuple[str, ...] = ("full", "tied", "diag", "spherical")
INITS: tuple[str, ...] = ("kmeans", "k-means++", "random", "random_from_data")
CACHE_BYTES = 2**30  # keep the sufficient statistics of the training set if they fit in this
LOG_2PI = math.log(2 * math.pi)


def _chunk_rows(width: int, x: Tensor) -> int:
    """Rows per pass: a few MiB on CPU (the chunk stays in cache for both products), more on GPU."""
    target = 2**22 if x.device.type == "cpu" else 2**28
    return max(64, target // (max(width, 1) * x.element_size()))


def _as_float(x, name: str = "x") -> Tensor:
    """A floating tensor from ``x`` (integer and boolean input becomes the default dtype)."""
    x = x if isinstance(x, Tensor) else torch.as_tensor(x)
    if not torch.is_floating_point(x):
        return x.to(torch.get_default_dtype())
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} has dtype {x.dtype}; pass float32 or float64 (x.float())")
    return x


class _Source:
    """The sufficient statistics of a training set, in chunks; cached if within CACHE_BYTES."""

    def __init__(self, features, x: Tensor, work_width: int | None = None, cache: bool = True):
        width = features(x[:1]).shape[1]
        self.features, self.x = features, x
        self.rows = _chunk_rows(work_width or width, x)  # work_width: values per row per pass
        fits = cache and x.shape[0] * width * x.element_size() <= CACHE_BYTES
        self.cached = features(x) if fits else None

    def chunks(self):
        """Yields (first row, features of the rows from there) over the whole set."""
        for start in range(0, self.x.shape[0], self.rows):
            stop = start + self.rows
            if self.cached is not None:
                yield start, self.cached[start:stop]
            else:
                yield start, self.features(self.x[start:stop])


class _Mixture:
    r"""EM for a mixture of exponential-family components, shared by the concrete mixtures.

    A component's log-density is linear in sufficient statistics :math:`T(x)`, so the joint
    :math:`\log w_k + \log p(x \mid \theta_k) = T(x)^\top a_k + b_k` of all points and components
    is one matrix product, and the E- and M-steps of one iteration take a single pass over the
    data: each chunk's responsibilities :math:`r` are folded at once into :math:`r^\top T(x)`,
    :math:`\sum_n r_{nk}` and :math:`\sum_n \log p(x_n)`.
    """

    def __init__(
        self,
        n_components: int,
        tol: float,
        max_iter: int,
        n_init: int,
        init: str,
        seed: int | None,
        warm_start: bool,
    ):
        checks = [
            ("n_components", n_components, isinstance(n_components, int) and n_components >= 1),
            ("tol", tol, isinstance(tol, (int, float)) and tol >= 0),
            ("max_iter", max_iter, isinstance(max_iter, int) and max_iter >= 0),
            ("n_init", n_init, isinstance(n_init, int) and n_init >= 1),
        ]
        for name, value, ok in checks:
            if not ok or isinstance(value, bool):
                kind = "a non-negative" if name in ("tol", "max_iter") else "a positive"
                kind += " number" if name == "tol" else " integer"
                raise ValueError(f"{name} must be {kind}, got {value!r}")
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
        self.n_components, self.tol, self.max_iter = n_components, float(tol), max_iter
        self.n_init, self.init, self.seed, self.warm_start = n_init, init, seed, warm_start
        self.history_: list[float] = []

    # -- hooks of the concrete mixtures ----------------------------------------------------------

    def _check_input(self, x: Tensor, fitting: bool) -> Tensor:
        raise NotImplementedError

    def _check_points(self, x: Tensor, fitting: bool, what: str) -> Tensor:
        """Checks an (N, D) tensor against the fitted D, the number of components, finiteness."""
        if not fitting and x.shape[1] != self.means_.shape[1]:
            raise ValueError(
                f"x has D={x.shape[1]} {what} but the mixture was fitted on "
                f"D={self.means_.shape[1]}; pass points with the same {what}"
            )
        if fitting and x.shape[0] < self.n_components:
            raise ValueError(
                f"x has {x.shape[0]} points but n_components={self.n_components}; use at most "
                f"{x.shape[0]} components or more data"
            )
        if not torch.isfinite(x).all():
            raise ValueError("x contains NaN or infinite values; clean or drop those rows")
        return x

    def _features(self, x: Tensor) -> Tensor:
        """Sufficient statistics T(x), shape (n, F), of prepared (e.g. centred) points."""
        raise NotImplementedError

    def _natural(self) -> tuple[Tensor, ...]:
        """A (K, F) and b (K,) with log w_k + log p(x | k) = A @ T(x) + b."""
        raise NotImplementedError

    def _joint(self, feats: Tensor, natural: tuple[Tensor, ...]) -> Tensor:
        """log w_k + log p(x_n | k) for a chunk, shape (K, n)."""
        a, b = natural
        return torch.addmm(b.unsqueeze(1), a, feats.T)

    def _sums(self, resp: Tensor, feats: Tensor) -> Tensor:
        """The M-step's sums over a chunk, r^T T(x), from responsibilities (K, n)."""
        return resp @ feats

    def _work_width(self, x: Tensor) -> int | None:
        return None

    def _centre_on(self, resp: Tensor, x: Tensor) -> None:
        """Called with the initial responsibilities before the first M-step."""

    def _m_step(self, stats: Tensor, nk: Tensor) -> None:
        """Updates the parameters from r^T T(x) (K, F) and sum_n r (K,)."""
        raise NotImplementedError

    def _log_prior(self) -> float:
        return 0.0

    def _prepare(self, x: Tensor) -> Tensor:
        return x

    def _parameters(self) -> dict[str, Tensor]:
        raise NotImplementedError

    # -- EM --------------------------------------------------------------------------------------

    @property
    def _fitted(self) -> bool:
        return hasattr(self, "weights_")

    def _require_fitted(self) -> None:
        if not self._fitted:
            raise ValueError(f"this {type(self).__name__} is not fitted yet; call fit(x) first")

    def _generator(self) -> torch.Generator:
        g = torch.Generator()
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g

    def _pass(self, source: _Source) -> tuple[Tensor, Tensor, Tensor]:
        """One E-step fused with the M-step's sums: (r^T T(x), sum_n r, sum_n log p(x_n)).

        Components run along rows, (K, n): for float64 on CPU, ``A @ T^T`` in that layout is
        more than twice as fast as ``T @ A^T`` with MKL. Log-responsibilities are floored just
        above the log of the smallest normal number before ``exp`` (whose path for results near
        or below it is ten times slower); a responsibility below 1e-37 (float32) or 1e-307
        (float64) changes no sum.
        """
        natural = self._natural()
        floor = math.log(torch.finfo(source.x.dtype).tiny) + 2
        stats = nk = total = None
        for _, feats in source.chunks():
            joint = self._joint(feats, natural)  # (K, n)
            top = joint.amax(0, keepdim=True)
            resp = joint.sub_(top).clamp_(min=floor).exp_()
            norm = resp.sum(0, keepdim=True)
            resp.div_(norm)  # p(k | x_n), columns sum to 1
            log_px = top.sum() + norm.log().sum()  # sum_n log sum_k exp(joint)
            if stats is None:
                stats, nk, total = self._sums(resp, feats), resp.sum(1), log_px
            else:
                stats += self._sums(resp, feats)
                nk += resp.sum(1)
                total += log_px
        return stats, nk, total

    def _em(self, source: _Source, n: int, lower_bound: float) -> tuple[list[float], bool, int]:
        history, converged, n_iter = [], False, 0
        for n_iter in range(1, self.max_iter + 1):
            previous = lower_bound
            stats, nk, total = self._pass(source)
            lower_bound = (total.item() + self._log_prior()) / n
            if not math.isfinite(lower_bound):
                raise ValueError(
                    f"EM reached a non-finite log-likelihood at iteration {n_iter}; increase "
                    f"reg_covar, scale the data, or fit in float64"
                )
            history.append(lower_bound)
            self._m_step(stats, nk)
            if abs(lower_bound - previous) < self.tol:
                converged = True
                break
        return history, converged, n_iter

    def _initial_resp(self, x: Tensor, g: torch.Generator) -> Tensor:
        """Initial responsibilities (N, K) from ``init``, drawn from the CPU generator ``g``."""
        n, k = x.shape[0], self.n_components
        if self.init == "random":
            resp = torch.rand(n, k, generator=g, dtype=torch.float64).to(x)
            return resp / resp.sum(1, keepdim=True)
        if self.init == "random_from_data":
            labels = torch.randperm(n, generator=g)[:k].to(x.device)
            return torch.zeros(n, k, dtype=x.dtype, device=x.device).index_put_(
                (labels, torch.arange(k, device=x.device)), torch.ones((), dtype=x.dtype)
            )
        if self.init == "k-means++":  # like scikit-learn: only the seeds are assigned
            seeds = _kmeans_plusplus(x, k, g).to(x.device)
            return torch.zeros(n, k, dtype=x.dtype, device=x.device).index_put_(
                (seeds, torch.arange(k, device=x.device)), torch.ones((), dtype=x.dtype)
            )
        labels = _kmeans(x, k, g)
        return torch.nn.functional.one_hot(labels, k).to(x.dtype)

    def _initialize(self, source: _Source, x: Tensor, g: torch.Generator) -> None:
        """Parameters from one M-step on the initial responsibilities."""
        resp = self._initial_resp(x, g)
        self._centre_on(resp, x)
        stats = nk = None
        for start, feats in source.chunks():
            r = resp[start : start + feats.shape[0]].T
            if stats is None:
                stats, nk = self._sums(r, feats), r.sum(1)
            else:
                stats += self._sums(r, feats)
                nk += r.sum(1)
        self._m_step(stats, nk)

    def _fit(self, x, inits: dict) -> _Mixture:
        state = dict(self.__dict__)
        try:
            return self._fit_or_raise(x, inits)
        except BaseException:  # a failed fit leaves the estimator as it was
            self.__dict__.clear()
            self.__dict__.update(state)
            raise

    def _fit_or_raise(self, x, inits: dict) -> _Mixture:
        x = self._check_input(_as_float(x), fitting=True)
        inits = self._check_inits(inits, x)
        do_init = not (self.warm_start and self._fitted)
        if do_init:
            self._shift = x.mean(0)
        xc = self._prepare(x)
        source = _Source(self._features, xc, self._work_width(xc))
        g = self._generator()
        best = None
        for _ in range(self.n_init if do_init else 1):
            if do_init:
                if any(v is None for v in inits.values()):
                    self._initialize(source, xc, g)
                self._override(inits, x)
            start = -math.inf if do_init else self.lower_bound_
            history, converged, n_iter = self._em(source, x.shape[0], start)
            final = history[-1] if history else -math.inf
            if best is None or final > best[0]:
                best = (final, self._parameters(), history, converged, n_iter)
        final, params, history, converged, n_iter = best
        for name, value in params.items():
            setattr(self, name, value)
        self.lower_bound_, self.history_ = final, history
        self.converged_, self.n_iter_ = converged, n_iter
        return self

    def _check_inits(self, inits: dict, x: Tensor) -> dict:
        return inits

    def _override(self, inits: dict, x: Tensor) -> None:
        pass

    # -- prediction ------------------------------------------------------------------------------

    def joint_log_prob(self, x) -> Tensor:
        r""":math:`\log w_k + \log p(x_n \mid \theta_k)` for all points and components, (N, K)."""
        self._require_fitted()
        x = self._check_input(_as_float(x).to(self.weights_), fitting=False)
        source = _Source(self._features, self._prepare(x), self._work_width(x), cache=False)
        natural = self._natural()
        return torch.cat([self._joint(feats, natural).T for _, feats in source.chunks()])

    def score_samples(self, x) -> Tensor:
        r"""The log-density :math:`\log p(x_n)` of every point, shape ``(N,)``, in nats."""
        return torch.logsumexp(self.joint_log_prob(x), 1)

    def score(self, x) -> float:
        """The mean log-density of the points ``x`` (nats per point)."""
        return self.score_samples(x).mean().item()

    def predict(self, x) -> Tensor:
        """The most probable component of every point, shape ``(N,)``."""
        return self.joint_log_prob(x).argmax(1)

    def predict_proba(self, x) -> Tensor:
        """The responsibilities p(component k | x_n), shape ``(N, K)``; rows sum to 1."""
        return torch.softmax(self.joint_log_prob(x), 1)

    def _labels(
        self, n_samples: int, generator: torch.Generator | None
    ) -> tuple[Tensor, torch.Generator]:
        if not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
        g = generator if generator is not None else self._generator()
        z = torch.multinomial(self.weights_.cpu(), n_samples, replacement=True, generator=g)
        return z.to(self.weights_.device), g


# -- initialisation -----------------------------------------------------------------------------


def _nearest(x: Tensor, centers: Tensor) -> Tensor:
    """Index of the nearest row of ``centers`` for every row of ``x``."""
    d = (centers * centers).sum(1) - 2 * (x @ centers.T)
    return d.argmin(1)


def _kmeans_plusplus(x: Tensor, k: int, g: torch.Generator) -> Tensor:
    """Indices of k-means++ seeds (Arthur & Vassilvitskii 2007): each next one drawn with
    probability proportional to its squared distance from the nearest seed so far."""
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


# -- Gaussian mixture ---------------------------------------------------------------------------


def _quadratic_features(x: Tensor, out: Tensor) -> Tensor:
    """Writes the products x_i x_j (i <= j, row-major upper triangle) of every row into ``out``."""
    d, start = x.shape[1], 0
    for i in range(d):
        torch.mul(x[:, i : i + 1], x[:, i:], out=out[:, start : start + d - i])
        start += d - i
    return out


def _flip(a: Tensor) -> Tensor:
    return a.flip(-1, -2)


def _outer(v: Tensor) -> Tensor:
    """v v^T for every row of ``v``, (K, D) -> (K, D, D)."""
    return v.unsqueeze(-1) * v.unsqueeze(-2)


class GaussianMixture(_Mixture):
    r"""A mixture of Gaussians fitted by EM, with the interface of scikit-learn's.

    .. math:: p(x) = \sum_{k=1}^K w_k \, \mathcal{N}(x \mid \mu_k, \Sigma_k)

    Each iteration computes the responsibilities :math:`r_{nk} = p(k \mid x_n)` in log space
    (E-step) and the weighted means and covariances (M-step),

    .. math::
        N_k = \sum_n r_{nk}, \quad w_k = \frac{N_k}{N}, \quad
        \mu_k = \frac{1}{N_k} \sum_n r_{nk} x_n, \quad
        \Sigma_k = \frac{1}{N_k} \sum_n r_{nk} (x_n - \mu_k)(x_n - \mu_k)^\top + \epsilon I,

    with :math:`\epsilon` = ``reg_covar``, exactly as :class:`sklearn.mixture.GaussianMixture`
    (``tied``: one pooled :math:`\Sigma`; ``diag``: its diagonal; ``spherical``: the mean of that
    diagonal). Like scikit-learn, precisions are held as Cholesky factors
    :math:`\Sigma_k^{-1} = U_k U_k^\top` (``precisions_cholesky_``, upper triangular), which give
    :math:`\log \det \Sigma_k^{-1} = 2 \sum_i \log (U_k)_{ii}`.

    Speed: a Gaussian is an exponential family with sufficient statistics
    :math:`T(x) = (x, x_i x_j)_{i \le j}`, so the log-densities of all points under all
    components are one matrix product :math:`T(x) A` and the M-step sums are one product
    :math:`r^\top T(x)`; :math:`T` of the training set is computed once (if it fits in
    ``CACHE_BYTES``) and each iteration is a single pass over it in cache-sized chunks. The data
    are centred on their mean first. The expansion
    :math:`(x-\mu)^\top P (x-\mu) = x^\top P x - 2 x^\top P \mu + \mu^\top P \mu` rounds to
    about machine epsilon times the squared Mahalanobis distance of a point from the data mean:
    negligible in float64 (agreement with scikit-learn ~1e-13), but up to ~1e-4 relative in
    float32 for thin components far from the mean. So in float32, ``full`` and ``tied`` mixtures
    are computed per component as scikit-learn does -- :math:`\|(x - \mu_k) U_k\|^2` from one
    product :math:`x [U_1 \dots U_K]`, and the M-step's scatter about the current means with one
    batched product -- which keeps float32 as accurate as scikit-learn's float32 and still faster
    than its float64 (``benchmarks/em.py``); ``diag`` and ``spherical`` use the expansion in both
    dtypes.

    Data, parameters and computations share the device and dtype (float32 or float64) of the
    tensor passed to :meth:`fit`; later inputs are moved there.

    Arguments:
        n_components: K, the number of components.
        covariance_type: ``"full"`` (K, D, D), ``"tied"`` (D, D), ``"diag"`` (K, D) or
            ``"spherical"`` (K,) covariances.
        tol: Stop when the mean log-likelihood changes by less than this between iterations
            (0 runs exactly ``max_iter`` iterations).
        reg_covar: Added to the diagonal of every covariance, keeping it positive definite.
        max_iter: EM iterations per initialisation (0: the initial parameters are the fit).
        n_init: Initialisations to run; the one with the highest final log-likelihood is kept.
        init: Initial responsibilities: ``"kmeans"`` (labels of k-means), ``"k-means++"``
            (its seeds), ``"random"`` or ``"random_from_data"`` (one random point per component).
        seed: Seeds the initialisation and :meth:`sample` (None: fresh randomness).
        warm_start: A second :meth:`fit` continues from the current parameters.

    Attributes:
        weights_: Mixing weights, shape (K,).
        means_: Component means, shape (K, D).
        covariances_: Covariances, shaped by ``covariance_type`` as above.
        precisions_: Their inverses; ``precisions_cholesky_``: the factors ``U``.
        converged_: Whether the change fell below ``tol`` before ``max_iter``.
        n_iter_: Iterations run by the kept initialisation.
        history_: Mean log-likelihood (nats per point) of the parameters at the start of every
            iteration, i.e. scikit-learn's ``lower_bounds_``; EM never decreases it.
        lower_bound_: Its last value.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(1000, 2, generator=g, dtype=torch.float64)
        >>> x[:500] -= 4
        >>> x[500:] += 4
        >>> gm = GaussianMixture(2, seed=0).fit(x)
        >>> gm.means_[gm.means_[:, 0].argsort()].round()
        tensor([[-4., -4.],
                [ 4.,  4.]], dtype=torch.float64)
        >>> gm.converged_, gm.predict_proba(x[:1]).sum().item()
        (True, 1.0)

    References:
        Dempster, Laird & Rubin (1977), Maximum likelihood from incomplete data via the EM
        algorithm. Pedregosa et al. (2011), scikit-learn: ``sklearn/mixture/_gaussian_mixture.py``.
    """

    def __init__(
        self,
        n_components: int = 1,
        covariance_type: CovarianceType = "full",
        tol: float = 1e-3,
        reg_covar: float = 1e-6,
        max_iter: int = 100,
        n_init: int = 1,
        init: Init = "kmeans",
        seed: int | None = None,
        warm_start: bool = False,
    ):
        super().__init__(n_components, tol, max_iter, n_init, init, seed, warm_start)
        if covariance_type not in COVARIANCE_TYPES:
            raise ValueError(
                f"unknown covariance_type {covariance_type!r}; choose one of "
                f"{', '.join(COVARIANCE_TYPES)}"
            )
        if not isinstance(reg_covar, (int, float)) or not reg_covar >= 0:
            raise ValueError(f"reg_covar must be a non-negative number, got {reg_covar!r}")
        self.covariance_type, self.reg_covar = covariance_type, float(reg_covar)

    def fit(
        self,
        x,
        weights_init: Tensor | None = None,
        means_init: Tensor | None = None,
        precisions_init: Tensor | None = None,
    ) -> GaussianMixture:
        """Fits the mixture to the points ``x`` by EM; returns ``self``.

        Arguments:
            x: Points, shape (N, D) with N >= ``n_components``, finite.
            weights_init: Initial weights (K,), non-negative, summing to 1.
            means_init: Initial means (K, D).
            precisions_init: Initial precisions (inverse covariances): (K, D, D) ``full``,
                (D, D) ``tied``, (K, D) ``diag``, (K,) ``spherical``. Parameters not given are
                taken from ``init``, as in scikit-learn.
        """
        inits = {"weights": weights_init, "means": means_init, "precisions": precisions_init}
        return self._fit(x, inits)

    # -- checks ----------------------------------------------------------------------------------

    def _check_input(self, x: Tensor, fitting: bool) -> Tensor:
        if x.dim() != 2:
            fix = "x.unsqueeze(-1) for one feature" if x.dim() == 1 else "x.reshape(len(x), -1)"
            raise ValueError(
                f"x must have shape (N, D), got {tuple(x.shape)}; reshape it (e.g. {fix})"
            )
        return self._check_points(x, fitting, "features")

    def _check_inits(self, inits: dict, x: Tensor) -> dict:
        k, d = self.n_components, x.shape[1]
        out = {}
        for name, value in inits.items():
            if value is None:
                out[name] = None
                continue
            value = _as_float(value, f"{name}_init").to(x)
            if not torch.isfinite(value).all():
                raise ValueError(f"{name}_init contains NaN or infinite values")
            out[name] = value
        w, m, p = out["weights"], out["means"], out["precisions"]
        if w is not None:
            if w.shape != (k,):
                raise ValueError(f"weights_init must have shape ({k},), got {tuple(w.shape)}")
            if (w < 0).any() or abs(w.sum().item() - 1) > 1e-6:
                raise ValueError(
                    f"weights_init must be non-negative and sum to 1, got sum {w.sum().item():g}; "
                    f"divide by its sum"
                )
        if m is not None and m.shape != (k, d):
            raise ValueError(f"means_init must have shape ({k}, {d}), got {tuple(m.shape)}")
        if p is not None:
            shape = {"full": (k, d, d), "tied": (d, d), "diag": (k, d), "spherical": (k,)}
            expected = shape[self.covariance_type]
            if p.shape != expected:
                raise ValueError(
                    f"precisions_init must have shape {expected} for covariance_type="
                    f"{self.covariance_type!r}, got {tuple(p.shape)}"
                )
            if self.covariance_type in ("full", "tied"):
                tol = 1e-5 if p.dtype == torch.float32 else 1e-8
                if not torch.allclose(p, p.mT, rtol=tol, atol=tol):
                    raise ValueError("precisions_init must be symmetric")
            elif (p <= 0).any():
                raise ValueError("precisions_init must be positive")
        return out

    def _override(self, inits: dict, x: Tensor) -> None:
        """Replaces initial parameters by the ones given to fit (scikit-learn's order)."""
        if inits["weights"] is not None:
            self.weights_ = inits["weights"].clone()
        if inits["means"] is not None:
            self.means_ = inits["means"].clone()
        p = inits["precisions"]
        if p is None:
            return
        if self.covariance_type in ("full", "tied"):
            # P = U U^T with U upper triangular: the Cholesky factor of P with rows and columns
            # reversed, reversed back (scikit-learn's _compute_precision_cholesky_from_precisions)
            lower, info = torch.linalg.cholesky_ex(_flip(p))
            if (info != 0).any():
                raise ValueError("precisions_init must be positive definite")
            u = _flip(lower)
            eye = torch.eye(u.shape[-1], dtype=u.dtype, device=u.device)
            u_inv = torch.linalg.solve_triangular(u, eye, upper=True)
            self.precisions_cholesky_ = u
            self.precisions_ = p.clone()
            self.covariances_ = u_inv.mT @ u_inv
        else:
            self.precisions_cholesky_ = p.sqrt()
            self.precisions_ = p.clone()
            self.covariances_ = 1 / p

    # -- exponential-family form ------------------------------------------------------------------

    def _prepare(self, x: Tensor) -> Tensor:
        return x - self._shift

    def _centred(self, dtype: torch.dtype) -> bool:
        """float32 full/tied: per-component centring, as scikit-learn, not the expansion."""
        return self.covariance_type in ("full", "tied") and dtype == torch.float32

    def _work_width(self, x: Tensor) -> int | None:
        return self.n_components * x.shape[1] if self._centred(x.dtype) else None

    def _features(self, x: Tensor) -> Tensor:
        n, d = x.shape
        if self._centred(x.dtype):
            return x
        if self.covariance_type in ("full", "tied"):
            out = x.new_empty(n, d + d * (d + 1) // 2)
            out[:, :d] = x
            _quadratic_features(x, out[:, d:])
            return out
        if self.covariance_type == "diag":
            return torch.cat([x, x * x], 1)
        return torch.cat([x, (x * x).sum(1, keepdim=True)], 1)

    def _natural(self) -> tuple[Tensor, ...]:
        mu = self.means_ - self._shift
        k, d = mu.shape
        u = self.precisions_cholesky_
        if self._centred(mu.dtype):  # y = x U_k - mu_k U_k for all k in one product
            u = u.expand(k, d, d)
            log_det = u.diagonal(dim1=-2, dim2=-1).log().sum(-1)
            b = self.weights_.log() + log_det - 0.5 * d * LOG_2PI
            return u.transpose(0, 1).reshape(d, k * d), -(mu.unsqueeze(1) @ u).reshape(k * d), b
        if self.covariance_type in ("full", "tied"):
            u = u.expand(k, d, d)
            p = u @ u.mT
            pmu = (p @ mu.unsqueeze(-1)).squeeze(-1)
            rows, cols = torch.triu_indices(d, d, device=mu.device)
            quad = p[:, rows, cols] * torch.where(rows == cols, -0.5, -1.0).to(p.dtype)
            log_det = u.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        else:
            prec = u * u
            if self.covariance_type == "spherical":
                pmu, quad = mu * prec[:, None], -0.5 * prec[:, None]
                log_det = d * u.log()
            else:
                pmu, quad = mu * prec, -0.5 * prec
                log_det = u.log().sum(-1)
        b = self.weights_.log() - 0.5 * (mu * pmu).sum(-1) + log_det - 0.5 * d * LOG_2PI
        return torch.cat([pmu, quad], 1), b

    def _joint(self, feats: Tensor, natural: tuple[Tensor, ...]) -> Tensor:
        if not self._centred(feats.dtype):
            return super()._joint(feats, natural)
        u_all, offset, b = natural  # (D, K D), (K D,), (K,)
        k = b.shape[0]
        y = torch.addmm(offset, feats, u_all).square_()  # ((x - mu_k) U_k)^2, (n, K D)
        return b.unsqueeze(1) - 0.5 * y.view(feats.shape[0], k, -1).sum(-1).T

    def _sums(self, resp: Tensor, feats: Tensor) -> Tensor:
        if not self._centred(feats.dtype):
            return resp @ feats
        # sum_n r x and the scatter sum_n r (x - c_k)(x - c_k)^T about the current means c_k
        z = (feats.unsqueeze(0) - (self.means_ - self._shift).unsqueeze(1)) * resp.sqrt()[..., None]
        return torch.cat([resp @ feats, (z.mT @ z).flatten(1)], 1)

    def _centre_on(self, resp: Tensor, x: Tensor) -> None:
        if self._centred(x.dtype):  # the first scatter sums are taken about the weighted means
            nk_eps = resp.sum(0) + 10 * torch.finfo(x.dtype).eps
            self.means_ = (resp.T @ x) / nk_eps[:, None] + self._shift

    def _m_step(self, stats: Tensor, nk: Tensor) -> None:
        d = self._shift.shape[0]
        nk_eps = nk + 10 * torch.finfo(nk.dtype).eps  # as scikit-learn, no empty component
        mu = stats[:, :d] / nk_eps[:, None]
        centre = self.means_ - self._shift if self._centred(stats.dtype) else None
        self.weights_ = nk_eps / nk_eps.sum()
        self.means_ = mu + self._shift
        if self.covariance_type in ("full", "tied"):
            if centre is not None:  # from the scatter S about c: S - e d^T - d e^T + n_k d d^T
                scatter = stats[:, d:].reshape(-1, d, d)
                e = stats[:, :d] - nk[:, None] * centre  # sum_n r (x - c)
                delta = mu - centre
                cross = e.unsqueeze(-1) * delta.unsqueeze(-2)
                s = scatter - cross - cross.mT + nk[:, None, None] * _outer(delta)
                full = self.covariance_type == "full"
                cov = s / nk_eps[:, None, None] if full else s.sum(0) / nk_eps.sum()
            else:  # sum_n r (x - mu)(x - mu)^T / N_k = S / N_k - (2 - n_k / N_k) mu mu^T, with
                # N_k = n_k + 10 eps (scikit-learn's), from the uncentred moments S = sum_n r x x^T
                correction = 2 - nk / nk_eps
                rows, cols = torch.triu_indices(d, d, device=mu.device)
                s = stats.new_zeros(stats.shape[0], d, d)
                s[:, rows, cols] = stats[:, d:]
                s[:, cols, rows] = stats[:, d:]
                outer = _outer(mu)
                if self.covariance_type == "full":
                    cov = s / nk_eps[:, None, None] - correction[:, None, None] * outer
                else:  # pooled, as scikit-learn: (X^T X - sum_k N_k mu_k mu_k^T) / sum_k N_k
                    cov = (s.sum(0) - (nk_eps[:, None, None] * outer).sum(0)) / nk_eps.sum()
            cov.diagonal(dim1=-2, dim2=-1).add_(self.reg_covar)
            lower, info = torch.linalg.cholesky_ex(cov)
            if (info != 0).any():
                which = (
                    f"of component(s) {(info != 0).nonzero().flatten().tolist()}"
                    if info.dim()
                    else "(tied)"
                )
                raise ValueError(
                    f"the covariance {which} is singular even with reg_covar={self.reg_covar:g}; "
                    f"increase reg_covar (e.g. to 1e-3), use fewer components or scale the data"
                    + (", or fit in float64" if cov.dtype == torch.float32 else "")
                )
            eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
            u = torch.linalg.solve_triangular(lower, eye, upper=False).mT
            self.covariances_, self.precisions_cholesky_ = cov, u
            self.precisions_ = u @ u.mT
            return
        if self.covariance_type == "diag":  # scikit-learn's estimate: E_r[x^2] - mu^2
            var = stats[:, d:] / nk_eps[:, None] - mu * mu
        else:  # its mean over dimensions, from E_r[|x|^2]
            var = (stats[:, d] / nk_eps - (mu * mu).sum(1)) / d
        var = var + self.reg_covar
        if not (var > 0).all():
            raise ValueError(
                f"a component's variance is not positive even with reg_covar={self.reg_covar:g}; "
                f"increase reg_covar (e.g. to 1e-3), use fewer components or scale the data"
            )
        self.covariances_ = var
        self.precisions_cholesky_ = var.rsqrt()
        self.precisions_ = 1 / var

    def _parameters(self) -> dict[str, Tensor]:
        names = ("weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_")
        return {name: getattr(self, name) for name in names}

    # -- distribution and sampling ---------------------------------------------------------------

    def distribution(self) -> torch.distributions.MixtureSameFamily:
        """The fitted mixture as a :class:`torch.distributions.MixtureSameFamily`."""
        from torch.distributions import (
            Categorical,
            Independent,
            MixtureSameFamily,
            MultivariateNormal,
            Normal,
        )

        self._require_fitted()
        k, d = self.means_.shape
        if self.covariance_type in ("full", "tied"):
            cov = self.covariances_.expand(k, d, d)
            component = MultivariateNormal(self.means_, scale_tril=torch.linalg.cholesky(cov))
        else:
            scale = self.covariances_.sqrt()
            scale = scale[:, None].expand(k, d) if scale.dim() == 1 else scale
            component = Independent(Normal(self.means_, scale), 1)
        return MixtureSameFamily(Categorical(probs=self.weights_), component)

    def sample(
        self, n_samples: int = 1, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Draws ``n_samples`` points; returns them (n, D) and their components (n,).

        Draws come from ``generator`` (a CPU generator), else from one seeded with ``seed``.
        """
        self._require_fitted()
        z, g = self._labels(n_samples, generator)
        k, d = self.means_.shape
        eps = torch.randn(n_samples, d, generator=g, dtype=self.means_.dtype)
        eps = eps.to(self.means_.device)
        if self.covariance_type in ("full", "tied"):
            lower = torch.linalg.cholesky(self.covariances_.expand(k, d, d))
            noise = (lower[z] @ eps.unsqueeze(-1)).squeeze(-1)
        else:
            scale = self.covariances_.sqrt()
            noise = (scale[z, None] if scale.dim() == 1 else scale[z]) * eps
        return self.means_[z] + noise, z


# -- Bernoulli mixture --------------------------------------------------------------------------


class BernoulliMixture(_Mixture):
    r"""A mixture of products of Bernoullis for binary data (e.g. images), fitted by MAP-EM.

    .. math::
        p(x) = \sum_{k=1}^K w_k \prod_{d=1}^D \mu_{kd}^{x_d} (1 - \mu_{kd})^{1 - x_d},
        \qquad \mu_{kd} \sim \mathrm{Beta}(1 + \alpha, 1 + \alpha)

    The symmetric Beta prior on each pixel probability makes the M-step a MAP estimate that
    adds :math:`\alpha` pseudo-counts of ones and of zeros,

    .. math::
        \mu_k = \frac{\sum_n r_{nk} x_n + \alpha}{N_k + 2\alpha}, \qquad w_k = \frac{N_k}{N},

    so every probability lies strictly inside (0, 1) and a pixel never seen on in training
    does not give a test image probability 0. EM then never decreases the MAP objective
    :math:`[\sum_n \log p(x_n) + \log p(\mu)] / N`, which is what ``history_`` holds; :meth:`score`
    is the plain mean log-likelihood. Inputs of shape (N, ...) are flattened to (N, D).

    Arguments:
        n_components: K, the number of components.
        alpha: Pseudo-count of the Beta(1 + alpha, 1 + alpha) prior, > 0.
        tol: Stop when the objective changes by less than this (0: run ``max_iter``).
        max_iter: EM iterations per initialisation.
        n_init: Initialisations to run; the one with the highest final objective is kept.
        init: As for :class:`GaussianMixture`.
        seed: Seeds the initialisation and :meth:`sample`.
        warm_start: A second :meth:`fit` continues from the current parameters.

    Attributes:
        weights_: Mixing weights (K,). means_: Pixel probabilities (K, D).
        event_shape_: The shape of one input point (e.g. (1, 28, 28)), for pictures.
        history_, lower_bound_, converged_, n_iter_: As for :class:`GaussianMixture`, for the
            MAP objective.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> probs = torch.tensor([[0.9, 0.9, 0.1], [0.1, 0.1, 0.9]]).repeat_interleave(500, 0)
        >>> x = torch.bernoulli(probs, generator=g)
        >>> bm = BernoulliMixture(2, seed=0).fit(x)
        >>> bm.means_[bm.means_[:, 0].argsort()].round(decimals=1)
        tensor([[0.1000, 0.1000, 0.9000],
                [0.9000, 0.9000, 0.1000]])
    """

    def __init__(
        self,
        n_components: int = 1,
        alpha: float = 1.0,
        tol: float = 1e-3,
        max_iter: int = 100,
        n_init: int = 1,
        init: Init = "kmeans",
        seed: int | None = None,
        warm_start: bool = False,
    ):
        super().__init__(n_components, tol, max_iter, n_init, init, seed, warm_start)
        if not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ValueError(
                f"alpha must be positive (a pseudo-count that keeps probabilities off 0 and 1), "
                f"got {alpha!r}"
            )
        self.alpha = float(alpha)

    def fit(self, x, weights_init: Tensor | None = None, means_init: Tensor | None = None):
        """Fits the mixture to binary points ``x`` of shape (N, ...) by MAP-EM; returns ``self``.

        Arguments:
            x: Binary (0/1) points, N >= ``n_components``.
            weights_init: Initial weights (K,), non-negative, summing to 1.
            means_init: Initial pixel probabilities (K, D), strictly inside (0, 1).
        """
        x = _as_float(x)
        self._fit(x, {"weights": weights_init, "means": means_init})
        self.event_shape_ = tuple(x.shape[1:])
        return self

    def _check_input(self, x: Tensor, fitting: bool) -> Tensor:
        if x.dim() < 2:
            raise ValueError(
                f"x must have shape (N, D) or (N, ...) for N points, got {tuple(x.shape)}; "
                f"add the point dimension (e.g. x.unsqueeze(0) for one point)"
            )
        x = x.reshape(x.shape[0], -1)
        x = self._check_points(x, fitting, "values per point")
        if not ((x == 0) | (x == 1)).all():
            raise ValueError(
                "BernoulliMixture needs binary data (every value 0 or 1); binarize it first, "
                "e.g. torch.bernoulli(x) or the static MNIST binarization"
            )
        return x

    def _check_inits(self, inits: dict, x: Tensor) -> dict:
        k, d = self.n_components, x.shape[1]
        w, m = inits["weights"], inits["means"]
        if w is not None:
            w = _as_float(w, "weights_init").to(x)
            if w.shape != (k,) or (w < 0).any() or abs(w.sum().item() - 1) > 1e-6:
                raise ValueError(f"weights_init must be {k} non-negative numbers summing to 1")
        if m is not None:
            m = _as_float(m, "means_init").to(x)
            m = m.reshape(k, d) if m.numel() == k * d else m
            if m.shape != (k, d):
                raise ValueError(f"means_init must have shape ({k}, {d}), got {tuple(m.shape)}")
            if not ((m > 0) & (m < 1)).all():
                raise ValueError("means_init must lie strictly between 0 and 1")
        return {"weights": w, "means": m}

    def _override(self, inits: dict, x: Tensor) -> None:
        if inits["weights"] is not None:
            self.weights_ = inits["weights"].clone()
        if inits["means"] is not None:
            self.means_ = inits["means"].clone()

    def _features(self, x: Tensor) -> Tensor:
        return x

    def _natural(self) -> tuple[Tensor, Tensor]:
        mu = self.means_
        return torch.logit(mu), self.weights_.log() + torch.log1p(-mu).sum(1)

    def _m_step(self, stats: Tensor, nk: Tensor) -> None:
        nk_eps = nk + 10 * torch.finfo(nk.dtype).eps
        self.weights_ = nk_eps / nk_eps.sum()
        self.means_ = (stats + self.alpha) / (nk[:, None] + 2 * self.alpha)

    def _log_prior(self) -> float:
        a = self.alpha
        log_beta = 2 * math.lgamma(1 + a) - math.lgamma(2 + 2 * a)
        mu = self.means_
        total = a * (mu.log() + torch.log1p(-mu)).sum() - mu.numel() * log_beta
        return total.item()

    def _parameters(self) -> dict[str, Tensor]:
        return {"weights_": self.weights_, "means_": self.means_}

    def distribution(self) -> torch.distributions.MixtureSameFamily:
        """The fitted mixture over flattened points, as a ``MixtureSameFamily``."""
        from torch.distributions import Bernoulli, Categorical, Independent, MixtureSameFamily

        self._require_fitted()
        return MixtureSameFamily(
            Categorical(probs=self.weights_), Independent(Bernoulli(probs=self.means_), 1)
        )

    def sample(
        self, n_samples: int = 1, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Draws ``n_samples`` binary points (n, D) and their components (n,)."""
        self._require_fitted()
        z, g = self._labels(n_samples, generator)
        u = torch.rand(n_samples, self.means_.shape[1], generator=g, dtype=self.means_.dtype)
        return (u.to(self.means_.device) < self.means_[z]).to(self.means_.dtype), z


# -- runs from configuration --------------------------------------------------------------------


@dataclass(frozen=True)
class MixtureConfig:
    """A mixture and its EM settings, as the ``ppl-vae em`` command builds it."""

    components: int = 8  # K, the number of mixture components
    covariance: str = "full"  # Gaussian covariance type; ignored for binary data
    max_iter: int = 100  # EM iterations per initialisation
    tol: float = 1e-3  # stop when the mean log-likelihood changes by less (nats per point)
    reg_covar: float = 1e-6  # added to covariance diagonals; raise it if one turns singular
    n_init: int = 1  # initialisations; the best final log-likelihood wins
    init: str = "kmeans"  # initial responsibilities, one of INITS
    alpha: float = 1.0  # Beta(1 + alpha, 1 + alpha) prior pseudo-count of the Bernoulli mixture
    seed: int = 0  # seeds the initialisation
    dtype: str = "float64"  # "float64" or "float32": the precision EM runs in


def make_mixture(config: MixtureConfig, binary: bool) -> GaussianMixture | BernoulliMixture:
    """A Bernoulli mixture for binary data, a Gaussian mixture otherwise, from ``config``."""
    common = dict(
        tol=config.tol,
        max_iter=config.max_iter,
        n_init=config.n_init,
        init=config.init,
        seed=config.seed,
    )
    if binary:
        return BernoulliMixture(config.components, alpha=config.alpha, **common)
    return GaussianMixture(
        config.components, config.covariance, reg_covar=config.reg_covar, **common
    )


def em_run(
    data_config: DataConfig,
    config: MixtureConfig,
    out_dir: str | os.PathLike,
    device: str = "cpu",
) -> dict:
    """Fits a mixture to the training split and writes ``results.json`` and a picture.

    The output directory is created only after every input was checked and the fit succeeded,
    and files are written atomically, so bad input leaves nothing behind. Returns the record
    written to ``results.json`` (train/test mean log-likelihood in nats per point, iterations,
    convergence, settings and seconds).
    """
    from ppl_vae.train import make_output_dir, resolve_device, write_text_atomic

    dtypes = {"float64": torch.float64, "float32": torch.float32}
    if config.dtype not in dtypes:
        raise ValueError(f"unknown dtype {config.dtype!r}; choose float64 or float32")
    for binary in (False, True):  # check the settings before any data are read
        make_mixture(config, binary)
    dev = resolve_device(device)
    data = load_data(data_config, dev)
    mixture = make_mixture(config, data.is_binary)
    train = data.train.to(dtypes[config.dtype])
    test = data.test.to(dtypes[config.dtype])
    if isinstance(mixture, GaussianMixture):
        train, test = train.flatten(1), test.flatten(1)
    t0 = time.perf_counter()
    mixture.fit(train)
    seconds = time.perf_counter() - t0
    record = {
        "dataset": data.name,
        "mixture": type(mixture).__name__,
        "train_log_likelihood": mixture.score(train),
        "test_log_likelihood": mixture.score(test),
        "n_iter": mixture.n_iter_,
        "converged": mixture.converged_,
        "seconds": seconds,
        "num_train": train.shape[0],
        "num_test": test.shape[0],
        "device": str(dev),
        "settings": {"data": asdict(data_config), "mixture": asdict(config)},
        "history": mixture.history_,
    }
    out = make_output_dir(out_dir)
    from ppl_vae.plots import plot_mixture

    picture = plot_mixture(mixture, data, out / "mixture.png")
    record["picture"] = picture.name if picture is not None else None
    write_text_atomic(json.dumps(record, indent=1) + "\n", out / "results.json")
    return record


# TEMPORARY until the package split lands
from ppl_vae.registry import Registry  # noqa: E402

MIXTURES = Registry("mixture")
MIXTURES.register(
    "gaussian",
    GaussianMixture,
    options=(
        "n_components",
        "covariance_type",
        "tol",
        "reg_covar",
        "max_iter",
        "n_init",
        "init",
        "seed",
        "warm_start",
    ),
)
MIXTURES.register(
    "bernoulli",
    BernoulliMixture,
    options=("n_components", "alpha", "tol", "max_iter", "n_init", "init", "seed", "warm_start"),
)
