"""Assembling a VAE from configuration: likelihood by the data, options by name."""

import math

import pyro
import pytest
import torch

from ppl_vae.data import Data, DataConfig, load_data
from ppl_vae.errors import InputError
from ppl_vae.guides import FlowGuide, GaussianGuide, LowRankGaussianGuide
from ppl_vae.model import (
    BernoulliLikelihood,
    FixedGaussianLikelihood,
    HeteroscedasticGaussianLikelihood,
    LearnedGaussianLikelihood,
)
from ppl_vae.networks import NetworkConfig
from ppl_vae.vae import VAEConfig, build_vae, vae_size

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


@pytest.mark.parametrize(
    "config, names",
    [
        (VAEConfig(network=NetworkConfig(hidden=(100000, 100000))), "--hidden 100000,100000"),
        (VAEConfig(latent_dim=1_000_000_000), "--latent-dim 1000000000"),
        (VAEConfig(guide="fullrank", latent_dim=100_000), "--guide fullrank, --latent-dim 100000"),
        (
            VAEConfig(guide="planar", latent_dim=100_000, flow_length=1000),
            "--guide planar, --latent-dim 100000, --flow-length 1000",
        ),
    ],
)
def test_a_vae_too_large_to_train_is_refused_before_allocating(config, names):
    data = Data(torch.rand(4, 784), torch.rand(2, 784), "continuous")
    with pytest.raises(InputError, match=r"needs about [\d,.]+ GB of memory, more than") as e:
        build_vae(config, data)
    assert names in str(e.value) and "choose smaller sizes" in str(e.value)


def test_vae_size_matches_the_built_vae():
    data = Data(torch.rand(4, 5), torch.rand(2, 5), "continuous")
    config = VAEConfig(latent_dim=3, guide="iaf", flow_length=2)
    model, guide = build_vae(config, data)
    sizes = vae_size(config, (5,), "gaussian")
    built = sum(t.numel() for m in (model, guide) for t in (*m.parameters(), *m.buffers()))
    assert sum(sizes.values()) - built == -1  # the model's dtype buffer, a single number


def test_the_heteroscedastic_likelihood_trains_on_a_tiny_2d_run():
    """Finite losses, and the ELBO improves: the decoder's two outputs reach mean and sigma."""
    from ppl_vae.svi import TrainConfig, train

    pyro.set_rng_seed(0)
    data = load_data(DataConfig("moons", num_train=500, num_test=200))
    config = VAEConfig(
        latent_dim=2, network=NetworkConfig(hidden=(32,)), likelihood="gaussian-hetero",
        sigma_floor=0.01,
    )  # fmt: skip
    model, guide = build_vae(config, data)
    assert isinstance(model.likelihood, HeteroscedasticGaussianLikelihood)
    assert model.likelihood.sigma_floor == 0.01 and model.decoder.event_shape == (2, 2)
    metrics = train(model, guide, data, TrainConfig(epochs=8, batch_size=50), quiet=True)
    elbos = [m["test_elbo"] for m in metrics]
    assert all(math.isfinite(m["train_elbo"]) for m in metrics)
    assert all(math.isfinite(e) for e in elbos)
    assert elbos[-1] > elbos[0] + 0.3, elbos


def test_sigma_is_not_an_option_of_the_heteroscedastic_likelihood():
    with pytest.raises(InputError, match="--sigma does not apply to the likelihood 'gaussian-het"):
        VAEConfig(likelihood="gaussian-hetero", sigma=0.1)
    with pytest.raises(InputError, match="--sigma-floor does not apply to the likelihood 'gauss"):
        VAEConfig(likelihood="gaussian", sigma_floor=0.1)
    with pytest.raises(InputError, match="sigma_floor must be positive"):
        VAEConfig(likelihood="gaussian-hetero", sigma_floor=0.0)
