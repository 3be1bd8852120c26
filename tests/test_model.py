"""The Pyro model and guide: shapes, plates, and the ELBO against a hand computation."""

import math

import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from ppl_vae.errors import InputError
from ppl_vae.guides import GaussianGuide, make_guide
from ppl_vae.model import (
    LIKELIHOODS,
    BernoulliLikelihood,
    FixedGaussianLikelihood,
    HeteroscedasticGaussianLikelihood,
    LearnedGaussianLikelihood,
    VAEModel,
)
from ppl_vae.networks import MLPDecoder, MLPEncoder

EVENT = (3, 4)
LATENT = 2


def tiny_vae(likelihood=None):
    model = VAEModel(
        MLPDecoder(LATENT, EVENT, [5], "tanh"), likelihood or BernoulliLikelihood(), LATENT, EVENT
    )
    guide = GaussianGuide(MLPEncoder(EVENT, [5], "tanh"), LATENT)
    return model, guide


def binary_batch(n=7, seed=1):
    return torch.bernoulli(
        torch.full((n, *EVENT), 0.4), generator=torch.Generator().manual_seed(seed)
    )


def test_model_and_guide_sites_shapes_and_plate():
    model, guide = tiny_vae()
    x = binary_batch()
    guide_tr = poutine.trace(guide).get_trace(x)
    model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(x)
    z = guide_tr.nodes["z"]
    assert z["value"].shape == (7, LATENT)
    assert z["fn"].batch_shape == (7,) and z["fn"].event_shape == (LATENT,)
    assert model_tr.nodes["z"]["fn"].batch_shape == (7,)
    obs = model_tr.nodes["x"]
    assert obs["is_observed"] and obs["fn"].batch_shape == (7,) and obs["fn"].event_shape == EVENT
    for tr, name in ((guide_tr, "z"), (model_tr, "z"), (model_tr, "x")):
        frames = tr.nodes[name]["cond_indep_stack"]
        assert [(f.name, f.size, f.dim) for f in frames] == [("data", 7, -1)]
    # model and guide each register their parameters under one module name
    params = {n for n, s in {**guide_tr.nodes, **model_tr.nodes}.items() if s["type"] == "param"}
    assert any(n.startswith("model$$$") for n in params)
    assert any(n.startswith("guide$$$") for n in params)


def test_num_data_scales_every_site_to_the_full_data_set():
    model, guide = tiny_vae()
    x = binary_batch(5)
    guide_tr = poutine.trace(guide).get_trace(x, num_data=50)
    model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(x, num_data=50)
    assert guide_tr.nodes["z"]["scale"] == 10.0
    assert model_tr.nodes["z"]["scale"] == model_tr.nodes["x"]["scale"] == 10.0
    full = Trace_ELBO().loss(model, guide, x)
    torch.manual_seed(0)
    a = Trace_ELBO().differentiable_loss(model, guide, x, num_data=50)
    torch.manual_seed(0)
    b = Trace_ELBO().differentiable_loss(model, guide, x)
    assert torch.allclose(a, 10 * b) and math.isfinite(full)


def test_trace_elbo_equals_hand_computed_elbo_for_the_same_sample():
    torch.set_default_dtype(torch.float64)
    model, guide = tiny_vae()
    x = binary_batch()
    torch.manual_seed(3)
    loss = Trace_ELBO().differentiable_loss(model, guide, x)
    # the same draw: GaussianGuide samples z = loc + scale * eps with eps ~ N(0, I)
    torch.manual_seed(3)
    h = guide.head(guide.encoder(x))
    loc, scale = h[:, :LATENT], F.softplus(h[:, LATENT:]) + 1e-6
    eps = torch.randn(7, LATENT)
    z = loc + scale * eps
    logits = model.decoder.net(z).reshape(7, *EVENT)
    p = torch.sigmoid(logits)
    log_px = (x * p.log() + (1 - x) * (1 - p).log()).sum((1, 2))
    log_pz = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(1)
    log_qz = (-0.5 * eps**2 - scale.log() - 0.5 * math.log(2 * math.pi)).sum(1)
    hand_elbo = (log_px + log_pz - log_qz).sum()
    assert abs(-loss.item() - hand_elbo.item()) < 1e-5


def test_trace_elbo_and_meanfield_elbo_agree_in_expectation():
    model, guide = tiny_vae()
    x = binary_batch(4)

    def estimates(elbo_cls):
        elbo = elbo_cls(num_particles=4000, vectorize_particles=True, max_plate_nesting=1)
        with torch.no_grad():
            return torch.tensor(
                [elbo.loss(model, guide, x) for _ in range(10)], dtype=torch.float64
            )

    sampled, analytic = estimates(Trace_ELBO), estimates(TraceMeanField_ELBO)
    se = (sampled.var() / 10 + analytic.var() / 10).sqrt()
    assert se > 0  # the sampled-KL estimate is random
    assert abs(sampled.mean() - analytic.mean()) < 5 * se + 1e-6
    # and the analytic KL really reduces the variance of the estimate
    assert analytic.var() < sampled.var()


def test_meanfield_kl_is_the_closed_form_gaussian_kl():
    model, guide = tiny_vae()
    x = binary_batch(3)
    elbo = TraceMeanField_ELBO()
    guide_tr = poutine.trace(guide).get_trace(x)
    q = guide_tr.nodes["z"]["fn"].base_dist
    kl = 0.5 * (q.loc**2 + q.scale**2 - 1).sum() - q.scale.log().sum()
    # with z fixed by replay, the loss is -log p(x|z) + KL(q || p) in closed form
    model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(x)
    log_px = model_tr.nodes["x"]["fn"].log_prob(x).sum()
    loss = elbo.differentiable_loss(model, poutine.replay(guide, trace=guide_tr), x)
    assert torch.allclose(loss, -log_px + kl, atol=1e-4)


def test_prior_samples_and_means():
    model, _ = tiny_vae()
    x = model.sample(5)
    assert x.shape == (5, *EVENT) and ((x > 0) & (x < 1)).all()
    assert set(model.sample(5, mean=False).unique().tolist()) <= {0.0, 1.0}


def test_gaussian_likelihoods():
    out = torch.zeros(2, *EVENT)
    fixed = FixedGaussianLikelihood(torch.Size(EVENT), sigma=0.5)(out)
    assert torch.allclose(fixed.scale, torch.tensor(0.5))
    learned = LearnedGaussianLikelihood(torch.Size(EVENT), sigma=2.0)
    assert torch.allclose(learned(out).scale, torch.full(EVENT, 2.0))
    assert sum(p.numel() for p in learned.parameters()) == 12
    x = torch.randn(2, *EVENT)
    expected = torch.distributions.Normal(0.0, 2.0).log_prob(x)
    assert torch.allclose(learned(out).log_prob(x), expected, atol=1e-6)
    with pytest.raises(ValueError, match="sigma must be positive"):
        FixedGaussianLikelihood(torch.Size(EVENT), sigma=0.0)


def test_unknown_names_raise_value_errors():
    with pytest.raises(ValueError, match="unknown likelihood 'poisson'"):
        LIKELIHOODS.build("poisson", torch.Size(EVENT))
    with pytest.raises(ValueError, match="unknown guide 'flow9'.*gaussian"):
        make_guide("flow9", MLPEncoder(EVENT, [5], "tanh"), LATENT)


def test_plain_pyro_guide_can_replace_the_built_in_one():
    model, _ = tiny_vae()
    x = binary_batch(3)
    encoder = MLPEncoder(EVENT, [5], "tanh")
    head = torch.nn.Linear(5, 2 * LATENT)

    def guide(x, num_data=None):
        pyro.module("enc", encoder)
        pyro.module("head", head)
        loc, raw = head(encoder(x)).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", pyro.distributions.Normal(loc, F.softplus(raw)).to_event(1))

    assert math.isfinite(Trace_ELBO().loss(model, guide, x))


def test_the_model_refuses_one_point_given_without_its_batch_dimension():
    model = VAEModel(MLPDecoder(2, [4], [8], "tanh"), BernoulliLikelihood([4]), 2, [4])
    said = r"the model takes a batch of shape \(N, 4\), got shape \(4,\) \(one point\? pass x"
    with pytest.raises(InputError, match=said):
        model(torch.ones(4))


def test_a_large_initial_sigma_is_a_sigma_not_an_overflow():
    likelihood = LearnedGaussianLikelihood([2], sigma=1e4)
    assert torch.allclose(likelihood.sigma, torch.full((2,), 1e4))


def test_heteroscedastic_gaussian_on_a_linear_decoder_is_the_closed_form_normal():
    """p(x|z) = N(A z + a, diag(floor + softplus(B z + b))^2), the decoder one linear layer."""
    torch.manual_seed(0)
    latent, d, floor = 3, 2, 0.05
    decoder = MLPDecoder(latent, [d], [], "tanh", outputs=2)  # z -> (2, d), linearly
    (layer,) = decoder.net
    model = VAEModel(decoder, HeteroscedasticGaussianLikelihood([d], floor), latent, [d])
    z, x = torch.randn(7, latent), torch.randn(7, d)
    out = z @ layer.weight.T + layer.bias
    mean, sigma = out[:, :d], floor + F.softplus(out[:, d:])
    by_hand = (-0.5 * ((x - mean) / sigma) ** 2 - sigma.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
    assert torch.allclose(model.observation(z).log_prob(x), by_hand, atol=1e-5)
    reference = torch.distributions.Normal(mean, sigma).log_prob(x).sum(-1)
    assert torch.allclose(model.observation(z).log_prob(x), reference, atol=1e-5)
    assert torch.allclose(model.observation(z).mean, mean)


def test_heteroscedastic_sigma_never_falls_below_the_floor():
    floor = 0.05
    likelihood = HeteroscedasticGaussianLikelihood([4], sigma_floor=floor)
    out = torch.stack([torch.zeros(4), torch.tensor([-1e4, -50.0, 0.0, 3.0])])  # (2, 4)
    normal = likelihood(out)
    expected = floor + torch.log1p(torch.tensor([-1e4, -50.0, 0.0, 3.0]).exp())
    assert torch.equal(normal.scale[:2], torch.full((2,), floor))
    assert torch.allclose(normal.scale, expected)
    # at the mean, with sigma at the floor, log N = -log(floor) - log(2 pi) / 2
    peak = normal.log_prob(torch.zeros(4))[0]
    assert torch.isclose(peak, torch.tensor(-math.log(floor) - 0.5 * math.log(2 * math.pi)))
    for bad in (0.0, -1.0, math.inf, True):
        with pytest.raises(InputError, match="sigma_floor must be"):
            HeteroscedasticGaussianLikelihood([4], sigma_floor=bad)
