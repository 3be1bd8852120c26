r"""A mixture of products of Bernoullis for binary data, fitted by MAP-EM, in PyTorch."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import Bernoulli, Categorical, Independent, MixtureSameFamily

from ppl_vae.errors import InputError
from ppl_vae.mixture.base import Mixture
from ppl_vae.mixture.checks import as_float, check_number

__all__ = ["BernoulliMixture"]


class BernoulliMixture(Mixture):
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
        verbose, verbose_interval: Progress lines, as for :class:`GaussianMixture`.

    The scikit-learn surface is :class:`GaussianMixture`'s: :meth:`fit_predict`,
    :meth:`bic` and :meth:`aic` (of the plain log-likelihood, with K D + K - 1 parameters),
    :meth:`get_params` and :meth:`set_params`, :class:`ConvergenceWarning`, ``NotFittedError``.

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

    _flat_means = True  # means_init may have the shape of the images, (K, ...)
    _what = "values per point"
    objective = "log-likelihood + log prior"

    def __init__(
        self,
        n_components: int = 1,
        alpha: float = 1.0,
        tol: float = 1e-3,
        max_iter: int = 100,
        n_init: int = 1,
        init: str = "kmeans",
        seed: int | None = None,
        warm_start: bool = False,
        verbose: int = 0,
        verbose_interval: int = 10,
    ):
        self.alpha = alpha
        super().__init__(
            n_components, tol, max_iter, n_init, init, seed, warm_start, verbose, verbose_interval
        )

    def _check_settings(self) -> None:
        why = " (a pseudo-count that keeps probabilities off 0 and 1)"
        check_number("alpha", self.alpha, positive=True, why=why)
        super()._check_settings()

    def fit(
        self,
        x,
        y=None,
        *,
        weights_init: Tensor | None = None,
        means_init: Tensor | None = None,
    ) -> BernoulliMixture:
        """Fits the mixture to binary points ``x`` of shape (N, ...) by MAP-EM; returns ``self``.

        Arguments:
            x: Binary (0/1) points, N >= 2 and N >= ``n_components``; integer and boolean
                input becomes float64.
            y: Ignored; there for scikit-learn's ``Pipeline.fit(X, y)`` and cross-validation.
            weights_init: Initial weights (K,), non-negative, summing to 1.
            means_init: Initial pixel probabilities (K, D), strictly inside (0, 1).
        """
        x = as_float(x)
        self._fit(x, {"weights": weights_init, "means": means_init})
        self.event_shape_ = tuple(x.shape[1:])
        return self

    def _check_input(self, x: Tensor, fitting: bool) -> Tensor:
        if x.dim() < 2:
            raise InputError(
                f"x must have shape (N, D) or (N, ...) for N points, got {tuple(x.shape)}; "
                f"add the point dimension (e.g. x.unsqueeze(0) for one point)"
            )
        x = self._check_points(x.flatten(1), fitting)
        if not ((x == 0) | (x == 1)).all():
            raise InputError(
                "BernoulliMixture needs binary data (every value 0 or 1); binarize it first, "
                "e.g. torch.bernoulli(x) or the static MNIST binarization"
            )
        return x

    def _check_inits(self, inits: dict, x: Tensor) -> dict:
        out = super()._check_inits(inits, x)
        m = out["means"]
        if m is not None and not ((m > 0) & (m < 1)).all():
            raise InputError("means_init must lie strictly between 0 and 1")
        return out

    def _statistics(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        return x

    def _natural(self) -> tuple[Tensor, Tensor]:
        mu = self.means_
        return torch.logit(mu), self.weights_.log() + torch.log1p(-mu).sum(1)

    def _m_step(self, stats: Tensor, nk: Tensor) -> None:
        nk_eps = nk + 10 * torch.finfo(nk.dtype).eps
        self.weights_ = nk_eps / nk_eps.sum()
        a = float(self.alpha)
        self.means_ = (stats + a) / (nk[:, None] + 2 * a)

    def _log_prior(self) -> float:
        a = float(self.alpha)
        log_beta = 2 * math.lgamma(1 + a) - math.lgamma(2 + 2 * a)
        mu = self.means_
        total = a * (mu.log() + torch.log1p(-mu)).sum() - mu.numel() * log_beta
        return total.item()

    def _parameters(self) -> dict[str, Tensor]:
        return {"weights_": self.weights_, "means_": self.means_}

    def _n_parameters(self) -> int:
        """K D pixel probabilities and K - 1 weights (the prior adds no free parameter)."""
        k, d = self.means_.shape
        return k * d + k - 1

    def distribution(self) -> torch.distributions.MixtureSameFamily:
        """The fitted mixture over flattened points, as a ``MixtureSameFamily``."""
        self._require_fitted("distribution")
        return MixtureSameFamily(
            Categorical(probs=self.weights_), Independent(Bernoulli(probs=self.means_), 1)
        )

    def sample(
        self, n_samples: int = 1, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Draws ``n_samples`` binary points (n, D) and their components (n,)."""
        self._require_fitted("sample")
        z, g = self._labels(n_samples, generator)
        u = torch.rand(n_samples, self.means_.shape[1], generator=g, dtype=self.means_.dtype)
        return (u.to(self.means_.device) < self.means_[z]).to(self.means_.dtype), z
