"""CUDA paths (skipped where no GPU is visible)."""

import pytest
import torch

from ppl_vae.data import DataConfig, load_data
from ppl_vae.networks import NetworkConfig
from ppl_vae.runs import load_run, train_run
from ppl_vae.svi import TrainConfig, mean_elbo, train
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
    guide = make_guide(name, MLPEncoder([6], [8], "tanh"), 3, flow_length=2).double()
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
    import warnings

    data = DataConfig("pinwheel", num_train=700, num_test=200)
    vae = VAEConfig(latent_dim=2, network=NetworkConfig(hidden=(16,)), guide="planar")
    runs = []
    for capture in (True, False):
        config = TrainConfig(epochs=2, batch_size=300, kl_warmup=2, capture=capture)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fall-back to the program
            runs.append(train_run(data, vae, config, tmp_path / str(capture), "cuda"))
    for a, b in zip(runs[0].metrics, runs[1].metrics, strict=True):
        assert a["test_elbo"] == pytest.approx(b["test_elbo"], rel=1e-5)
