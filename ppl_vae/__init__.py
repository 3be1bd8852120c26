r"""Variational autoencoders written as Pyro probabilistic programs."""

import warnings
from importlib.metadata import PackageNotFoundError, version

from ppl_vae.compat import RENAMED
from ppl_vae.data import Data, DataConfig, load_data
from ppl_vae.guides import GUIDES, AmortizedGuide, FlowGuide, GaussianGuide, make_guide
from ppl_vae.importance import LogLikelihood, log_likelihood, log_likelihood_diagnostics
from ppl_vae.losses import IWAELoss, TraceELBO, TraceMeanFieldELBO
from ppl_vae.mixture import BernoulliMixture, GaussianMixture
from ppl_vae.model import LIKELIHOODS, VAEModel
from ppl_vae.networks import NetworkConfig
from ppl_vae.runs import EvaluateConfig, Run, evaluate_run, load_run, train_run
from ppl_vae.svi import TrainConfig, mean_elbo, train
from ppl_vae.vae import VAEConfig, build_vae

try:
    __version__ = version("ppl_vae")  # the one place it is written is pyproject.toml
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "GUIDES",
    "LIKELIHOODS",
    "AmortizedGuide",
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
    "build_vae",
    "evaluate_run",
    "load_data",
    "load_run",
    "log_likelihood",
    "log_likelihood_diagnostics",
    "make_guide",
    "mean_elbo",
    "train",
    "train_run",
]


def __getattr__(name: str):
    if name in RENAMED:  # ppl_vae.compat: names of 0.1
        new = RENAMED[name]
        warnings.warn(f"ppl_vae.{name} is now ppl_vae.{new}", DeprecationWarning, stacklevel=2)
        return globals()[new]
    raise AttributeError(f"module 'ppl_vae' has no attribute {name!r}")
