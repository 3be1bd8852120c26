r"""A Gaussian mixture fitted by EM, in PyTorch, with the interface of scikit-learn's."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import (
    Categorical,
    Independent,
    MixtureSameFamily,
    MultivariateNormal,
    Normal,
)

from ppl_vae.errors import InputError
from ppl_vae.mixture.base import Mixture
from ppl_vae.mixture.checks import check_number
from ppl_vae.registry import Registry

__all__ = ["COVARIANCE_TYPES", "LOG_2PI", "GaussianMixture"]

LOG_2PI = math.log(2 * math.pi)

COVARIANCE_TYPES: Registry[tuple[int, ...]] = Registry("covariance type")
"""The covariance types; each factory maps (K, D) to the shape of the precisions."""
COVARIANCE_TYPES.register("full", lambda k, d: (k, d, d), help="one (D, D) covariance each")
COVARIANCE_TYPES.register("tied", lambda k, d: (d, d), help="one (D, D) covariance shared by all")
COVARIANCE_TYPES.register("diag", lambda k, d: (k, d), help="one diagonal covariance each")
COVARIANCE_TYPES.register("spherical", lambda k, d: (k,), help="one variance each")


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


class GaussianMixture(Mixture):
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

    Computation: a Gaussian is an exponential family with sufficient statistics
    :math:`T(x) = (x, x_i x_j)_{i \le j}`, so the log-densities of all points under all
    components are one matrix product :math:`T(x) A` and the M-step sums are one product
    :math:`r^\top T(x)`; :math:`T` of the training set is computed once (if it fits in
    ``chunks.CACHE_BYTES``) and each iteration is a single pass over it in cache-sized chunks.
    The data are centred on their mean first. The expansion
    :math:`(x-\mu)^\top P (x-\mu) = x^\top P x - 2 x^\top P \mu + \mu^\top P \mu` rounds to
    about machine epsilon times the squared Mahalanobis distance of a point from the data mean:
    negligible in float64, but not in float32 for thin components far from the mean. So in
    float32, ``full`` and ``tied`` mixtures are computed per component as scikit-learn does --
    :math:`\|(x - \mu_k) U_k\|^2` from one product :math:`x [U_1 \dots U_K]`, and the M-step's
    scatter about the current means with one batched product; ``diag`` and ``spherical`` use the
    expansion in both dtypes. Speed and float32 accuracy against scikit-learn: see
    docs/BENCHMARKS.md (measured by ``benchmarks/em.py``); agreement with scikit-learn in float64
    (and which is the more accurate far from the origin): see docs/RESULTS.md.

    Data, parameters and computations share the device and dtype (float32 or float64) of the
    tensor passed to :meth:`fit`; later inputs are moved there.

    Arguments:
        n_components: K, the number of components.
        covariance_type: One of :data:`COVARIANCE_TYPES`: ``"full"`` (K, D, D), ``"tied"``
            (D, D), ``"diag"`` (K, D) or ``"spherical"`` (K,) covariances.
        tol: Stop when the mean log-likelihood changes by less than this between iterations
            (0 runs exactly ``max_iter`` iterations).
        reg_covar: Added to the diagonal of every covariance, keeping it positive definite.
        max_iter: EM iterations per initialisation (0: the initial parameters are the fit).
        n_init: Initialisations to run; the one with the highest final log-likelihood is kept.
        init: Initial responsibilities, one of :data:`~ppl_vae.mixture.INITS`:
            ``"kmeans"`` (labels of k-means), ``"k-means++"``
            (its seeds), ``"random"`` or ``"random_from_data"`` (one random point per component).
        seed: Seeds the initialisation and :meth:`sample` (None: fresh randomness).
        warm_start: A second :meth:`fit` continues from the current parameters (one
            initialisation, on points with the fitted D, in the fitted dtype and device).
        verbose: 0 prints nothing; 1 prints a line per initialisation and every
            ``verbose_interval`` iterations; 2 adds times and the change of the lower bound.
        verbose_interval: Iterations between progress lines.

    A scikit-learn estimator (``sklearn.base.BaseEstimator`` and ``DensityMixin``): its tags,
    ``get_params``/``set_params``, ``clone``, the HTML repr, ``check_is_fitted``, ``Pipeline``,
    ``GridSearchCV`` and ``cross_val_score`` work as for scikit-learn's mixture. The arguments
    are kept as given and checked on construction, by :meth:`set_params` and by :meth:`fit`. A
    fit that ends at ``max_iter`` (> 0) without converging warns with scikit-learn's
    ``ConvergenceWarning`` (re-exported as :class:`~ppl_vae.mixture.ConvergenceWarning`).
    Methods that need a fit raise :class:`~ppl_vae.errors.NotFittedError` before one. Points
    may be tensors, arrays or lists: float32 and float64 keep their dtype, integers, bools and
    lists become float64 (scikit-learn's rule); complex input is refused.

    Attributes:
        weights_: Mixing weights, shape (K,).
        means_: Component means, shape (K, D).
        covariances_: Covariances, shaped by ``covariance_type`` as above.
        precisions_: Their inverses; ``precisions_cholesky_``: the factors ``U``.
        converged_: Whether the change fell below ``tol`` before ``max_iter``.
        n_iter_: Iterations run by the kept initialisation.
        history_: Mean log-likelihood (nats per point) of the parameters at the start of every
            iteration, i.e. scikit-learn's ``lower_bounds_`` (also set under that name); EM
            never decreases it.
        lower_bound_: Its last value.
        n_features_in_: D, the number of features seen by :meth:`fit`.

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

    _fix = "raise max_iter or tol, or reg_covar if a component is degenerate"

    def __init__(
        self,
        n_components: int = 1,
        covariance_type: str = "full",
        tol: float = 1e-3,
        reg_covar: float = 1e-6,
        max_iter: int = 100,
        n_init: int = 1,
        init: str = "kmeans",
        seed: int | None = None,
        warm_start: bool = False,
        verbose: int = 0,
        verbose_interval: int = 10,
    ):
        self.covariance_type, self.reg_covar = covariance_type, reg_covar
        super().__init__(
            n_components, tol, max_iter, n_init, init, seed, warm_start, verbose, verbose_interval
        )

    def _check_settings(self) -> None:
        super()._check_settings()
        COVARIANCE_TYPES.check(self.covariance_type)
        check_number("reg_covar", self.reg_covar)

    def fit(
        self,
        x,
        y=None,
        *,
        weights_init: Tensor | None = None,
        means_init: Tensor | None = None,
        precisions_init: Tensor | None = None,
    ) -> GaussianMixture:
        """Fits the mixture to the points ``x`` by EM; returns ``self``.

        Arguments:
            x: Points, shape (N, D) with N >= 2 and N >= ``n_components``, finite; a tensor,
                array or list (float32 and float64 keep their dtype, others become float64).
            y: Ignored; there for scikit-learn's ``Pipeline.fit(X, y)`` and cross-validation.
            weights_init: Initial weights (K,), non-negative, summing to 1.
            means_init: Initial means (K, D).
            precisions_init: Initial precisions (inverse covariances): (K, D, D) ``full``,
                (D, D) ``tied``, (K, D) ``diag``, (K,) ``spherical``. Parameters not given are
                taken from ``init``, as in scikit-learn. The starting parameters are keywords
                only: the second positional argument is ``y``, as scikit-learn's.
        """
        inits = {"weights": weights_init, "means": means_init, "precisions": precisions_init}
        return self._fit(x, inits)

    # -- checks ----------------------------------------------------------------------------------

    def _check_input(self, x: Tensor, fitting: bool) -> Tensor:
        if x.dim() != 2:
            fix = "x.unsqueeze(-1) for one feature" if x.dim() == 1 else "x.reshape(len(x), -1)"
            raise InputError(
                f"x must have shape (N, D), got {tuple(x.shape)}; reshape it (e.g. {fix})"
            )
        return self._check_points(x, fitting)

    def _check_inits(self, inits: dict, x: Tensor) -> dict:
        out = super()._check_inits(inits, x)
        p = out["precisions"]
        if p is not None:
            expected = COVARIANCE_TYPES[self.covariance_type].factory(self.n_components, x.shape[1])
            if p.shape != expected:
                raise InputError(
                    f"precisions_init must have shape {expected} for covariance_type="
                    f"{self.covariance_type!r}, got {tuple(p.shape)}"
                )
            if self.covariance_type in ("full", "tied"):
                tol = 1e-5 if p.dtype == torch.float32 else 1e-8
                if not torch.allclose(p, p.mT, rtol=tol, atol=tol):
                    raise InputError("precisions_init must be symmetric")
            elif (p <= 0).any():
                raise InputError("precisions_init must be positive")
        return out

    def _override(self, inits: dict, x: Tensor) -> None:
        """Replaces initial parameters by the ones given to fit (scikit-learn's order)."""
        super()._override(inits, x)
        p = inits["precisions"]
        if p is None:
            return
        if self.covariance_type in ("full", "tied"):
            # P = U U^T with U upper triangular: the Cholesky factor of P with rows and columns
            # reversed, reversed back (scikit-learn's _compute_precision_cholesky_from_precisions)
            lower, info = torch.linalg.cholesky_ex(_flip(p))
            if (info != 0).any():
                raise InputError("precisions_init must be positive definite")
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
            reduce = self._rows.reduce
            nk_eps = reduce(resp.sum(0)) + 10 * torch.finfo(x.dtype).eps
            self.means_ = reduce(resp.T @ x) / nk_eps[:, None] + self._shift

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
            cov.diagonal(dim1=-2, dim2=-1).add_(float(self.reg_covar))
            lower, info = torch.linalg.cholesky_ex(cov)
            if (info != 0).any():
                which = (
                    f"of component(s) {(info != 0).nonzero().flatten().tolist()}"
                    if info.dim()
                    else "(tied)"
                )
                raise InputError(
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
        var = var + float(self.reg_covar)
        if not (var > 0).all():
            raise InputError(
                f"a component's variance is not positive even with reg_covar={self.reg_covar:g}; "
                f"increase reg_covar (e.g. to 1e-3), use fewer components or scale the data"
            )
        self.covariances_ = var
        self.precisions_cholesky_ = var.rsqrt()
        self.precisions_ = 1 / var

    def _parameters(self) -> dict[str, Tensor]:
        names = ("weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_")
        return {name: getattr(self, name) for name in names}

    def _n_parameters(self) -> int:
        """Covariance, mean and K - 1 weight parameters, counted as scikit-learn counts them."""
        k, d = self.means_.shape
        covariance = {"full": k * d * (d + 1) // 2, "tied": d * (d + 1) // 2, "diag": k * d}
        return covariance.get(self.covariance_type, k) + k * d + k - 1

    # -- distribution and sampling ---------------------------------------------------------------

    def distribution(self) -> torch.distributions.MixtureSameFamily:
        """The fitted mixture as a :class:`torch.distributions.MixtureSameFamily`."""
        self._require_fitted("distribution")
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
        self._require_fitted("sample")
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
