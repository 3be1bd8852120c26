r"""Gaussian and Bernoulli mixtures fitted by expectation-maximisation (EM), in PyTorch."""

from __future__ import annotations

from ppl_vae.mixture.base import INITS, ConvergenceWarning, _Mixture
from ppl_vae.mixture.bernoulli import BernoulliMixture
from ppl_vae.mixture.gaussian import COVARIANCE_TYPES, GaussianMixture
from ppl_vae.registry import Registry

__all__ = [
    "COVARIANCE_TYPES",
    "INITS",
    "MIXTURES",
    "BernoulliMixture",
    "ConvergenceWarning",
    "GaussianMixture",
]

MIXTURES: Registry[_Mixture] = Registry("mixture")
"""The mixtures by name; each factory is the class, which takes the declared options."""
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
        "verbose",
        "verbose_interval",
    ),
    help="Gaussian components, for continuous data",
)
MIXTURES.register(
    "bernoulli",
    BernoulliMixture,
    options=(
        "n_components",
        "alpha",
        "tol",
        "max_iter",
        "n_init",
        "init",
        "seed",
        "warm_start",
        "verbose",
        "verbose_interval",
    ),
    help="products of Bernoullis with a Beta prior (MAP), for binary data",
)
