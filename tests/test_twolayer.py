"""Two stochastic layers: the ELBO against Pyro's on the same program, log p(x) over both
latent sites against quadrature, the captured step against the program, the command line,
and the refusals."""

import json
import math
import warnings

import pyro
import pytest
import torch
from helpers import run_cli

from ppl_vae.data import DataConfig, load_data
from ppl_vae.errors import InputError
from ppl_vae.importance import log_likelihood
from ppl_vae.losses import TraceELBO, scale_latent
from ppl_vae.model import FixedGaussianLikelihood
from ppl_vae.networks import NetworkConfig
from ppl_vae.runs import train_run
from ppl_vae.runs.checkpoint import RunConfig
from ppl_vae.svi import TrainConfig
from ppl_vae.twolayer import two_layer_pair
from ppl_vae.vae import VAEConfig, build_vae


def tiny(seed=0):
    """z1 of 2, z2 of 1, x of 3 coordinates, a fixed sigma: small enough for quadrature."""
    torch.manual_seed(seed)
    lik = FixedGaussianLikelihood(torch.Size([3]), 0.5)
    model, guide = two_layer_pair(lik, (3,), (2, 1), ((8,), (4,)), "tanh")
    return model.double(), guide.double()


def test_the_elbo_and_its_gradients_are_pyros():
    model, guide = tiny()
    x = torch.randn(5, 3, dtype=torch.float64)
    params = list(model.parameters()) + list(guide.parameters())
    out = []
    for elbo in (TraceELBO(), pyro.infer.Trace_ELBO()):
        pyro.set_rng_seed(0)
        loss = elbo.differentiable_loss(model, guide, x)
        out.append((loss, torch.autograd.grad(loss, params)))
    (a, ga), (b, gb) = out
    assert a.item() == pytest.approx(b.item(), rel=1e-12)
    assert all(torch.allclose(g, h, rtol=1e-10, atol=1e-12) for g, h in zip(ga, gb, strict=True))
    trace = pyro.poutine.trace(model).get_trace(x)
    assert [s for s in trace.nodes if s in ("z", "z2", "x")] == ["z2", "z", "x"]


def test_log_likelihood_over_both_layers_against_quadrature():
    """log p(x) = log of p(z2) p(z1|z2) p(x|z1) summed over a 3-D grid of (z1, z2);
    importance sampling with q(z1|x) q(z2|z1) must agree within 4 standard errors."""
    model, guide = tiny(1)
    x = model.sample(4, mean=False).double()
    t = torch.linspace(-6, 6, 121, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(t, t, t, indexing="ij"), -1).reshape(-1, 3)
    z1, z2 = grid[:, :2], grid[:, 2:]
    with torch.no_grad():
        log_joint = (
            model.top_prior((len(grid),)).log_prob(z2)[:, None]
            + model.conditional(z2).log_prob(z1)[:, None]
            + model.observation(z1[:, None]).log_prob(x)
        )
    exact = torch.logsumexp(log_joint, 0) + 3 * math.log(t[1] - t[0])
    pyro.set_rng_seed(2)
    with torch.no_grad():
        estimate = log_likelihood(model, guide, x, num_samples=20_000)
    # the guide is untrained (a poor proposal): compare with the spread of repeated estimates
    repeats = torch.stack([log_likelihood(model, guide, x, num_samples=20_000) for _ in range(4)])
    se = repeats.std(0).clamp_min(1e-3)
    assert ((estimate - exact).abs() < 4 * se + 0.02).all(), (estimate - exact, se)
    assert (exact < -1).all() and se.max() < 0.2  # a real comparison, not a loose one


def test_training_captured_with_a_warmup_over_both_layers(tmp_path):
    data = DataConfig("pinwheel", num_train=600, num_test=200)
    vae = VAEConfig(model="two-layer", latent_dim=4, network=NetworkConfig(hidden=(16,)))
    runs = {}
    for capture in (True, False):
        config = TrainConfig(epochs=2, batch_size=200, loss="elbo", kl_warmup=2, capture=capture,
                             lr_schedule="constant")  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fall-back to the program
            runs[capture] = train_run(data, vae, config, tmp_path / str(capture), "cpu",
                                      pictures=False)  # fmt: skip
    for a, b in zip(runs[True].metrics, runs[False].metrics, strict=True):
        assert a["train_elbo"] == pytest.approx(b["train_elbo"], rel=1e-6)
        assert a["test_elbo"] == pytest.approx(b["test_elbo"], rel=1e-6)
    model, guide = runs[True].model, runs[True].guide
    x = load_data(data, "cpu").test[:50]
    with pyro.poutine.trace() as tr:  # the warm-up scales both latent sites of both programs
        scale_latent(0.5, model.latent_sites)(guide)(x)
    assert {n for n, s in tr.trace.nodes.items() if s.get("scale") == 0.5} >= {"z", "z2"}


def test_the_command_line_builds_burdas_sizes_and_trains(tmp_path, capsys):
    run = tmp_path / "two"
    flags = ["--dataset", "digits", "--model", "two-layer", "--epochs", "1", "--device", "cpu"]
    code, _, err = run_cli("train", *flags, "--quiet", "--out", run, capsys=capsys)
    assert code == 0, err
    config = json.loads((run / "config.json").read_text())
    assert config["vae"]["latent_dim"] == 100 and config["vae"]["network"]["hidden"] == [100, 100]
    assert config["train"]["loss"] == "elbo"
    code, out, err = run_cli("evaluate", "--run", run, "--num-samples", "20", "--limit", "10",
                             "--device", "cpu", "--quiet", capsys=capsys)  # fmt: skip
    assert code == 0 and "test NLL" in out, err
    assert (run / "samples.png").is_file() and (run / "reconstructions.png").is_file()


def test_refusals(tmp_path, capsys):
    data = DataConfig("pinwheel", num_train=100, num_test=50)
    with pytest.raises(InputError, match="--loss elbo or iwae"):
        RunConfig(data, VAEConfig(model="two-layer"), TrainConfig(loss="meanfield"))
    for flags, what in [({"guide": "planar"}, "--guide"), ({"prior": "mog"}, "--prior"),
                        ({"latent_dim": 1}, "--latent-dim")]:  # fmt: skip
        with pytest.raises(InputError, match=f"two-layer takes no {what}"):
            VAEConfig(model="two-layer", **flags)
    with pytest.raises(InputError, match="unknown model"):
        VAEConfig(model="three-layer")
    code, out, err = run_cli("train", "--dataset", "digits", "--model", "two-layer", "--loss",
                             "meanfield", "--out", tmp_path / "bad", capsys=capsys)  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and not (tmp_path / "bad").exists()
    model, guide = build_vae(VAEConfig(model="two-layer", latent_dim=4), load_data(data, "cpu"))
    assert (model.latent_dim, model.top_dim, guide.top_dim) == (4, 2, 2)
