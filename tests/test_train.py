"""The SVI training loop: convergence on a closed form, KL warm-up, checkpoints and resume."""

import json
import math
import os

import pytest
import torch
from pyro import poutine
from torch import nn

from ppl_vae.data import Data, DataConfig
from ppl_vae.guides import GaussianGuide
from ppl_vae.model import FixedGaussianLikelihood, VAEModel
from ppl_vae.networks import NetworkConfig
from ppl_vae.train import (
    TrainConfig,
    evaluate_elbo,
    kl_weight,
    load_checkpoint,
    scale_latent,
    train,
)
from ppl_vae.vae import VAEConfig, load_run, train_run


class Flatten(nn.Module):
    """An encoder that hands x itself to the guide's linear head."""

    def __init__(self, dim):
        super().__init__()
        self.feature_dim = dim

    def forward(self, x):
        return x


def linear_gaussian(dim=5, latent=2, sigma=0.5, n=2000, seed=0):
    """z ~ N(0, I), x | z ~ N(W z + b, sigma^2 I) with orthogonal columns of W.

    Orthogonal columns make the exact posterior covariance diagonal, so the diagonal Gaussian
    guide with a linear encoder contains the exact posterior and the ELBO can reach log p(x).
    """
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))
    w = q[:, :latent] * torch.tensor([2.0, 1.0])
    b = torch.randn(dim, generator=g)
    decoder = nn.Linear(latent, dim)
    with torch.no_grad():
        decoder.weight.copy_(w)
        decoder.bias.copy_(b)
    decoder.requires_grad_(False)
    model = VAEModel(decoder, FixedGaussianLikelihood(torch.Size([dim]), sigma), latent, [dim])
    model.train(False)
    cov = w @ w.T + sigma**2 * torch.eye(dim)
    exact = torch.distributions.MultivariateNormal(b, cov)
    x = exact.sample((n + 500,))
    data = Data(x[:n], x[n:], "continuous", "linear-gaussian")
    return model, data, exact


def test_svi_drives_the_elbo_to_the_exact_log_likelihood_of_a_linear_gaussian_model():
    model, data, exact = linear_gaussian()
    guide = GaussianGuide(Flatten(5), latent_dim=2)
    config = TrainConfig(epochs=60, batch_size=100, lr=2e-2, seed=0)
    train(model, guide, data, config, quiet=True)
    elbo = evaluate_elbo(model, guide, data, "test", batch_size=500, num_particles=100)
    log_px = exact.log_prob(data.test).mean().item()
    # The ELBO is a lower bound (up to Monte Carlo error, ~1e-3 here) and SVI closes the gap.
    assert -0.01 < log_px - elbo < 0.05, (log_px, elbo)


def test_kl_weight_rises_linearly_then_stays_at_beta():
    config = TrainConfig(beta=0.5, kl_warmup=4)
    assert [kl_weight(e, config) for e in range(1, 7)] == [0.125, 0.25, 0.375, 0.5, 0.5, 0.5]
    assert kl_weight(1, TrainConfig(beta=2.0)) == 2.0


def test_scale_latent_scales_only_the_latent_site():
    model, data, _ = linear_gaussian(n=10)
    guide = GaussianGuide(Flatten(5), latent_dim=2)
    x = data.train[:4]
    guide_tr = poutine.trace(scale_latent(0.25)(guide)).get_trace(x, 40)
    model_tr = poutine.trace(poutine.replay(scale_latent(0.25)(model), guide_tr)).get_trace(x, 40)
    assert guide_tr.nodes["z"]["scale"] == model_tr.nodes["z"]["scale"] == 2.5
    assert model_tr.nodes["x"]["scale"] == 10.0


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


def small_run_configs():
    data = DataConfig("pinwheel", num_train=1000, num_test=200)
    vae = VAEConfig(latent_dim=2, network=NetworkConfig(hidden=(16,)))
    return data, vae


def test_resume_gives_the_same_numbers_as_an_uninterrupted_run(tmp_path):
    data, vae = small_run_configs()
    straight = train_run(data, vae, TrainConfig(epochs=4, kl_warmup=3), tmp_path / "a", "cpu")
    train_run(data, vae, TrainConfig(epochs=2, kl_warmup=3), tmp_path / "b", "cpu")
    resumed = train_run(
        data, vae, TrainConfig(epochs=4, kl_warmup=3), tmp_path / "b", "cpu", resume=True
    )

    def numbers(metrics):
        return [{k: v for k, v in m.items() if k != "seconds"} for m in metrics]

    assert numbers(resumed.metrics) == numbers(straight.metrics)
    lines = [json.loads(s) for s in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert numbers(lines) == numbers(straight.metrics)
    a, b = load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "b")
    assert a["epoch"] == b["epoch"] == 4
    for name, value in a["params"].items():
        assert torch.equal(value, b["params"][name]), name


def test_metrics_and_checkpoint_are_written_each_epoch(tmp_path):
    data, vae = small_run_configs()
    run = train_run(data, vae, TrainConfig(epochs=2), tmp_path, "cpu")
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    assert {"epoch", "train_elbo", "test_elbo", "seconds"} <= lines[0].keys()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "metrics.jsonl"]
    umask = os.umask(0)
    os.umask(umask)
    for name in ("checkpoint.pt", "metrics.jsonl"):  # atomic writes keep the usual permissions
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask
    # a loaded run reproduces the recorded test ELBO exactly
    loaded = load_run(tmp_path, "cpu")
    again = evaluate_elbo(loaded.model, loaded.guide, loaded.data, "test", 1000, seed=0)
    assert again == pytest.approx(run.metrics[-1]["test_elbo"], abs=1e-6)


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    data, vae = small_run_configs()

    def poison(metrics):  # after epoch 1, corrupt a decoder weight
        if metrics["epoch"] == 1:
            with torch.no_grad():
                next(run_model.parameters()).fill_(float("nan"))

    from ppl_vae.data import load_data
    from ppl_vae.vae import build_vae

    d = load_data(data)
    run_model, guide = build_vae(vae, d)
    with pytest.raises(FloatingPointError, match="epoch 2.*last good checkpoint \\(epoch 1\\)"):
        train(run_model, guide, d, TrainConfig(epochs=3), tmp_path, quiet=True, on_epoch=poison)
    assert load_checkpoint(tmp_path)["epoch"] == 1
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    assert all(
        math.isfinite(v)
        for v in load_checkpoint(tmp_path)["params"]["model$$$decoder.net.0.weight"]
        .flatten()
        .tolist()
    )


def trainable_linear_gaussian():
    """The linear-Gaussian model with a trainable decoder, its guide, 6 points, all parameters."""
    model, data, _ = linear_gaussian(n=10)
    model.decoder.requires_grad_(True)
    model.train(True)
    guide = GaussianGuide(Flatten(5), latent_dim=2)
    return model, guide, data.train[:6], list(model.parameters()) + list(guide.parameters())


@pytest.mark.parametrize(
    "ours, pyros", [("elbo", "Trace_ELBO"), ("meanfield", "TraceMeanField_ELBO")]
)
def test_sync_free_losses_equal_pyros_in_value_and_gradient(ours, pyros):
    import pyro.infer

    from ppl_vae.train import LOSSES

    model, guide, x, params = trainable_linear_gaussian()
    results = []
    for elbo in (
        LOSSES[ours](num_particles=3, vectorize_particles=True, max_plate_nesting=1),
        getattr(pyro.infer, pyros)(num_particles=3, vectorize_particles=True, max_plate_nesting=1),
    ):
        torch.manual_seed(7)
        loss = elbo.differentiable_loss(model, guide, x, 60)
        results.append((loss.detach(), torch.autograd.grad(loss, params)))
    (a, ga), (b, gb) = results
    assert torch.allclose(a, b, rtol=1e-6)
    for u, v in zip(ga, gb, strict=True):
        assert torch.allclose(u, v, rtol=1e-5, atol=1e-6)


def test_iwae_loss_equals_pyros_renyi_elbo_alpha_0_in_value_and_gradient():
    import pyro.infer

    from ppl_vae.train import IWAELoss

    model, guide, x, params = trainable_linear_gaussian()
    torch.manual_seed(11)
    ours = IWAELoss(num_particles=5).differentiable_loss(model, guide, x)
    ours_grads = torch.autograd.grad(ours, params)
    torch.manual_seed(11)
    renyi = pyro.infer.RenyiELBO(alpha=0, num_particles=5, vectorize_particles=True,
                                 max_plate_nesting=1)  # fmt: skip
    for p in params:
        p.grad = None
    theirs = renyi.loss_and_grads(model, guide, x)
    assert ours.item() == pytest.approx(theirs, rel=1e-6)
    for p, g in zip(params, ours_grads, strict=True):
        assert torch.allclose(p.grad, g, rtol=1e-5, atol=1e-6)


def test_iwae_bound_is_per_point_and_scaled_after_the_log_sum_exp():
    from ppl_vae.train import IWAELoss

    model, data, exact = linear_gaussian(n=10)
    guide = GaussianGuide(Flatten(5), latent_dim=2)
    x = data.train[:4]
    torch.manual_seed(0)
    unscaled = IWAELoss(num_particles=7).differentiable_loss(model, guide, x)
    torch.manual_seed(0)
    scaled = IWAELoss(num_particles=7).differentiable_loss(model, guide, x, 40)
    assert torch.allclose(scaled, 10 * unscaled)
    # k = 1 is the ELBO
    from ppl_vae.train import TraceELBO

    torch.manual_seed(2)
    one = IWAELoss(num_particles=1).differentiable_loss(model, guide, x)
    torch.manual_seed(2)
    assert torch.allclose(one, TraceELBO().differentiable_loss(model, guide, x))
    # the bound lies below the exact log-likelihood and rises with k (on average)
    with torch.no_grad():
        k1 = -sum(IWAELoss(num_particles=1).loss(model, guide, x) for _ in range(200)) / 200
        k50 = -sum(IWAELoss(num_particles=50).loss(model, guide, x) for _ in range(200)) / 200
    assert k1 < k50 < exact.log_prob(x).sum().item()


def test_iwae_rejects_kl_warmup():
    with pytest.raises(ValueError, match="iwae loss has none"):
        TrainConfig(loss="iwae", num_particles=5, kl_warmup=3)
