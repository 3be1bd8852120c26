"""Assembling a VAE from configuration: likelihood by the data, options by name."""

import pyro
import pytest
import torch

from ppl_vae.data import DataConfig, load_data
from ppl_vae.errors import InputError
from ppl_vae.guides import FlowGuide, GaussianGuide, LowRankGaussianGuide
from ppl_vae.model import BernoulliLikelihood, FixedGaussianLikelihood, LearnedGaussianLikelihood
from ppl_vae.networks import NetworkConfig
from ppl_vae.vae import VAEConfig, build_vae

SMALL = NetworkConfig(hidden=(8,))


def moons():
    return load_data(DataConfig("moons", num_train=50, num_test=20))


def binary():
    from ppl_vae.data import Data

    x = (torch.rand(40, 6) > 0.5).float()
    return Data(x[:30], x[30:], "static", "coins")


def test_the_likelihood_follows_the_data_unless_named():
    model, guide = build_vae(VAEConfig(latent_dim=2, network=SMALL), moons())
    assert isinstance(model.likelihood, LearnedGaussianLikelihood)
    assert isinstance(guide, GaussianGuide)
    model, _ = build_vae(VAEConfig(latent_dim=2, network=SMALL), binary())
    assert isinstance(model.likelihood, BernoulliLikelihood)
    config = VAEConfig(latent_dim=2, network=SMALL, likelihood="gaussian-fixed", sigma=0.3)
    model, _ = build_vae(config, moons())
    assert isinstance(model.likelihood, FixedGaussianLikelihood) and model.likelihood.sigma == 0.3


def test_guide_options_reach_the_guide_that_takes_them():
    _, guide = build_vae(VAEConfig(latent_dim=3, network=SMALL, guide="lowrank", rank=3), moons())
    assert isinstance(guide, LowRankGaussianGuide) and guide.rank == 3
    config = VAEConfig(latent_dim=2, network=SMALL, guide="iaf", flow_length=3, flow_hidden=5)
    _, guide = build_vae(config, moons())
    assert isinstance(guide, FlowGuide) and len(guide.steps) == 3


def test_the_model_and_guide_run_as_pyro_programs_with_matching_sites():
    data = moons()
    model, guide = build_vae(VAEConfig(latent_dim=2, network=SMALL, guide="planar"), data)
    loss = pyro.infer.Trace_ELBO().loss(model, guide, data.train[:10])
    assert torch.isfinite(torch.tensor(loss))


def test_a_sigma_for_the_bernoulli_likelihood_the_data_chose_is_an_error():
    with pytest.raises(InputError, match="--sigma does not apply to the likelihood 'bernoulli'"):
        build_vae(VAEConfig(latent_dim=2, network=SMALL, sigma=0.5), binary())
    with pytest.raises(InputError, match="needs binary data"):
        build_vae(VAEConfig(latent_dim=2, network=SMALL, likelihood="bernoulli"), moons())
