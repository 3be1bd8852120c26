r"""Gaussian and Bernoulli mixtures fitted by expectation-maximisation (EM), in PyTorch.

The estimators subclass scikit-learn's ``BaseEstimator``, so they are loaded on first use
(module ``__getattr__`` below): the names of :data:`MIXTURES`, :data:`COVARIANCE_TYPES` and
:data:`INITS`, which ``ppl-vae``'s options are built from, cost no scikit-learn import, and
``ppl-vae train`` starts a second sooner.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ppl_vae.mixture.covariances import COVARIANCE_TYPES
from ppl_vae.mixture.inits import INITS
from ppl_vae.registry import Registry

if TYPE_CHECKING:
    from ppl_vae.mixture.base import ConvergenceWarning, Mixture
    from ppl_vae.mixture.bernoulli import BernoulliMixture
    from ppl_vae.mixture.gaussian import GaussianMixture

# loaded on first use: name -> (module, attribute)
_LAZY = {
    "BernoulliMixture": ("ppl_vae.mixture.bernoulli", "BernoulliMixture"),
    "ConvergenceWarning": ("ppl_vae.mixture.base", "ConvergenceWarning"),
    "GaussianMixture": ("ppl_vae.mixture.gaussian", "GaussianMixture"),
    "Mixture": ("ppl_vae.mixture.base", "Mixture"),
}

__all__ = [  # noqa: F822 (four of them made on first use)
    "COVARIANCE_TYPES",
    "INITS",
    "MIXTURES",
    "BernoulliMixture",
    "ConvergenceWarning",
    "GaussianMixture",
    "Mixture",
]


def __getattr__(name: str):
    if name in _LAZY:
        module, attribute = _LAZY[name]
        globals()[name] = value = getattr(importlib.import_module(module), attribute)
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


MIXTURES: Registry[Mixture] = Registry("mixture")
"""The mixtures by name; each factory makes the class, which takes the declared options (the
constructor's arguments, as ``get_params`` lists them; tests/test_mixture_api.py holds them
equal to the signatures)."""

LOOP = ("max_iter", "n_init", "init", "seed", "warm_start", "verbose", "verbose_interval")


def _factory(name: str):
    def make(**options) -> Mixture:
        return __getattr__(name)(**options)

    make.__name__ = make.__qualname__ = name
    return make


MIXTURES.register(
    "gaussian",
    _factory("GaussianMixture"),
    options=("n_components", "covariance_type", "tol", "reg_covar", *LOOP),
    help="Gaussian components, for continuous data",
)
MIXTURES.register(
    "bernoulli",
    _factory("BernoulliMixture"),
    options=("n_components", "alpha", "tol", *LOOP),
    help="products of Bernoullis with a Beta prior (MAP), for binary data",
)
