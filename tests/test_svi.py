"""The SVI loop: convergence on a closed form, KL warm-up, settings, states and resume."""

import pytest
from helpers import Flatten, linear_gaussian_vae

from ppl_vae.guides import GaussianGuide
from ppl_vae.svi import TrainConfig, kl_weight, mean_elbo, train


def test_svi_drives_the_elbo_to_the_exact_log_likelihood_of_a_linear_gaussian_model():
    model, data, exact = linear_gaussian_vae()
    guide = GaussianGuide(Flatten(5), latent_dim=2)
    config = TrainConfig(epochs=60, batch_size=100, lr=2e-2, seed=0)
    train(model, guide, data, config, quiet=True)
    elbo = mean_elbo(model, guide, data, "test", batch_size=500, num_particles=100)
    log_px = exact.log_prob(data.test).mean().item()
    # The ELBO is a lower bound (up to Monte Carlo error, ~1e-3 here) and SVI closes the gap.
    assert -0.01 < log_px - elbo < 0.05, (log_px, elbo)


def test_kl_weight_rises_linearly_then_stays_at_beta():
    config = TrainConfig(beta=0.5, kl_warmup=4)
    assert [kl_weight(e, config) for e in range(1, 7)] == [0.125, 0.25, 0.375, 0.5, 0.5, 0.5]
    assert kl_weight(1, TrainConfig(beta=2.0)) == 2.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"epochs": 0}, "epochs must be a positive"),
        ({"batch_size": -1}, "batch_size must be a positive"),
        ({"lr": 0.0}, "learning rate must be positive"),
        ({"lr": float("nan")}, "learning rate must be positive"),
        ({"loss": "renyi"}, "unknown loss 'renyi'"),
    ],
)
def test_bad_training_settings_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_iwae_rejects_kl_warmup():
    with pytest.raises(ValueError, match="iwae loss has none"):
        TrainConfig(loss="iwae", num_particles=5, kl_warmup=3)
