"""CUDA paths (skipped where no GPU is visible)."""

import os
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, assert_same_metrics, strict_runs

from ppl_vae.data import DataConfig, load_data
from ppl_vae.networks import NetworkConfig
from ppl_vae.runs import RunDir, load_run, train_run
from ppl_vae.svi import ReseededStreamWarning, TrainConfig, mean_elbo, train
from ppl_vae.vae import VAEConfig, build_vae

pytestmark = pytest.mark.cuda


def test_the_same_parameters_give_the_same_elbo_on_cpu_and_cuda():
    data = load_data(DataConfig("pinwheel", num_train=500, num_test=500))
    model, guide = build_vae(VAEConfig(latent_dim=2, network=NetworkConfig(hidden=(32,))), data)
    train(model, guide, data, TrainConfig(epochs=2), quiet=True)
    cpu = mean_elbo(model, guide, data, num_particles=400)
    gpu = mean_elbo(model.cuda(), guide.cuda(), data.to("cuda"), num_particles=400)
    # different random draws on each device: agreement to Monte Carlo error (~0.005 nats)
    assert gpu == pytest.approx(cpu, abs=0.03)


def test_training_resume_and_loading_on_cuda(tmp_path):
    data = DataConfig("pinwheel", num_train=1000, num_test=200)
    vae = VAEConfig(latent_dim=2, network=NetworkConfig(hidden=(16,)))
    straight = train_run(data, vae, TrainConfig(epochs=3), tmp_path / "a", "cuda")
    train_run(data, vae, TrainConfig(epochs=2), tmp_path / "b", "cuda")
    resumed = train_run(data, vae, TrainConfig(epochs=3), tmp_path / "b", "cuda", resume=True)
    assert resumed.metrics[-1]["test_elbo"] == straight.metrics[-1]["test_elbo"]
    run = load_run(tmp_path / "a", "cuda")
    assert next(run.model.parameters()).is_cuda


GUIDES = ["lowrank", "fullrank", "planar", "radial", "iaf", "spline", "sylvester"]


@pytest.mark.parametrize("name", [*GUIDES, "sylvester-householder", "sylvester-triangular"])
def test_every_guide_gives_the_same_draws_and_densities_on_cpu_and_cuda(name):
    from ppl_vae.guides import make_guide
    from ppl_vae.networks import MLPEncoder

    def push(q, eps):  # a flow's draw and log-density from given base noise
        if not hasattr(q, "transforms"):
            return eps, q.log_prob(eps)
        z, log_q = eps, q.base_dist.log_prob(eps)
        for t in q.transforms:
            y = t(z)
            log_q = log_q - t.log_abs_det_jacobian(z, y)
            z = y
        return z, log_q

    torch.manual_seed(0)
    flow = {} if name in ("lowrank", "fullrank") else {"flow_length": 2}
    guide = make_guide(name, MLPEncoder([6], [8], "tanh"), 3, **flow).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    with torch.no_grad():
        q = guide.distribution(x)
        eps = (q.base_dist if hasattr(q, "transforms") else q).sample((4,))
        z_cpu, lp_cpu = push(q, eps)
        z_gpu, lp_gpu = push(guide.cuda().distribution(x.cuda()), eps.cuda())
    assert z_gpu.is_cuda
    assert torch.allclose(z_gpu.cpu(), z_cpu, atol=1e-9)
    assert torch.allclose(lp_gpu.cpu(), lp_cpu, atol=1e-9)


def test_the_captured_step_gives_the_numbers_of_the_program_on_cuda(tmp_path):
    data = DataConfig("pinwheel", num_train=700, num_test=200)
    vae = VAEConfig(latent_dim=2, network=NetworkConfig(hidden=(16,)), guide="planar")
    configs = {
        capture: TrainConfig(epochs=2, batch_size=300, kl_warmup=2, capture=capture)
        for capture in (True, False)
    }  # captured: the record replayed as a CUDA graph; not: the program every step
    runs = strict_runs(data, vae, configs, tmp_path, "cuda")  # no fall-back to the program
    assert_same_metrics(runs[True], runs[False], rel=1e-5, keys=("test_elbo",))


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda") / "cpu"
    data = DataConfig("pinwheel", num_train=1000, num_test=300)
    vae = VAEConfig(latent_dim=2, network=NetworkConfig(hidden=(16,)))
    train_run(data, vae, TrainConfig(epochs=2), out, "cpu", quiet=True)
    return out


def test_evaluation_on_cuda_agrees_with_the_cpu(cpu_run):
    from ppl_vae.runs import EvaluateConfig, evaluate_run

    config = EvaluateConfig(num_samples=2000)
    cpu = evaluate_run(cpu_run, config, device="cpu", write=False, quiet=True)
    gpu = evaluate_run(cpu_run, config, device="cuda", write=False, quiet=True)
    assert gpu["device"].startswith("cuda")
    # other draws on each device: the NLL agrees to Monte Carlo error (~0.01 nats at K=2000)
    assert gpu["nll"] == pytest.approx(cpu["nll"], abs=0.05)


def test_pictures_and_em_on_cuda(cpu_run, tmp_path):
    from ppl_vae.runs import MixtureConfig, em_run, plot_run

    paths = plot_run(cpu_run, tmp_path / "pictures", device="cuda")
    assert paths and all(p.stat().st_size > 1000 for p in paths)
    data = DataConfig("pinwheel")
    cpu = em_run(data, MixtureConfig(), tmp_path / "em-cpu", "cpu", quiet=True)
    gpu = em_run(data, MixtureConfig(), tmp_path / "em-gpu", "cuda", quiet=True)
    assert gpu["device"].startswith("cuda") and gpu["n_iter"] == cpu["n_iter"]
    assert gpu["test_log_likelihood"] == pytest.approx(cpu["test_log_likelihood"], abs=1e-6)


def test_a_cuda_checkpoint_resumes_on_the_cpu_and_the_reverse(tmp_path, capsys):
    data = DataConfig("pinwheel", num_train=1000, num_test=300)
    vae = VAEConfig(latent_dim=2, network=NetworkConfig(hidden=(16,)))
    for first, then in (("cuda", "cpu"), ("cpu", "cuda")):
        out = tmp_path / f"{first}-{then}"
        train_run(data, vae, TrainConfig(epochs=1), out, first, quiet=True)
        with pytest.warns(ReseededStreamWarning, match=f"saved on {first} and cannot continue"):
            run = train_run(data, vae, TrainConfig(epochs=2), out, then, resume=True)
        assert [m["epoch"] for m in run.metrics] == [1, 2]
        assert run.metrics[1]["test_elbo"] > run.metrics[0]["test_elbo"] - 0.5


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_rank_nccl_training(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "-m", "ppl_vae", "train", "--dataset", "pinwheel",
               "--epochs", "2", "--device", "cuda", "--out", str(out), "--quiet"]  # fmt: skip
    proc = subprocess.run(command, cwd=ROOT, env=dict(os.environ), capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    state, _ = RunDir(out).load()
    assert len(state.rng["ranks"]) == 2 and state.rng["ranks"][0]["data_device"] == "cuda"
