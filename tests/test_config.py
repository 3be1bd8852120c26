"""Configuration dataclasses: plain-data round trips, validation when built."""

import dataclasses
import json
import math
import re

import pytest

from ppl_vae.config import (
    check_memory,
    check_number,
    check_seed,
    device_memory,
    from_dict,
    to_dict,
)
from ppl_vae.data import DataConfig
from ppl_vae.errors import InputError
from ppl_vae.networks import NetworkConfig
from ppl_vae.runs import EvaluateConfig, MixtureConfig
from ppl_vae.svi import TrainConfig
from ppl_vae.vae import VAEConfig

CONFIGS = [
    DataConfig("moons", num_train=30),
    VAEConfig(latent_dim=3, network=NetworkConfig(hidden=(7, 5)), guide="iaf", flow_hidden=9),
    TrainConfig(epochs=3, loss="meanfield", beta=0.5),
    EvaluateConfig(num_samples=20, iwae_k=(1, 5)),
    MixtureConfig(n_components=3, covariance_type="diag"),
]


@pytest.mark.parametrize("config", CONFIGS, ids=[type(c).__name__ for c in CONFIGS])
def test_configurations_survive_json(config):
    plain = json.loads(json.dumps(to_dict(config)))
    assert from_dict(type(config), plain) == config


def test_nested_and_tuple_fields_are_rebuilt():
    vae = from_dict(
        VAEConfig, {"network": {"architecture": "mlp", "hidden": [4, 4]}, "latent_dim": 2}
    )
    assert vae.network == NetworkConfig(hidden=(4, 4)) and isinstance(vae.network.hidden, tuple)


def test_unknown_keys_are_an_error_that_lists_the_known_ones():
    with pytest.raises(InputError, match=r"unknown TrainConfig settings \['epoch'\]"):
        from_dict(TrainConfig, {"epoch": 3})


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: DataConfig(binarize="half"), "unknown binarization 'half'"),
        (lambda: DataConfig("cifar"), "unknown data set 'cifar'"),
        (lambda: DataConfig("moons", num_train=0), "num_train must be a positive integer"),
        (lambda: NetworkConfig("rnn"), "unknown network 'rnn'"),
        (lambda: NetworkConfig(hidden=(0,)), "hidden sizes must be positive"),
        (lambda: NetworkConfig("conv", hidden=(8,)), "--hidden does not apply to the network"),
        (lambda: VAEConfig(latent_dim=0), "latent_dim must be a positive integer"),
        (lambda: VAEConfig(guide="planar", rank=2), "--rank does not apply to the guide 'planar'"),
        (lambda: VAEConfig(likelihood="bernoulli", sigma=0.1), "--sigma does not apply"),
        (lambda: VAEConfig(sigma=-1.0), "sigma must be positive"),
        (lambda: TrainConfig(num_particles=0), "num_particles must be a positive integer"),
        (lambda: EvaluateConfig(num_samples=10, iwae_k=(20,)), "every --iwae-k must lie in"),
        (lambda: EvaluateConfig(split="valid"), "unknown split 'valid'"),
        (lambda: MixtureConfig(n_components=0), "n_components must be a positive integer"),
        (lambda: MixtureConfig(mixture="bernoulli", reg_covar=1e-3), "--reg-covar does not"),
        (lambda: MixtureConfig(mixture="gaussian", alpha=2.0), "--alpha does not apply"),
        (lambda: MixtureConfig(dtype="float16"), "unknown dtype 'float16'"),
    ],
)
def test_every_configuration_validates_itself_when_built(build, message):
    with pytest.raises(InputError, match=message):
        build()


def test_configurations_are_frozen_and_every_field_has_help():
    for config in CONFIGS + [NetworkConfig()]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            config.seed = 1  # type: ignore[misc]
        for f in dataclasses.fields(config):
            assert f.metadata.get("help"), (type(config).__name__, f.name)


def test_evaluate_defaults_report_the_iwae_bounds_that_fit_k():
    assert EvaluateConfig(num_samples=50).iwae_ks == (1, 10)
    assert EvaluateConfig(num_samples=5000).iwae_ks == (1, 10, 100)
    assert EvaluateConfig(num_samples=50, iwae_k=(2, 50)).iwae_ks == (2, 50)


# -- numbers checked where they enter ------------------------------------------------------------


@pytest.mark.parametrize("seed", [-1, 2**63, 2**64 + 1, 1.5, True, "3"])
def test_a_seed_out_of_range_or_not_an_integer_is_refused(seed):
    for build in (lambda: TrainConfig(seed=seed), lambda: DataConfig(seed=seed)):
        with pytest.raises(InputError, match=r"seed must be an integer in \[0, 2\*\*63\)"):
            build()
    assert check_seed("seed", 2**63 - 1) == 2**63 - 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr": math.inf}, "learning rate must be positive and finite, got inf; pass --lr"),
        ({"lr": True}, "learning rate must be positive and finite"),
        ({"beta": math.inf}, "beta must be a finite number >= 0, got inf; pass --beta 1"),
        ({"beta": math.nan}, "beta must be a finite number >= 0, got nan"),
        ({"beta": -0.5}, "beta must be a finite number >= 0"),
        ({"kl_warmup": 1.5}, "kl_warmup must be a whole number of epochs"),
    ],
)
def test_infinite_or_absurd_training_numbers_are_refused_with_their_own_message(kwargs, message):
    with pytest.raises(InputError, match=re.escape(message)):
        TrainConfig(**kwargs)


@pytest.mark.parametrize("sigma", [math.inf, 1e400])
def test_an_infinite_sigma_is_refused(sigma):
    with pytest.raises(InputError, match="sigma must be finite, got inf; pass --sigma"):
        VAEConfig(likelihood="gaussian", sigma=sigma)


def test_check_number_names_the_range_and_the_fix():
    assert check_number("w", 2) == 2.0
    with pytest.raises(InputError, match=r"w must be a finite number > 0 and <= 1, got 3; lower"):
        check_number("w", 3, high=1, hint="lower it")


def test_memory_bound_names_what_needs_how_much(monkeypatch):
    assert device_memory("cpu") > 2**20
    with pytest.raises(InputError, match=r"X needs about 2,000 GB of memory, more than the .* fix"):
        check_memory(2e12, "X", device="cpu", fix="fix")
    check_memory(1e6, "X", device="cpu", fix="fix")  # a megabyte fits
    monkeypatch.delattr("os.sysconf")
    assert device_memory("cpu") == 16 * 2**30
