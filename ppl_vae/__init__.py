r"""Variational autoencoders written as Pyro probabilistic programs."""

from ppl_vae.data import Data, DataConfig, load_data
from ppl_vae.evaluate import LogLikelihood, log_likelihood
from ppl_vae.guides import GUIDES, AmortizedGuide, FlowGuide, GaussianGuide, make_guide
from ppl_vae.model import LIKELIHOODS, VAEModel
from ppl_vae.networks import NetworkConfig
from ppl_vae.train import TrainConfig, evaluate_elbo, train
from ppl_vae.vae import VAEConfig, build_vae, evaluate_run, load_run, train_run

__all__ = [
    "GUIDES",
    "LIKELIHOODS",
    "AmortizedGuide",
    "Data",
    "DataConfig",
    "FlowGuide",
    "GaussianGuide",
    "LogLikelihood",
    "NetworkConfig",
    "TrainConfig",
    "VAEConfig",
    "VAEModel",
    "build_vae",
    "evaluate_elbo",
    "evaluate_run",
    "load_data",
    "load_run",
    "log_likelihood",
    "make_guide",
    "train",
    "train_run",
]

__version__ = "0.1.0"
