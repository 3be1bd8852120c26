"""Learning-rate schedules: Burda et al.'s stages and the cosine against their closed forms, the
options refused where they do not apply, the rate recorded and continued exactly on resume."""

import math

import pytest
import torch

from ppl_vae.data import DataConfig, load_data
from ppl_vae.errors import InputError
from ppl_vae.networks import NetworkConfig
from ppl_vae.schedules import SCHEDULES, burda_stage
from ppl_vae.svi import TrainConfig, train
from ppl_vae.vae import VAEConfig, build_vae


def test_burda_is_3_to_the_i_epochs_at_ten_to_the_minus_i_over_7():
    stages = [burda_stage(e) for e in range(1, 3281)]
    assert [stages.count(i) for i in range(8)] == [3**i for i in range(8)]  # 3280 epochs
    assert stages == sorted(stages) and burda_stage(3281) == burda_stage(10**6) == 7
    schedule = SCHEDULES.build("burda", 3280)
    for epoch in (1, 2, 4, 5, 13, 14, 1094, 1095, 3280):
        i = burda_stage(epoch)
        assert schedule.rate(epoch, 1e-3) == pytest.approx(1e-3 * 10 ** (-i / 7), rel=1e-12)
    assert schedule.adam_eps == 1e-4  # Burda et al.'s Adam settings (beta1 0.9, beta2 0.999)


def test_cosine_warms_up_linearly_then_falls_to_the_floor_at_the_last_epoch():
    epochs, warmup, floor, base = 20, 4, 1e-5, 2e-3
    schedule = SCHEDULES.build("cosine", epochs, lr_warmup=warmup, lr_floor=floor)
    rates = [schedule.rate(e, base) for e in range(1, epochs + 1)]
    assert rates[:warmup] == pytest.approx([base * e / (warmup + 1) for e in range(1, 5)])
    assert rates[warmup] == pytest.approx(base) and rates[-1] == pytest.approx(floor)
    middle = warmup + 1 + (epochs - warmup - 1) / 2  # half way down the cosine
    assert (
        schedule.rate(int(middle), base)
        > (base + floor) / 2
        > schedule.rate(math.ceil(middle + 1), base)
    )
    assert all(a > b for a, b in zip(rates[warmup:], rates[warmup + 1 :], strict=False))


@pytest.mark.parametrize(
    "kwargs, message",
    [({"lr_warmup": 2}, "--lr-warmup does not apply to the learning-rate schedule 'constant'"),
     ({"lr_schedule": "burda", "lr_floor": 0.0}, "--lr-floor does not apply"),
     ({"lr_schedule": "cosine", "lr_floor": 0.1}, r"lr_floor must lie in \[0, --lr\)"),
     ({"lr_schedule": "cosine", "lr_warmup": 10}, "lr_warmup must be a whole number"),
     ({"lr_schedule": "step"}, "unknown learning-rate schedule 'step'")],
)  # fmt: skip
def test_options_of_another_schedule_are_refused(kwargs, message):
    with pytest.raises(InputError, match=message):
        TrainConfig(epochs=10, **kwargs)


def small_problem():
    torch.manual_seed(0)
    data = load_data(DataConfig("pinwheel", num_train=400, num_test=100))
    model, guide = build_vae(VAEConfig(latent_dim=2, network=NetworkConfig(hidden=(8,))), data)
    return model, guide, data


def numbers(history):
    return [{k: v for k, v in m.items() if k != "seconds"} for m in history]


def test_the_rate_is_recorded_and_a_resumed_run_continues_the_schedule_exactly():
    config = TrainConfig(epochs=5, lr_schedule="cosine", lr_warmup=1, lr=3e-3)
    straight = train(*small_problem(), config)
    expected = [config.schedule().rate(e, 3e-3) for e in range(1, 6)]
    assert [m["lr"] for m in straight] == pytest.approx(expected, rel=1e-15)
    states = []
    short = TrainConfig(epochs=2, lr_schedule="cosine", lr_warmup=1, lr=3e-3)
    train(*small_problem(), short, checkpoint=states.append)
    resumed = train(*small_problem(), config, resume_from=states[-1])
    # the first two epochs ran under a 2-epoch cosine, so only the continuation is compared
    assert [m["lr"] for m in resumed[2:]] == [m["lr"] for m in straight[2:]]
    states = []
    train(*small_problem(), config, checkpoint=states.append)
    again = train(*small_problem(), config, resume_from=states[2])  # stopped after epoch 3
    assert numbers(again) == numbers(straight)
    assert states[0].optimizer["param_groups"][0]["eps"] == 1e-8


def test_burda_trains_with_adams_epsilon_1e_4():
    states = []
    train(*small_problem(), TrainConfig(epochs=2, lr_schedule="burda"), checkpoint=states.append)
    group = states[-1].optimizer["param_groups"][0]
    assert group["eps"] == 1e-4 and group["lr"] == pytest.approx(1e-3 * 10 ** (-1 / 7))
    assert [m["lr"] for m in states[-1].metrics] == pytest.approx([1e-3, 1e-3 * 10 ** (-1 / 7)])


def plateau_by_hand(values, base, factor, patience, floor):
    """Reference: ReduceLROnPlateau's rule in mode max with threshold 0, written out."""
    rates, rate, best, bad = [], base, -math.inf, 0
    for v in values:
        rates.append(rate)  # the rate the epoch ran at, before its value is seen
        if v > best:
            best, bad = v, 0
        else:
            bad += 1
        if bad >= patience:
            rate, bad = max(rate * factor, floor), 0
    rates.append(rate)
    return rates


def test_plateau_cuts_the_rate_after_patience_epochs_without_a_better_validation_elbo():
    values = [-10, -9, -9.5, -9.2, -9.1, -8, -8.5, -8.4, -8.3, -8.2, -8.1, -8.05]
    schedule = SCHEDULES.build("plateau", 20, lr_factor=0.5, lr_patience=2, lr_floor=1e-4)
    history = [{"epoch": e, "validation_elbo": v} for e, v in enumerate(values, 1)]
    rates = [schedule.rate(e, 1e-3, history[: e - 1]) for e in range(1, len(values) + 2)]
    assert rates == pytest.approx(plateau_by_hand(values, 1e-3, 0.5, 2, 1e-4), rel=1e-15)
    # by hand: cuts after epochs 4 (-9.5, -9.2 not above -9) and 8, 10, 12 (below -8), floored
    assert rates == pytest.approx([1e-3] * 4 + [5e-4] * 4 + [2.5e-4] * 2 + [1.25e-4] * 2 + [1e-4])
    assert schedule.monitors == "validation_elbo"
    torch_rates = []  # and PyTorch's own ReduceLROnPlateau (mode max, threshold 0) agrees
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="max", factor=0.5, patience=1, threshold=0.0, min_lr=1e-4
    )  # torch cuts once more than `patience` bad epochs passed: its 1 is our 2
    for v in values:
        torch_rates.append(opt.param_groups[0]["lr"])
        sched.step(v)
    torch_rates.append(opt.param_groups[0]["lr"])
    assert rates == pytest.approx(torch_rates, rel=1e-12)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"lr_schedule": "plateau"}, "the plateau schedule watches the validation ELBO; pass "
      "--validation N"),
     ({"lr_schedule": "plateau", "validation": 10, "lr_factor": 1.0}, "lr_factor must lie in"),
     ({"lr_schedule": "plateau", "validation": 10, "lr_patience": 0}, "lr_patience must be"),
     ({"lr_schedule": "cosine", "lr_factor": 0.5}, "--lr-factor does not apply")],
)  # fmt: skip
def test_plateau_needs_a_validation_set_and_its_own_options(kwargs, message):
    with pytest.raises(InputError, match=message):
        TrainConfig(epochs=10, **kwargs)


def test_plateau_resumed_mid_schedule_gives_the_uninterrupted_run():
    config = TrainConfig(
        epochs=6, lr=0.1, lr_schedule="plateau", validation=100, lr_patience=1, lr_factor=0.3
    )  # the rate is cut after epochs 3, 4 and 5
    states = []
    straight = train(*small_problem(), config, checkpoint=states.append)
    rates = [m["lr"] for m in straight]
    assert len(set(rates[3:])) == 3, "the test needs cuts after the point it resumes from"
    again = train(*small_problem(), config, resume_from=states[2])  # stopped after epoch 3
    assert numbers(again) == numbers(straight)
