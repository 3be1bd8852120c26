"""The SVI loop: convergence on a closed form, KL warm-up, settings, states and resume."""

import dataclasses
import math

import pyro
import pytest
import torch
from helpers import Flatten, linear_gaussian_vae

from ppl_vae.data import Data, DataConfig, load_data
from ppl_vae.errors import InputError
from ppl_vae.guides import GaussianGuide
from ppl_vae.networks import NetworkConfig
from ppl_vae.svi import (
    ReseededStreamWarning,
    TrainConfig,
    init_state,
    kl_weight,
    mean_elbo,
    run_epoch,
    snapshot,
    train,
)
from ppl_vae.vae import VAEConfig, build_vae


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


def test_kl_delay_holds_the_weight_at_zero_then_the_warm_up_rises_from_zero():
    config = TrainConfig(beta=0.5, kl_warmup=4, kl_delay=2)
    weights = [kl_weight(e, config) for e in range(1, 9)]
    assert weights == [0.0, 0.0, 0.125, 0.25, 0.375, 0.5, 0.5, 0.5]
    assert [kl_weight(e, TrainConfig(kl_delay=1)) for e in (1, 2)] == [0.0, 1.0]


@pytest.mark.parametrize("capture", [False, True])
def test_the_step_loss_at_kl_weight_zero_is_the_reconstruction_term_alone(capture):
    """The loss is R + w K (R = -log p(x|z), K = log q - log p at the same draw), so at the
    same draws L(0) = 2 L(1/2) - L(1); pyro.poutine.scale refuses a scale of 0, ours may not.
    The prior's parameters (a learned mixture) get no gradient at weight 0."""
    from ppl_vae.svi import StepLosses, collect_params

    torch.manual_seed(0)
    data = load_data(DataConfig("pinwheel", num_train=200, num_test=50))
    vae = VAEConfig(latent_dim=2, prior="mog", network=NetworkConfig(hidden=(8,)))
    model, guide = build_vae(vae, data)
    x = data.train[:50]
    params = collect_params(model, guide, x)
    losses = StepLosses(model, guide, params, config=TrainConfig(loss="elbo", capture=capture))

    def at(weight):
        pyro.set_rng_seed(3)
        return losses(weight)(x, num_data=200)

    l0, half, one = at(0.0), at(0.5), at(1.0)
    assert torch.allclose(l0, 2 * half - one, rtol=1e-5, atol=1e-4), (l0, half, one)
    assert abs((one - l0).item()) > 1.0  # the KL term is there at weight 1
    prior = [p for n, p in params.items() if "prior" in n]
    assert prior
    for p in params.values():
        p.grad = None
    at(0.0).backward()
    assert all(p.grad is None or not p.grad.any() for p in prior)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"epochs": 0}, "epochs must be a positive"),
        ({"kl_delay": -1}, "kl_delay must be >= 0"),
        ({"kl_delay": 1.5}, "kl_delay must be a whole number"),
        ({"batch_size": -1}, "batch_size must be a positive"),
        ({"lr": 0.0}, "learning rate must be positive"),
        ({"lr": float("nan")}, "learning rate must be positive"),
        ({"loss": "renyi"}, "unknown loss 'renyi'"),
    ],
)
def test_bad_training_settings_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [{"kl_warmup": 3}, {"kl_delay": 2}])
def test_iwae_rejects_kl_warmup_and_delay(kwargs):
    with pytest.raises(ValueError, match="iwae loss has none"):
        TrainConfig(loss="iwae", num_particles=5, **kwargs)


def test_training_with_a_kl_delay_records_the_weights_and_resumes_exactly():
    config = TrainConfig(epochs=4, kl_delay=1, kl_warmup=2)
    straight = train(*small_problem(), config, quiet=True)
    assert [m["kl_weight"] for m in straight] == [0.0, 0.5, 1.0, 1.0]
    states = []
    short = TrainConfig(epochs=1, kl_delay=1, kl_warmup=2)
    train(*small_problem(), short, checkpoint=states.append, quiet=True)
    resumed = train(*small_problem(), config, resume_from=states[-1], quiet=True)
    assert numbers(resumed) == numbers(straight)


def small_problem():
    torch.manual_seed(0)  # the same initial parameters each time
    data = load_data(DataConfig("pinwheel", num_train=400, num_test=100))
    model, guide = build_vae(VAEConfig(latent_dim=2, network=NetworkConfig(hidden=(8,))), data)
    return model, guide, data


def test_train_writes_no_files_and_hands_each_epochs_state_to_the_callback(tmp_path, monkeypatch):
    model, guide, data = small_problem()
    monkeypatch.chdir(tmp_path)
    states = []
    metrics = train(model, guide, data, TrainConfig(epochs=3), checkpoint=states.append)
    assert [s.epoch for s in states] == [1, 2, 3] and states[-1].metrics == metrics
    assert all(v.device.type == "cpu" for v in states[-1].params.values())
    assert not any(tmp_path.iterdir())
    # each state is its own copy: later epochs did not change the first one's numbers
    first, last = states[0], states[-1]
    name = next(iter(first.params))
    assert not torch.equal(first.params[name], last.params[name])
    adam = [s["exp_avg"] for s in (first.optimizer["state"][0], last.optimizer["state"][0])]
    assert not torch.equal(*adam)


def test_resuming_from_a_state_gives_the_numbers_of_an_uninterrupted_run():
    config = TrainConfig(epochs=4, kl_warmup=2)
    straight = train(*small_problem(), config)
    states = []
    train(*small_problem(), TrainConfig(epochs=2, kl_warmup=2), checkpoint=states.append)
    resumed = train(*small_problem(), config, resume_from=states[-1])
    assert numbers(resumed) == numbers(straight)


def numbers(history):
    return [{k: v for k, v in m.items() if k != "seconds"} for m in history]


def test_the_loop_by_hand_is_train():
    config = TrainConfig(epochs=3, kl_warmup=2)
    straight = train(*small_problem(), config, quiet=True)
    model, guide, data = small_problem()
    state = init_state(model, guide, data, config)
    first = [run_epoch(state, data, config, quiet=True) for _ in range(2)]
    saved = snapshot(state)
    assert saved.epoch == 2 and saved.metrics == first == state.metrics
    state = init_state(model, guide, data, config, resume_from=saved)
    last = run_epoch(state, data, config, quiet=True)
    assert numbers([*first, last]) == numbers(straight)


def test_a_data_stream_saved_on_another_device_is_reseeded_with_a_warning():
    """What a CUDA checkpoint resumed on a CPU meets (its Philox state is 16 bytes): the global
    streams and parameters continue, the data stream starts afresh from --seed and the epoch."""
    config = TrainConfig(epochs=3)
    states = []
    train(*small_problem(), TrainConfig(epochs=2), checkpoint=states.append, quiet=True)
    state = dataclasses.replace(states[-1])
    state.rng = {**state.rng, "data": torch.zeros(16, dtype=torch.uint8), "data_device": "cuda"}
    said = "data stream was saved on cuda and cannot continue on cpu"
    with pytest.warns(ReseededStreamWarning, match=said) as caught:
        first = train(*small_problem(), config, resume_from=state)
    assert [w.filename for w in caught] == [__file__]  # where train was called
    with pytest.warns(ReseededStreamWarning):  # quiet hides progress, not warnings
        again = train(*small_problem(), config, resume_from=state, quiet=True)
    assert [m["test_elbo"] for m in first] == [m["test_elbo"] for m in again]  # reproducible
    exact = train(*small_problem(), config, resume_from=states[-1], quiet=True)
    assert [m["test_elbo"] for m in first[:2]] == [m["test_elbo"] for m in exact[:2]]
    assert first[2]["test_elbo"] != exact[2]["test_elbo"]  # another batch order in epoch 3


def test_a_nan_loss_raises_floating_point_error_naming_the_epoch():
    model, guide, data = small_problem()

    def poison(metrics):
        with torch.no_grad():
            next(model.parameters()).fill_(math.nan)

    with pytest.raises(FloatingPointError, match="NaN or infinite in epoch 2; lower --lr"):
        train(model, guide, data, TrainConfig(epochs=3), on_epoch=poison)


def _small_vae():
    data = Data(torch.randn(40, 3), torch.randn(10, 3), "continuous")
    model, guide = build_vae(VAEConfig(latent_dim=2, network=NetworkConfig(hidden=(8,))), data)
    return model, guide, data


def test_a_guide_without_the_models_latent_site_is_refused_before_any_epoch():
    model, guide, data = _small_vae()

    def empty_guide(x, num_data=None):
        pyro.module("guide", guide)

    epochs = []
    with pytest.raises(InputError, match="the guide does not sample the model's latent site 'z'"):
        train(model, empty_guide, data, TrainConfig(epochs=1), on_epoch=epochs.append, quiet=True)
    assert epochs == []


def test_a_step_too_large_for_memory_is_refused_before_any_epoch():
    model, guide, data = _small_vae()
    config = TrainConfig(epochs=1, num_particles=10**10, batch_size=40)
    said = r"a training step \(10000000000 particles of a batch of 40\) needs about [\d,.]+ GB"
    with pytest.raises(InputError, match=said + ".*lower --num-particles"):
        train(model, guide, data, config, quiet=True)


def test_the_checks_before_training_leave_the_numbers_alone():
    """check_programs draws in forked streams: training gives the numbers it gave before."""
    config = TrainConfig(epochs=1, batch_size=20, seed=3)
    torch.manual_seed(0)
    first = train(*_small_vae(), config, quiet=True)[0]["test_elbo"]
    torch.manual_seed(0)
    model, guide, data = _small_vae()
    state = init_state(model, guide, data, config)  # the loop without the checks
    assert run_epoch(state, data, config, quiet=True)["test_elbo"] == first
