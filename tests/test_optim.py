"""Training's Adam: fused where torch has it, the default Adam's numbers, old states resumed."""

import copy

import pytest
import torch

import ppl_vae.svi
from ppl_vae.data import Data
from ppl_vae.optim import adam, is_fused, load_adam_state
from ppl_vae.svi import TrainConfig, init_state, run_epoch, snapshot, train
from ppl_vae.vae import VAEConfig, build_vae

FUSED_ON_CPU = torch.__version__ >= (2, 4)


def default_adam(params, *, lr, eps=1e-8):
    """Adam as ppl_vae built it before: torch's default implementation (for-loop on a CPU)."""
    return torch.optim.Adam(params, lr=lr, eps=eps)


def reference_problem():
    """The reference architecture (MLP 784-200-200, z = 50, Bernoulli, 425,284 parameters) on
    300 random dynamically binarized 28x28 images: three steps of batch 100 an epoch."""
    torch.manual_seed(0)
    data = Data.from_tensor(torch.rand(330, 1, 28, 28), test_fraction=0.1, binarize="dynamic")
    model, guide = build_vae(VAEConfig(), data)
    return model, guide, data


def final_params(state_or_history):
    return {k: v.clone() for k, v in state_or_history.params.items()}


def run(config, *, optimizer, resume_from=None, epochs=None, monkeypatch):
    """``init_state`` and ``run_epoch`` as ``train`` runs them, with ``optimizer`` as the
    factory of the Adam; returns the live state."""
    monkeypatch.setattr(ppl_vae.svi, "adam", optimizer)
    model, guide, data = reference_problem()
    state = init_state(model, guide, data, config, resume_from=resume_from)
    for _ in range(state.epoch, epochs or config.epochs):
        run_epoch(state, data, config, quiet=True)
    return state


@pytest.mark.skipif(not FUSED_ON_CPU, reason="torch < 2.4 has no fused Adam on a CPU")
def test_training_builds_a_fused_adam_on_a_cpu(monkeypatch):
    state = run(TrainConfig(epochs=1), optimizer=adam, epochs=0, monkeypatch=monkeypatch)
    assert is_fused(state.optimizer)


def test_without_a_fused_kernel_adam_falls_back_to_foreach(monkeypatch):
    built, torch_adam = [], torch.optim.Adam

    def adam_without_fused(params, **options):  # what torch < 2.4 does on a CPU
        if options.get("fused"):
            raise RuntimeError("`fused=True` requires all the params to be CUDA tensors")
        built.append(options)
        return torch_adam(params, **options)

    monkeypatch.setattr(torch.optim, "Adam", adam_without_fused)
    opt = adam([torch.nn.Parameter(torch.zeros(2))], lr=1e-3, eps=1e-7)
    assert built == [{"lr": 1e-3, "eps": 1e-7, "foreach": True}]
    assert not is_fused(opt)


def test_fused_adam_trains_the_reference_model_as_the_default_adam_within_float_rounding(
    monkeypatch,
):
    """Six steps of the reference-sized SVI step (two epochs of three): the parameters after
    the fused and the default Adam agree to 1e-5 of each parameter tensor's largest value.
    The kernels round differently; measured, they differ by 0.5-3e-7 of it, while three steps
    of lr = 1e-3 move every tensor by about 3e-3 (the comparison can see a step)."""
    config = TrainConfig(epochs=2, batch_size=100)
    fused = run(config, optimizer=adam, monkeypatch=monkeypatch)
    plain = run(config, optimizer=default_adam, monkeypatch=monkeypatch)
    assert is_fused(fused.optimizer) == FUSED_ON_CPU and not is_fused(plain.optimizer)
    start = run(config, optimizer=default_adam, epochs=1, monkeypatch=monkeypatch)
    for name, p in plain.params.items():
        scale = p.abs().max().item()
        assert torch.allclose(fused.params[name], p, rtol=0, atol=1e-5 * scale), name
        exp_avg = plain.optimizer.state[p]["exp_avg"]
        assert torch.allclose(fused.optimizer.state[fused.params[name]]["exp_avg"], exp_avg,
                              rtol=1e-4, atol=1e-6 * exp_avg.abs().max().item()), name  # fmt: skip
    moved = max((plain.params[k] - start.params[k]).abs().max().item() for k in plain.params)
    assert moved > 1e-4  # three steps of lr 1e-3: a change 100 times the tolerance
    for a, b in zip(fused.metrics, plain.metrics, strict=True):
        assert a["train_elbo"] == pytest.approx(b["train_elbo"], rel=1e-5)
        assert a["test_elbo"] == pytest.approx(b["test_elbo"], rel=1e-5)


def test_a_state_saved_by_the_default_adam_resumes_fused_and_continues_its_run(monkeypatch):
    """A checkpoint of a run trained before fused Adam (its param groups say ``fused: None``)
    resumes into a fused optimizer, and the resumed run ends where a run trained by the
    default Adam throughout ends, within float rounding."""
    config = TrainConfig(epochs=2, batch_size=100)
    old = run(config, optimizer=default_adam, epochs=1, monkeypatch=monkeypatch)
    saved = snapshot(old)
    assert {g["fused"] for g in saved.optimizer["param_groups"]} == {None}
    kept = copy.deepcopy(saved.optimizer)
    resumed = run(config, optimizer=adam, resume_from=saved, monkeypatch=monkeypatch)
    assert is_fused(resumed.optimizer) == FUSED_ON_CPU  # the saved groups' options lost
    straight = run(config, optimizer=default_adam, monkeypatch=monkeypatch)
    for name, p in straight.params.items():
        scale = p.abs().max().item()
        assert torch.allclose(resumed.params[name], p, rtol=0, atol=1e-5 * scale), name
    # the Adam state continued (a fresh one would have taken other steps) ...
    first = next(iter(resumed.params.values()))
    assert resumed.optimizer.state[first]["step"].item() == 6
    # ... and the checkpoint's copy was not changed by the steps after it
    assert torch.equal(saved.optimizer["state"][0]["exp_avg"], kept["state"][0]["exp_avg"])


@pytest.mark.skipif(not FUSED_ON_CPU, reason="torch < 2.4 has no fused Adam on a CPU")
def test_a_fused_state_loads_into_an_unfused_adam_as_unfused():
    """The other way (a state saved fused, resumed where torch has no fused kernel): the
    optimizer loading the state keeps its own implementation, and the numbers carry over."""
    p = torch.nn.Parameter(torch.linspace(-1, 1, 5))
    fused = adam([p], lr=1e-2)
    p.grad = torch.linspace(0.5, -0.5, 5)
    fused.step()
    q = torch.nn.Parameter(p.detach().clone())
    plain = torch.optim.Adam([q], lr=1e-2, foreach=True)
    load_adam_state(plain, fused.state_dict())
    assert not is_fused(plain) and plain.param_groups[0]["foreach"] is True
    assert torch.equal(plain.state[q]["exp_avg"], fused.state[p]["exp_avg"])
    assert plain.state[q]["step"].item() == 1


def test_resume_under_fused_adam_gives_the_numbers_of_an_uninterrupted_run():
    """Both sides fused (the same code): bit for bit, as before fused Adam."""
    torch.manual_seed(0)
    data = Data.from_tensor(torch.rand(220, 1, 28, 28), test_fraction=0.1, binarize="dynamic")

    def problem():
        torch.manual_seed(0)
        return (*build_vae(VAEConfig(latent_dim=4), data), data)

    config = TrainConfig(epochs=3)
    straight = train(*problem(), config, quiet=True)
    states = []
    train(*problem(), TrainConfig(epochs=1), checkpoint=states.append, quiet=True)
    resumed = train(*problem(), config, resume_from=states[-1], quiet=True)
    strip = [{k: v for k, v in m.items() if k != "seconds"} for m in straight]
    assert [{k: v for k, v in m.items() if k != "seconds"} for m in resumed] == strip
