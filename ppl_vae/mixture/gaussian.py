r"""A Gaussian mixture fitted by EM, in PyTorch, with the interface of scikit-learn's."""

from __future__ import annotations

from collections.abc import Callable

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
from ppl_vae.mixture.covariances import COVARIANCE_TYPES, computation

__all__ = ["GaussianMixture"]


def _flip(a: Tensor) -> Tensor:
    return a.flip(-1, -2)


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
    :math:`r^\top T(x)`; each iteration is a single pass over the data in cache-sized chunks.
    :math:`T` of the training set is computed once and kept (if it fits in
    ``chunks.CACHE_BYTES``) for ``spherical``; ``full``, ``tied`` and ``diag`` make each chunk's
    into one work space kept for the pass, faster than reading a kept copy from memory.
    The data are centred on their mean first. The expansion
    :math:`(x-\mu)^\top P (x-\mu) = x^\top P x - 2 x^\top P \mu + \mu^\top P \mu` rounds to
    about machine epsilon times the squared Mahalanobis distance of a point from the data mean:
    negligible in float64, but not in float32 for thin components far from the mean. So in
    float32, ``full`` and ``tied`` mixtures are computed per component as scikit-learn does --
    :math:`\|(x - \mu_k) U_k\|^2` from one product :math:`x [U_1 \dots U_K]`, and the M-step's
    scatter about the current means with one batched product (or, once each point lies mostly
    in a few components, one product per component over the pairs whose responsibility is
    above :math:`\epsilon^2`); ``diag`` and ``spherical`` use the
    expansion in both dtypes. Each is one :class:`~ppl_vae.mixture.covariances.Computation`,
    chosen by covariance type and dtype when a fit starts. Speed and float32 accuracy against
    scikit-learn: see docs/BENCHMARKS.md (measured by ``benchmarks/em.py``); agreement with
    scikit-learn in float64 (and which is the more accurate far from the origin): see
    docs/RESULTS.md.

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

    # -- the E- and M-step: the computation chosen for the covariance type and dtype -------------

    def _start(self, x: Tensor) -> None:
        self._shift = self._rows.mean(x)
        self._computation = computation(self.covariance_type, x.dtype)

    def _prepare(self, x: Tensor) -> Tensor:
        return x - self._shift

    def _work_width(self, x: Tensor) -> int | None:
        return self._computation.work_width(self.n_components, x.shape[1])

    def _cache_statistics(self) -> bool:
        return self._computation.cache

    def _statistics(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        return self._computation.statistics(x, out)

    def _whole_pass(self, x: Tensor) -> Callable[..., tuple[Tensor, Tensor, float]] | None:
        return self._computation.whole_pass(x, self.n_components)

    def _natural(self) -> tuple[Tensor, ...]:
        mu = self.means_ - self._shift
        return self._computation.natural(self.weights_, mu, self.precisions_cholesky_)

    def _joint(
        self, stats: Tensor, natural: tuple[Tensor, ...], out: Tensor | None = None
    ) -> Tensor:
        return self._computation.joint(stats, natural, out)

    def _sums(self, resp: Tensor, stats: Tensor) -> Tensor:
        return self._computation.sums(resp, stats, self._centre)

    def _centre(self) -> Tensor:
        return self.means_ - self._shift

    def _centre_on(self, resp: Tensor, x: Tensor) -> None:
        if self._computation.centres_first:  # the first scatter is taken about weighted means
            reduce = self._rows.reduce
            nk_eps = reduce(resp.sum(0)) + 10 * torch.finfo(x.dtype).eps
            self.means_ = reduce(resp.T @ x) / nk_eps[:, None] + self._shift

    def _m_step(self, stats: Tensor, nk: Tensor) -> None:
        d = self._shift.shape[0]
        nk_eps = nk + 10 * torch.finfo(nk.dtype).eps  # as scikit-learn, no empty component
        mu = stats[:, :d] / nk_eps[:, None]
        cov = self._computation.covariance(stats, nk, nk_eps, mu, self._centre)
        self.weights_ = nk_eps / nk_eps.sum()
        self.means_ = mu + self._shift
        self.covariances_, self.precisions_cholesky_, self.precisions_ = (
            self._computation.precisions(cov, float(self.reg_covar))
        )

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
