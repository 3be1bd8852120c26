"""The conditional VAE: the quadrant split, the ELBO against a hand computation and against
Pyro's, log p(y|x) against closed forms and quadrature, and the refusals."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from ppl_vae.cvae import (
    HIDDEN,
    BaselineNet,
    CVAEGuide,
    CVAEModel,
    baseline_log_likelihood,
    conditional_log_likelihood,
    cvae_pair,
    join,
    quadrant_mask,
    split_quadrants,
)
from ppl_vae.errors import InputError
from ppl_vae.importance import log_likelihood_diagnostics
from ppl_vae.losses import TraceELBO, TraceMeanFieldELBO

EVENT = (1, 4, 6)  # small images: rows split 2/2, columns 3/3


def tiny_cvae(latent_dim=3):
    model, guide = cvae_pair(EVENT, latent_dim=latent_dim, hidden=(5,), activation="tanh")
    return model.double(), guide.double()


def binary_images(n=7, seed=1, shape=EVENT):
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((n, *shape), 0.4, dtype=torch.float64), generator=g)


def hand_log_lik(logits, images, hidden):
    """log p(y|x, z) written out: minus the binary cross-entropy summed over hidden pixels."""
    bce = F.binary_cross_entropy_with_logits(logits, images.expand_as(logits), reduction="none")
    return -(bce * hidden).flatten(-3).sum(-1)


def gaussian_of(head_out):
    """The diagonal Gaussian of a head's output, written out: loc, softplus(raw) + 1e-6."""
    loc, raw = head_out.chunk(2, -1)
    return torch.distributions.Normal(loc, F.softplus(raw) + 1e-6)


# -- (c) the quadrant split --------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, counts",
    [((28, 28), {1: 196, 2: 392, 3: 588}), ((5, 7), {1: 3 * 3, 2: 3 * 3 + 2 * 3, 3: 15 + 2 * 4})],
)
def test_visible_quadrants_count_and_place(shape, counts):
    h, w = shape[0] // 2, shape[1] // 2
    for visible, count in counts.items():
        mask = quadrant_mask(shape, visible)
        assert mask.shape == shape and mask.dtype == torch.bool
        assert mask.sum().item() == count
        assert mask[h:, :w].all() and not mask[h:, w:].any()  # bottom-left shown, bottom-right not
        assert mask[:h, :w].all() == (visible >= 2) and mask[:h, w:].all() == (visible == 3)


@pytest.mark.parametrize("visible", [1, 2, 3])
def test_split_partitions_the_pixels_and_join_restores_the_image(visible):
    images = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    x, y = split_quadrants(images, visible)
    shown = quadrant_mask((28, 28), visible)
    assert x.shape == y.shape == images.shape
    assert torch.equal(x != HIDDEN, shown.expand_as(x))  # x holds the visible pixels
    assert torch.equal(y != HIDDEN, (~shown).expand_as(y))  # y the others
    assert torch.equal(x[x != HIDDEN], images[x != HIDDEN])
    assert torch.equal(y[y != HIDDEN], images[y != HIDDEN])
    assert torch.equal(join(x, y), images)


def test_the_likelihoods_ignore_y_on_visible_pixels_and_see_it_on_hidden_ones():
    model, guide = tiny_cvae()
    baseline = BaselineNet(EVENT, hidden=(5,), activation="tanh").double()
    images = binary_images()
    x, y = split_quadrants(images, visible=1)
    other = torch.where(x != HIDDEN, 1 - images, y)  # y changed on every visible pixel
    flipped = y.clone()
    flipped[0, 0, 0, 5] = 1 - flipped[0, 0, 0, 5]  # one hidden pixel changed

    def model_log_prob(y):
        trace = poutine.trace(poutine.condition(model, {"z": z})).get_trace(x, y)
        trace.compute_log_prob()
        return trace.nodes["y"]["log_prob"]

    z = torch.randn(7, 3, dtype=torch.float64)
    assert torch.equal(model_log_prob(other), model_log_prob(y))
    assert model_log_prob(flipped)[0] != model_log_prob(y)[0]
    assert torch.equal(baseline_log_likelihood(baseline, x, other), baseline.log_prob(x, y))
    assert baseline_log_likelihood(baseline, x, flipped)[0] != baseline.log_prob(x, y)[0]
    estimates = []
    for target in (y, other, flipped):
        torch.manual_seed(4)
        estimates.append(conditional_log_likelihood(model, guide, x, target, num_samples=20))
    assert torch.equal(estimates[0], estimates[1]) and estimates[2][0] != estimates[0][0]


# -- (a) the ELBO: a hand computation, and ppl_vae's TraceELBO against Pyro's ------------------


def test_pyro_trace_elbo_of_the_cvae_matches_a_hand_computed_elbo():
    model, guide = tiny_cvae()
    images = binary_images()
    x, y = split_quadrants(images, visible=2)
    pyro.set_rng_seed(5)
    loss = Trace_ELBO().loss(model, guide, x, y)
    pyro.set_rng_seed(5)
    z = poutine.trace(guide).get_trace(x, y).nodes["z"]["value"]
    with torch.no_grad():
        flat_x, flat_image = x.flatten(1), images.flatten(1)
        q = gaussian_of(
            guide.recognition_head(guide.recognition_net(torch.cat([flat_x, flat_image], -1)))
        )
        prior = gaussian_of(model.prior_head(model.prior_net(flat_x)))
        logits = model.generation_net(torch.cat([flat_x, z], -1)).reshape(images.shape)
        hidden = ~quadrant_mask(EVENT[1:], 2)
        elbo = prior.log_prob(z).sum(-1) + hand_log_lik(logits, images, hidden)
        elbo = (elbo - q.log_prob(z).sum(-1)).sum()
    assert hidden.sum() == 12 and math.isfinite(loss)
    assert abs(-loss - elbo.item()) < 1e-10 * abs(elbo.item()), (-loss, elbo.item())


@pytest.mark.parametrize("num_data", [None, 70])
@pytest.mark.parametrize(
    "pyros, ours", [(Trace_ELBO, TraceELBO), (TraceMeanField_ELBO, TraceMeanFieldELBO)]
)
def test_ppl_vae_elbos_give_pyros_value_and_gradients(pyros, ours, num_data):
    model, guide = tiny_cvae()
    x, y = split_quadrants(binary_images(), visible=3)
    params = list(model.parameters()) + list(guide.parameters())
    results = []
    for loss in (pyros(), ours()):
        pyro.set_rng_seed(6)
        value = loss.differentiable_loss(model, guide, x, y, num_data=num_data)
        results.append((value, torch.autograd.grad(value, params)))
    (ours, our_grads), (theirs, their_grads) = results[1], results[0]
    assert torch.allclose(ours, theirs, rtol=1e-12, atol=0)
    for a, b in zip(our_grads, their_grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    assert any(g.abs().sum() > 0 for g in our_grads[: len(list(model.parameters()))])


def test_without_y_the_guide_draws_from_the_models_prior_and_complete_keeps_x():
    model, guide = tiny_cvae()
    x, _ = split_quadrants(binary_images(), visible=1)
    site = poutine.trace(guide).get_trace(x).nodes["z"]
    assert torch.equal(site["fn"].mean, model.prior(x).mean)
    params = {
        name for name, s in poutine.trace(guide).get_trace(x).nodes.items() if s["type"] == "param"
    }
    assert params and all(name.startswith("guide$$$recognition") for name in params)
    completed = model.complete(x)
    shown = x != HIDDEN
    assert torch.equal(completed[shown], x[shown])
    assert ((completed[~shown] > 0) & (completed[~shown] < 1)).all()


# -- (b) log p(y|x) against closed forms and quadrature ----------------------------------------


def linear_gaussian_conditional(dx=3, dz=2, dy=4, s=1.0, n=5, seed=0):
    """z | x ~ N(A x, I), y | x, z ~ N(B z + C x, s^2 I) as Pyro functions (float64), the exact
    posterior guide, the prior guide, points and their exact log p(y|x)."""
    g = torch.Generator().manual_seed(seed)
    a, b, c = (
        torch.randn(*shape, generator=g, dtype=torch.float64)
        for shape in ((dz, dx), (dy, dz), (dy, dx))
    )
    x = torch.randn(n, dx, generator=g, dtype=torch.float64)
    marginal = dist.MultivariateNormal(
        x @ (b @ a + c).T, covariance_matrix=b @ b.T + s**2 * torch.eye(dy, dtype=torch.float64)
    )
    y = marginal.sample()

    def model(x, y):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(x @ a.T, 1.0).to_event(1))
            pyro.sample("y", dist.Normal(z @ b.T + x @ c.T, s).to_event(1), obs=y)

    post_cov = torch.linalg.inv(torch.eye(dz, dtype=torch.float64) + b.T @ b / s**2)

    def exact_guide(x, y):
        loc = (x @ a.T + (y - x @ c.T) @ b / s**2) @ post_cov
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.MultivariateNormal(loc, covariance_matrix=post_cov))

    def prior_guide(x, y):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(x @ a.T, 1.0).to_event(1))

    return model, exact_guide, prior_guide, x, y, marginal.log_prob(y)


@pytest.mark.parametrize("k", [1, 50])
def test_the_exact_posterior_guide_gives_the_closed_form_for_any_k(k):
    model, guide, _, x, y, exact = linear_gaussian_conditional()
    est = conditional_log_likelihood(model, guide, x, y, num_samples=k)
    assert est.shape == (5,) and est.dtype == torch.float64
    assert torch.allclose(est, exact, atol=1e-9, rtol=0), est - exact


def test_a_worse_guide_lands_within_four_standard_errors_at_large_k():
    model, _, guide, x, y, exact = linear_gaussian_conditional()
    k = 20000
    torch.manual_seed(1)
    est = conditional_log_likelihood(model, guide, x, y, num_samples=k)
    torch.manual_seed(1)
    same = log_likelihood_diagnostics(model, guide, x, y, num_samples=k)
    assert torch.equal(est, same.log_px)  # the same draws: its ESS gives the standard error
    se = ((k / same.ess - 1) / k).sqrt()  # delta method: sd(log mean w) = sqrt(CV^2 / K)
    assert (se > 1e-4).all()  # the prior guide is not exact: the check can fail
    assert ((est - exact).abs() < 4 * se).all(), (est - exact) / se


def test_cvae_log_likelihood_matches_quadrature_over_a_one_dimensional_z():
    model, guide = tiny_cvae(latent_dim=1)
    images = binary_images(n=4, seed=2)
    x, y = split_quadrants(images, visible=2)
    k = 20000
    torch.manual_seed(0)
    found = log_likelihood_diagnostics(model, guide, x, y, num_samples=k)
    torch.manual_seed(0)
    est = conditional_log_likelihood(model, guide, x, y, num_samples=k)
    assert torch.equal(est, found.log_px)
    with torch.no_grad():
        prior = gaussian_of(model.prior_head(model.prior_net(x.flatten(1))))  # (4, 1)
        t = torch.linspace(-12, 12, 4001, dtype=torch.float64)
        z = prior.loc + prior.scale * t[:, None, None]  # (G, 4, 1): a grid per point
        logits = model.generation_net(torch.cat([x.flatten(1).expand(len(t), -1, -1), z], -1))
        hidden = ~quadrant_mask(EVENT[1:], 2)
        log_lik = hand_log_lik(logits.reshape(len(t), *images.shape), images, hidden)
        log_joint = prior.log_prob(z).squeeze(-1) + log_lik  # (G, 4)
        dz = prior.scale.squeeze(-1) * (t[1] - t[0])
        exact = torch.logsumexp(log_joint, 0) + dz.log()
    se = ((k / found.ess - 1) / k).sqrt()
    assert ((est - exact).abs() < 4 * se + 1e-6).all(), ((est - exact), se)


def test_baseline_log_likelihood_is_the_masked_cross_entropy():
    baseline = BaselineNet(EVENT, hidden=(5,), activation="tanh").double()
    images = binary_images()
    x, y = split_quadrants(images, visible=3)
    found = baseline_log_likelihood(baseline, x, y)
    with torch.no_grad():
        logits = baseline.net(x.flatten(1)).reshape(images.shape)
        expected = hand_log_lik(logits, images, ~quadrant_mask(EVENT[1:], 3))
    assert found.shape == (7,) and found.dtype == torch.float64
    assert torch.allclose(found, expected, rtol=1e-12, atol=0)
    assert baseline.log_prob(x, y).requires_grad  # the negative training loss


def test_starting_from_the_baseline_makes_p_y_given_x_z_the_baselines_for_every_z():
    model, _ = tiny_cvae()
    baseline = BaselineNet(EVENT, hidden=(5,), activation="tanh").double()
    x, _ = split_quadrants(binary_images(), visible=1)
    model.start_from(baseline)
    z = 3 * torch.randn(2, 7, 3, dtype=torch.float64)
    expected = baseline.logits(x).expand(2, -1, -1, -1, -1)
    assert torch.allclose(model.logits(x, z), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(InputError, match="layers"):
        model.start_from(BaselineNet(EVENT, hidden=(6,), activation="tanh").double())
    with pytest.raises(InputError, match="activation"):
        model.start_from(BaselineNet(EVENT, hidden=(5,), activation="relu").double())


# -- (d) refusals --------------------------------------------------------------------------------


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("visible", [0, 4, -1, True, 1.5, "2", None])
def test_a_bad_visible_is_refused_in_one_line(visible):
    with pytest.raises(InputError, match="visible must be 1, 2 or 3") as err:
        quadrant_mask((28, 28), visible)
    one_line(err)
    with pytest.raises(InputError, match="visible must be 1, 2 or 3") as err:
        split_quadrants(torch.zeros(2, 28, 28), visible)
    one_line(err)


@pytest.mark.parametrize("shape", [(28,), (1, 28, 28), (28.0, 28), (1, 28), (28, 1)])
def test_a_bad_image_shape_is_refused(shape):
    with pytest.raises(InputError) as err:
        quadrant_mask(shape, 1)
    one_line(err)


def test_mismatched_shapes_are_refused_in_one_line():
    model, guide = tiny_cvae()
    x, y = split_quadrants(binary_images(), visible=1)
    cases = [
        (lambda: split_quadrants(torch.zeros(28, 28)), "images must be a tensor"),
        (lambda: model(x, y[:, :, :, :5]), "y of x's shape"),
        (lambda: model(x, y[:3]), "y of x's shape"),
        (lambda: guide(x, y.numpy()), "y of x's shape"),
        (lambda: model(x[:, :, :3]), r"batch of shape \(N, 1, 4, 6\)"),
        (lambda: BaselineNet(EVENT, hidden=(5,)).double().log_prob(x, y[:, 0]), "y of x's shape"),
        (lambda: CVAEGuide(EVENT, 3, (5,)).double()(x), "needs y, or a prior"),
        (lambda: CVAEModel(EVENT, latent_dim=0), "latent_dim must be a positive integer"),
        (lambda: CVAEModel(EVENT, hidden=()), "hidden sizes"),
        (lambda: conditional_log_likelihood(model, guide, x, None), "y must be a tensor"),
        (lambda: conditional_log_likelihood(model, guide, x, y[:3]), "the same points"),
        (lambda: conditional_log_likelihood(model, guide, x, y, num_samples=0), "num_samples"),
    ]
    for call, match in cases:
        with pytest.raises(InputError, match=match) as err:
            call()
        one_line(err)
