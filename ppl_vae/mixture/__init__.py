r"""Gaussian and Bernoulli mixtures fitted by expectation-maximisation (EM), in PyTorch."""

from __future__ import annotations

import inspect

from ppl_vae.mixture.base import ConvergenceWarning, Mixture
from ppl_vae.mixture.bernoulli import BernoulliMixture
from ppl_vae.mixture.covariances import COVARIANCE_TYPES
from ppl_vae.mixture.gaussian import GaussianMixture
from ppl_vae.mixture.inits import INITS
from ppl_vae.registry import Registry

__all__ = [
    "COVARIANCE_TYPES",
    "INITS",
    "MIXTURES",
    "BernoulliMixture",
    "ConvergenceWarning",
    "GaussianMixture",
]

MIXTURES: Registry[Mixture] = Registry("mixture")
"""The mixtures by name; each factory is the class, which takes the declared options."""


def _arguments(cls) -> tuple[str, ...]:
    """The constructor's arguments: the options an estimator takes (as get_params lists them)."""
    return tuple(p for p in inspect.signature(cls).parameters if p != "self")


MIXTURES.register(
    "gaussian",
    GaussianMixture,
    options=_arguments(GaussianMixture),
    help="Gaussian components, for continuous data",
)
MIXTURES.register(
    "bernoulli",
    BernoulliMixture,
    options=_arguments(BernoulliMixture),
    help="products of Bernoullis with a Beta prior (MAP), for binary data",
)
