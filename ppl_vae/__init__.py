r"""Variational autoencoders written as Pyro probabilistic programs.

The public names below load on first use (:pep:`562`): ``import ppl_vae`` itself imports
neither torch nor Pyro, so that the ``ppl-vae`` command can answer Ctrl-C while they load.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what the table below loads, for type checkers (tests/test_package.py)
    from ppl_vae.ais import BDMC, AnnealedLogLikelihood, annealed_log_likelihood, bdmc
    from ppl_vae.basespace import in_base_space
    from ppl_vae.collapse import active_units, kl_per_dimension, mutual_information
    from ppl_vae.data import Data, DataConfig, load_data
    from ppl_vae.gaps import inference_gaps
    from ppl_vae.guides import GUIDES, AmortizedGuide, FlowGuide, GaussianGuide, make_guide
    from ppl_vae.importance import LogLikelihood, log_likelihood, log_likelihood_diagnostics
    from ppl_vae.losses import IWAELoss, TraceELBO, TraceMeanFieldELBO
    from ppl_vae.mixture import BernoulliMixture, GaussianMixture
    from ppl_vae.model import LIKELIHOODS, VAEModel
    from ppl_vae.networks import NetworkConfig
    from ppl_vae.psis import pareto_k
    from ppl_vae.runs import EvaluateConfig, Run, evaluate_run, load_run, train_run
    from ppl_vae.svi import TrainConfig, mean_elbo, train
    from ppl_vae.vae import VAEConfig, build_vae

try:
    __version__ = version("ppl_vae")  # the one place it is written is pyproject.toml
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "BDMC",
    "GUIDES",
    "LIKELIHOODS",
    "AmortizedGuide",
    "AnnealedLogLikelihood",
    "BernoulliMixture",
    "Data",
    "DataConfig",
    "EvaluateConfig",
    "FlowGuide",
    "GaussianGuide",
    "GaussianMixture",
    "IWAELoss",
    "LogLikelihood",
    "NetworkConfig",
    "Run",
    "TraceELBO",
    "TraceMeanFieldELBO",
    "TrainConfig",
    "VAEConfig",
    "VAEModel",
    "active_units",
    "annealed_log_likelihood",
    "bdmc",
    "build_vae",
    "evaluate_run",
    "in_base_space",
    "inference_gaps",
    "kl_per_dimension",
    "load_data",
    "load_run",
    "log_likelihood",
    "log_likelihood_diagnostics",
    "make_guide",
    "mean_elbo",
    "mutual_information",
    "pareto_k",
    "train",
    "train_run",
]

# the module that defines each public name
_HOME = {
    name: module
    for module, names in {
        "ais": ("BDMC", "AnnealedLogLikelihood", "annealed_log_likelihood", "bdmc"),
        "basespace": ("in_base_space",),
        "collapse": ("active_units", "kl_per_dimension", "mutual_information"),
        "data": ("Data", "DataConfig", "load_data"),
        "gaps": ("inference_gaps",),
        "guides": ("GUIDES", "AmortizedGuide", "FlowGuide", "GaussianGuide", "make_guide"),
        "importance": ("LogLikelihood", "log_likelihood", "log_likelihood_diagnostics"),
        "losses": ("IWAELoss", "TraceELBO", "TraceMeanFieldELBO"),
        "mixture": ("BernoulliMixture", "GaussianMixture"),
        "model": ("LIKELIHOODS", "VAEModel"),
        "networks": ("NetworkConfig",),
        "psis": ("pareto_k",),
        "runs": ("EvaluateConfig", "Run", "evaluate_run", "load_run", "train_run"),
        "svi": ("TrainConfig", "mean_elbo", "train"),
        "vae": ("VAEConfig", "build_vae"),
    }.items()
    for name in names
}


def __getattr__(name: str):
    """A public name, loaded from its module on first use (and kept); a submodule
    (``ppl_vae.runs``), as when the package imported them all; a name of 0.1, with a warning."""
    if name in _HOME:
        value = getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    elif not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}"):
        value = importlib.import_module(f"{__name__}.{name}")
    elif not name.startswith("__") and name in _renamed():  # ppl_vae.compat: names of 0.1
        new = _renamed()[name]
        warnings.warn(f"ppl_vae.{name} is now ppl_vae.{new}", DeprecationWarning, stacklevel=2)
        return __getattr__(new)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def _renamed() -> dict[str, str]:
    """ppl_vae.compat.RENAMED (old name -> new), loaded only for a name not found otherwise."""
    return importlib.import_module(f"{__name__}.compat").RENAMED
