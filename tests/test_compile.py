"""The recorded step through torch.compile (``TrainConfig.compile``, ``--compile``): the
program's loss and gradients from the same random state, compiled once per record, reported,
refused without a record."""

import os
import subprocess
import sys

import pyro
import pytest
import torch
from helpers import run_cli
from torch import fx

from ppl_vae.data import DataConfig, load_data
from ppl_vae.errors import InputError
from ppl_vae.networks import NetworkConfig
from ppl_vae.svi import (
    StepLosses,
    TrainConfig,
    can_compile_by_default,
    collect_params,
    train,
)
from ppl_vae.vae import VAEConfig, build_vae


def step_losses(guide: str, loss: str, particles: int = 1):
    torch.manual_seed(0)
    data = load_data(DataConfig("digits"))
    vae = VAEConfig(latent_dim=4, guide=guide, network=NetworkConfig(hidden=(16,)))
    model, g = build_vae(vae, data)
    x = torch.bernoulli(data.train[:50].float())
    params = collect_params(model, g, x, num_data=500)
    config = TrainConfig(loss=loss, num_particles=particles, compile=True)
    return StepLosses(model, g, params, config=config)(1.0), x


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Within float32 rounding of reordered sums: 1e-5 of each element plus 1e-5 of the
    largest (fused kernels sum in another order; measured up to 3e-7 of the largest)."""
    a, b = a.detach(), b.detach()
    scale = b.abs().max().clamp(min=1.0)
    return torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(scale))


@pytest.mark.parametrize(
    "guide, loss, particles",
    [("gaussian", "elbo", 1), ("gaussian", "meanfield", 1), ("gaussian", "iwae", 3),
     ("iaf", "elbo", 1)],
)  # fmt: skip
def test_the_compiled_record_gives_the_programs_loss_and_gradients(guide, loss, particles):
    """Compiled with inductor's draws taken from torch's generators, so each replay draws the
    numbers the Pyro program would: without that the losses differ by whole nats."""
    f, x = step_losses(guide, loss, particles)
    with pyro.validation_enabled(False):
        f(x, num_data=500)  # the program runs; the record is made and compiled
    (record,) = f.records.values()
    assert isinstance(record, torch.nn.Module) and not isinstance(record, fx.GraphModule)
    assert f.compile_seconds > 0
    results = []
    for fn in (lambda: f.loss(x, num_data=500), lambda: record(f.params, x)):
        with torch.random.fork_rng(), pyro.validation_enabled(False):
            torch.manual_seed(7)
            value = fn()
            results.append((value, torch.autograd.grad(value, f.params, allow_unused=True)))
    (want, want_grads), (got, got_grads) = results
    assert close(got, want), (got, want)
    for a, b in zip(got_grads, want_grads, strict=True):
        assert (a is None) == (b is None) and (a is None or close(a, b))
    # a draw of another seed is another loss: the comparison above can fail
    with torch.random.fork_rng(), pyro.validation_enabled(False):
        torch.manual_seed(8)
        assert not close(record(f.params, x), want)


def test_a_record_is_compiled_once_and_kept_while_the_program_agrees():
    f, x = step_losses("gaussian", "elbo")
    with pyro.validation_enabled(False):
        f(x, num_data=500)
        (record,) = f.records.values()
        spent = f.compile_seconds
        f.recheck()
        f(x, num_data=500)  # checked against the program again: the same compiled record
        f(x[:30], num_data=500)  # another shape: its own record, compiled
    assert next(iter(f.records.values())) is record and len(f.records) == 2
    assert f.compile_seconds > spent


def test_training_compiled_reports_the_compile_time_and_matches_the_record(capsys):
    data = load_data(DataConfig("pinwheel", num_train=400, num_test=100))
    runs = {}
    for compile in (False, True):
        torch.manual_seed(0)
        model, guide = build_vae(VAEConfig(latent_dim=2, network=NetworkConfig(hidden=(8,))), data)
        config = TrainConfig(epochs=2, batch_size=100, compile=compile)
        runs[compile] = train(model, guide, data, config)
    first, second = runs[True]
    assert first["compile_seconds"] > 0 and "compile_seconds" not in second
    assert "compiling the step:" in capsys.readouterr().err
    for a, b in zip(runs[True], runs[False], strict=True):
        assert abs(a["test_elbo"] - b["test_elbo"]) < 1e-4 * abs(b["test_elbo"])


def test_compile_needs_the_record(tmp_path, capsys):
    with pytest.raises(InputError, match="--compile compiles the step's record"):
        TrainConfig(compile=True, capture=False)
    code, _, err = run_cli("train", "--dataset", "pinwheel", "--compile", "--no-capture",
                           "--out", tmp_path / "r", capsys=capsys)  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and "drop --no-capture" in err
    assert not (tmp_path / "r").exists()


def test_compile_by_default_only_where_it_can():
    cpu = torch.device("cpu")
    assert TrainConfig().compile is None
    assert can_compile_by_default(TrainConfig(), cpu)  # gcc is on this machine and CI's
    assert not can_compile_by_default(TrainConfig(compile=False), cpu)
    assert not can_compile_by_default(TrainConfig(compile=True), cpu)  # decided already
    assert not can_compile_by_default(TrainConfig(capture=False), cpu)
    assert not can_compile_by_default(TrainConfig(), torch.device("cuda"))
    with pytest.MonkeyPatch.context() as m:
        m.setattr("shutil.which", lambda name: None)  # no C++ compiler
        assert not can_compile_by_default(TrainConfig(), cpu)


@pytest.mark.parametrize("kl_warmup", [0, 3])
def test_the_default_compiles_when_the_time_left_would_pay_for_it(monkeypatch, capsys, kl_warmup):
    # the rule, scaled down: 0.05 s left uncompiled pays, measured on the first epoch at the
    # final KL weight (epoch 1, or the warm-up's last: 3); so a run that ends there never
    # compiles and one with three epochs more compiles from the next epoch on
    data = load_data(DataConfig("pinwheel", num_train=400, num_test=100))
    monkeypatch.setattr("ppl_vae.svi.COMPILE_PAYS_SECONDS", 0.05)
    first = max(1, kl_warmup)
    compiled = {}
    for epochs in (first, first + 3):
        torch.manual_seed(0)
        model, guide = build_vae(VAEConfig(latent_dim=2, network=NetworkConfig(hidden=(8,))), data)
        config = TrainConfig(epochs=epochs, batch_size=100, kl_warmup=kl_warmup)
        metrics = train(model, guide, data, config)
        compiled[epochs] = [m["epoch"] for m in metrics if m.get("compile_seconds", 0) > 0]
    assert compiled == {first: [], first + 3: [first + 1]}
    lines = capsys.readouterr().err.splitlines()
    said = [i for i, line in enumerate(lines) if "compiling the step from epoch" in line]
    assert len(said) == 1 and f"from epoch {first + 1}:" in lines[said[0]]
    # after the line of the epoch whose time decided it (of the second run: first + 3 epochs)
    assert lines[said[0] - 1].startswith(f"epoch {first}/{first + 3}: ")


def test_compiling_on_a_cpu_prints_no_cuda_home_notice(tmp_path):
    # torch logs "No CUDA runtime is found, using CUDA_HOME=..." when inductor first imports
    # torch.utils.cpp_extension on a machine with a CUDA_HOME but no GPU: a fresh process
    # with CUDA_HOME set compiles a record and must print nothing of the kind
    script = (
        "import torch\n"
        "from ppl_vae.capture import CapturedLoss\n"
        "w = torch.ones(3, requires_grad=True)\n"
        "f = CapturedLoss(lambda x: (w * x).sum(), [w], compile=True)\n"
        "for _ in range(3):\n"
        "    f(torch.arange(3.0))\n"
        "print('compiled', f.compile_seconds > 0)\n"
    )
    env = {**os.environ, "CUDA_HOME": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert "compiled True" in out.stdout
    assert "CUDA_HOME" not in out.stderr and "CUDA runtime" not in out.stderr
