"""ppl_vae.losses against Pyro's own ELBOs and RenyiELBO; the KL weight handler."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from helpers import Flatten, linear_gaussian_vae, trainable_linear_gaussian
from pyro import poutine

from ppl_vae.guides import GaussianGuide
from ppl_vae.losses import LOSSES, IWAELoss, TraceELBO, TraceMeanFieldELBO, scale_latent


def loss_and_grads(elbo, model, guide, params, *args, seed=3):
    torch.manual_seed(seed)
    loss = elbo.differentiable_loss(model, guide, *args)
    return loss.detach(), torch.autograd.grad(loss, params)


def assert_same(ours, theirs):
    (a, ga), (b, gb) = ours, theirs
    assert torch.allclose(a, b, rtol=1e-6)
    for u, v in zip(ga, gb, strict=True):
        assert torch.allclose(u, v, rtol=1e-5, atol=1e-6)


BOTH = [
    (TraceELBO, pyro.infer.Trace_ELBO),
    (TraceMeanFieldELBO, pyro.infer.TraceMeanField_ELBO),
]


def test_score_function_guides_get_pyros_estimator():
    """A discrete latent has no reparameterized draw: the surrogate carries the score term."""
    logits = torch.tensor([0.3, -0.2], requires_grad=True)
    loc = torch.tensor(0.5, requires_grad=True)
    x = torch.tensor([0.4, 1.3, -0.7])

    def model(x):
        with pyro.plate("data", 3):
            c = pyro.sample("c", dist.Bernoulli(logits=torch.zeros(3)))
            pyro.sample("x", dist.Normal(loc * c, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", 3):
            pyro.sample("c", dist.Bernoulli(logits=logits.sum().expand(3)))

    params = [logits, loc]
    ours = loss_and_grads(TraceELBO(), model, guide, params, x)
    assert_same(ours, loss_and_grads(pyro.infer.Trace_ELBO(), model, guide, params, x))
    assert ours[1][0].abs().sum() > 0  # the guide's gradient comes from the score term


def test_masked_and_scaled_sites_count_as_in_pyro():
    model, guide, x, params = trainable_linear_gaussian()
    mask = torch.tensor([True, False, True, True, False, True])

    def masked(fn):
        def run(x, num_data=None):
            with poutine.mask(mask=mask), poutine.scale(scale=0.5):
                return fn(x, num_data)

        return run

    for ours, theirs in [
        (TraceELBO, pyro.infer.Trace_ELBO),
        (TraceMeanFieldELBO, pyro.infer.TraceMeanField_ELBO),
    ]:
        kwargs = {"num_particles": 2, "vectorize_particles": True, "max_plate_nesting": 1}
        a = loss_and_grads(ours(**kwargs), masked(model), masked(guide), params, x, 60)
        b = loss_and_grads(theirs(**kwargs), masked(model), masked(guide), params, x, 60)
        assert_same(a, b)


def test_sequential_particles_average_as_in_pyro():
    model, guide, x, params = trainable_linear_gaussian()
    a = loss_and_grads(TraceELBO(num_particles=3), model, guide, params, x, 60)
    b = loss_and_grads(pyro.infer.Trace_ELBO(num_particles=3), model, guide, params, x, 60)
    assert_same(a, b)


def test_the_losses_read_nothing_back_from_the_device(monkeypatch):
    """Each ``.item()`` is a host synchronisation on a GPU; Pyro's losses make three a step."""
    model, guide, x, params = trainable_linear_gaussian()

    def no_item(self):
        raise AssertionError(".item() was called")

    monkeypatch.setattr(torch.Tensor, "item", no_item)
    with pyro.validation_enabled(False):
        for elbo in (TraceELBO(max_plate_nesting=1), TraceMeanFieldELBO(max_plate_nesting=1)):
            elbo.differentiable_loss(model, guide, x, 60).backward()
        with pytest.raises(AssertionError, match="item"):  # the check can fail
            pyro.infer.Trace_ELBO(max_plate_nesting=1).differentiable_loss(model, guide, x, 60)


def test_svi_with_these_losses_takes_pyros_steps():
    model, guide, x, params = trainable_linear_gaussian()
    start = [p.detach().clone() for p in params]
    after = []
    for elbo in (TraceELBO(max_plate_nesting=1), pyro.infer.Trace_ELBO(max_plate_nesting=1)):
        with torch.no_grad():
            for p, s in zip(params, start, strict=True):
                p.copy_(s)
        pyro.clear_param_store()
        svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.1}), elbo)
        torch.manual_seed(5)
        losses = [svi.step(x, 60) for _ in range(3)]
        after.append((losses, [p.detach().clone() for p in params]))
    (la, pa), (lb, pb) = after
    assert la == pytest.approx(lb, rel=1e-6)
    for p, q in zip(pa, pb, strict=True):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ours, theirs", BOTH)
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"num_particles": 3}, {"num_particles": 3, "vectorize_particles": True}],
)
@pytest.mark.parametrize("subsample", [None, 3])
def test_every_kind_of_site_counts_as_in_pyro(ours, theirs, kwargs, subsample):
    """Global and plated latents, a factor, an auxiliary guide site, per-point tensor scales,
    a latent masked off entirely, subsampling, particles: value and gradient as Pyro's."""
    loc = torch.randn(6, 2, requires_grad=True)
    g = torch.randn(2, requires_grad=True)
    x = torch.randn(6, 2)
    weights = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0, 1.0])

    def model(x):
        glob = pyro.sample("glob", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.factor("prior_factor", -(glob**2).sum())
        pyro.sample("off", dist.Normal(0.0, 1.0).mask(False))
        with pyro.plate("data", 6, subsample_size=subsample) as i:
            with poutine.scale(scale=weights[i]):
                z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z + glob, 1.0).to_event(1), obs=x[i])

    def guide(x):
        pyro.sample("glob", dist.Normal(g, 0.5).to_event(1))
        aux = pyro.sample("aux", dist.Normal(g.sum(), 1.0), infer={"is_auxiliary": True})
        pyro.sample("off", dist.Normal(g[0], 2.0).mask(False))
        with pyro.plate("data", 6, subsample_size=subsample) as i, poutine.scale(scale=weights[i]):
            pyro.sample("z", dist.Normal(loc[i] + aux.unsqueeze(-1), 0.8).to_event(1))

    with pyro.validation_enabled(False):
        a = loss_and_grads(ours(**kwargs), model, guide, [loc, g], x)
        b = loss_and_grads(theirs(**kwargs), model, guide, [loc, g], x)
    assert_same(a, b)


def test_reparameterized_draws_with_a_score_term_keep_it():
    """pyro's Rejector distributions draw by reparameterization and add a score term."""
    from pyro.distributions.testing.rejection_gamma import ShapeAugmentedGamma

    alpha = torch.tensor([1.5, 2.0, 3.0], requires_grad=True)
    x = torch.tensor([0.4, 1.3, 0.7])

    def model(x):
        with pyro.plate("data", 3):
            z = pyro.sample("z", dist.Gamma(2.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", 3):
            pyro.sample("z", ShapeAugmentedGamma(alpha, torch.ones(3)))

    with pyro.validation_enabled(False):
        a = loss_and_grads(TraceELBO(), model, guide, [alpha], x)
        b = loss_and_grads(pyro.infer.Trace_ELBO(), model, guide, [alpha], x)
    assert_same(a, b)


def test_mean_field_with_a_discrete_guide_is_pyros_and_is_refused_under_validation():
    logits = torch.tensor([0.3, -0.2], requires_grad=True)
    x = torch.tensor([0.4, 1.3, -0.7])

    def model(x):
        with pyro.plate("data", 3):
            c = pyro.sample("c", dist.Bernoulli(logits=torch.zeros(3)))
            pyro.sample("x", dist.Normal(c, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", 3):
            pyro.sample("c", dist.Bernoulli(logits=logits.sum().expand(3)))

    with pyro.validation_enabled(False):
        a = loss_and_grads(TraceMeanFieldELBO(), model, guide, [logits], x)
        b = loss_and_grads(pyro.infer.TraceMeanField_ELBO(), model, guide, [logits], x)
    assert_same(a, b)
    with pyro.validation_enabled(True):
        for elbo in (TraceMeanFieldELBO(), pyro.infer.TraceMeanField_ELBO()):
            with pytest.raises(NotImplementedError, match="fully reparameterized"):
                elbo.differentiable_loss(model, guide, x)


def test_scale_latent_scales_only_the_latent_site():
    model, data, _ = linear_gaussian_vae(n=10)
    guide = GaussianGuide(Flatten(5), latent_dim=2)
    x = data.train[:4]
    guide_tr = poutine.trace(scale_latent(0.25)(guide)).get_trace(x, 40)
    model_tr = poutine.trace(poutine.replay(scale_latent(0.25)(model), guide_tr)).get_trace(x, 40)
    assert guide_tr.nodes["z"]["scale"] == model_tr.nodes["z"]["scale"] == 2.5
    assert model_tr.nodes["x"]["scale"] == 10.0


@pytest.mark.parametrize(
    "ours, pyros", [("elbo", "Trace_ELBO"), ("meanfield", "TraceMeanField_ELBO")]
)
def test_sync_free_losses_equal_pyros_in_value_and_gradient(ours, pyros):
    import pyro.infer

    model, guide, x, params = trainable_linear_gaussian()
    results = []
    for elbo in (
        LOSSES.build(ours, num_particles=3),
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
    model, data, exact = linear_gaussian_vae(n=10)
    guide = GaussianGuide(Flatten(5), latent_dim=2)
    x = data.train[:4]
    torch.manual_seed(0)
    unscaled = IWAELoss(num_particles=7).differentiable_loss(model, guide, x)
    torch.manual_seed(0)
    scaled = IWAELoss(num_particles=7).differentiable_loss(model, guide, x, 40)
    assert torch.allclose(scaled, 10 * unscaled)
    # k = 1 is the ELBO
    torch.manual_seed(2)
    one = IWAELoss(num_particles=1).differentiable_loss(model, guide, x)
    torch.manual_seed(2)
    assert torch.allclose(one, TraceELBO().differentiable_loss(model, guide, x))
    # the bound lies below the exact log-likelihood and rises with k (on average)
    with torch.no_grad():
        k1 = -sum(IWAELoss(num_particles=1).loss(model, guide, x) for _ in range(200)) / 200
        k50 = -sum(IWAELoss(num_particles=50).loss(model, guide, x) for _ in range(200)) / 200
    assert k1 < k50 < exact.log_prob(x).sum().item()
