"""The standard-normal prior and the guides' diagonal normal against torch's Normal."""

import math

import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.kl import kl_divergence

from ppl_vae.distributions import (
    Bernoulli,
    DiagonalNormal,
    StandardNormal,
    bernoulli_log_prob,
    first_order_gradients,
)


def test_standard_normal_is_torchs_normal_0_1():
    z = torch.randn(7, 3, dtype=torch.float64) * 3
    prior = StandardNormal((7, 3), torch.float64)
    normal = torch.distributions.Normal(torch.zeros(7, 3, dtype=torch.float64), 1.0)
    assert torch.allclose(prior.log_prob(z), normal.log_prob(z), rtol=1e-12, atol=0)
    assert StandardNormal().log_prob(torch.zeros(())).item() == pytest.approx(
        -0.5 * math.log(2 * math.pi)
    )
    assert torch.allclose(prior.entropy(), normal.entropy())
    assert torch.equal(prior.mean, normal.mean) and torch.equal(prior.variance, normal.variance)
    wide = prior.expand((5, 7, 3))
    assert wide.batch_shape == (5, 7, 3) and wide.log_prob(z).shape == (5, 7, 3)
    torch.manual_seed(0)
    draws = StandardNormal((200_000,)).sample()
    # mean within 5 standard errors, variance within 5 standard errors (sd of s^2 ~ sqrt(2/n))
    assert abs(draws.mean().item()) < 5 / math.sqrt(200_000)
    assert abs(draws.var().item() - 1) < 5 * math.sqrt(2 / 200_000)


def test_kl_from_a_normal_to_the_standard_normal_is_the_closed_form():
    q = dist.Normal(torch.randn(4, 3, dtype=torch.float64), torch.rand(4, 3, dtype=torch.float64))
    p = torch.distributions.Normal(torch.zeros(4, 3, dtype=torch.float64), 1.0)
    want = torch.distributions.kl_divergence(q, p)
    prior = StandardNormal((4, 3), torch.float64)
    assert torch.allclose(kl_divergence(q, prior), want, rtol=1e-12)
    # the mean-field ELBO finds it through the Independent wrappers of model and guide
    assert torch.allclose(kl_divergence(q.to_event(1), prior.to_event(1)), want.sum(-1), rtol=1e-12)


def test_the_guides_diagonal_normal_is_torchs_normal():
    loc = torch.randn(4, 3, dtype=torch.float64)
    scale = torch.rand(4, 3, dtype=torch.float64) + 0.1
    z = torch.randn(5, 4, 3, dtype=torch.float64) * 3
    want = torch.distributions.Normal(loc, scale).log_prob(z)
    assert torch.allclose(DiagonalNormal(loc, scale).log_prob(z), want, rtol=1e-12)
    wide = DiagonalNormal(loc, scale).expand((2, 4, 3))
    assert type(wide) is DiagonalNormal and wide.batch_shape == (2, 4, 3)


def test_bernoulli_log_prob_is_the_cross_entropy_within_float_rounding_with_and_without_grad():
    """Elementwise within 2.4e-7 (relative to 1 + |value|) of
    -binary_cross_entropy_with_logits, x in {0, 1} and in [0, 1], logits from -60 to 60 and at
    0; a sum over 784 pixels as close to float64 as the cross-entropy's own float32 sum; with
    gradients the same, and the gradient within 2e-7 of float64's."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 784, generator=g) * 8
    logits[0, :5] = torch.tensor([0.0, 60.0, -60.0, 1e-7, -1e-7])
    binary = torch.bernoulli(torch.rand(64, 784, generator=g))
    for x in (binary, torch.rand(64, 784, generator=g)):
        theirs = -torch.nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="none")
        exact = -torch.nn.functional.binary_cross_entropy_with_logits(
            logits.double(), x.double(), reduction="none"
        )
        with torch.no_grad():  # intensities are outside the support: no validation
            fast = Bernoulli(logits=logits, validate_args=False).log_prob(x)
        leaf = logits.clone().requires_grad_()
        with_grad = Bernoulli(logits=leaf, validate_args=False).log_prob(x)
        with_grad.sum().backward()
        assert torch.equal(fast, with_grad.detach())  # the same operations, in place or not
        for ours in (bernoulli_log_prob(logits, x), fast, with_grad.detach()):
            assert (ours - theirs).abs().max() <= 2.4e-7 * (1 + theirs.abs()).max()
            assert (ours.sum(-1).double() - exact.sum(-1)).abs().max() <= 2 * (
                theirs.sum(-1).double() - exact.sum(-1)
            ).abs().max() + 1e-5
        exact_grad = x.double() - torch.sigmoid(logits.double())  # d log p / d logit
        assert (leaf.grad.double() - exact_grad).abs().max() < 2e-7
    with torch.no_grad():
        summed = Bernoulli(logits=logits).to_event(1).log_prob(binary)
    torch.testing.assert_close(summed, dist.Bernoulli(logits=logits).to_event(1).log_prob(binary))
    probs = torch.sigmoid(logits[0])  # made from probabilities: Pyro's own
    assert torch.equal(Bernoulli(probs=probs).log_prob(binary[0]),
                       dist.Bernoulli(probs=probs).log_prob(binary[0]))  # fmt: skip
    with torch.no_grad(), pytest.raises(ValueError):  # validation as Pyro's
        Bernoulli(logits=logits[0], validate_args=True).log_prob(torch.full((784,), 2.0))


def test_bernoulli_log_prob_broadcasts_and_differentiates_as_the_cross_entropy():
    """Against torch's -binary_cross_entropy_with_logits in float64: logits and values that
    broadcast against each other either way (the values' shape beyond the logits' too), with
    and without gradients; gradients of both (summed back to each shape), second derivatives
    (gradgradcheck)."""
    g = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(3, 1, 5, generator=g, dtype=torch.float64)).requires_grad_()
    value = torch.rand(4, 5, generator=g, dtype=torch.float64).requires_grad_()
    weights = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(
        logits.expand(3, 4, 5), value.expand(3, 4, 5), reduction="none"
    )
    with torch.no_grad():
        for a, b in ((logits, value), (logits.expand(3, 4, 5), value[0])):
            expected = -torch.nn.functional.binary_cross_entropy_with_logits(
                *torch.broadcast_tensors(a, b), reduction="none"
            )
            torch.testing.assert_close(bernoulli_log_prob(a, b), expected, rtol=1e-12, atol=1e-12)
    ours = torch.autograd.grad((bernoulli_log_prob(logits, value) * weights).sum(), [logits, value])
    theirs = torch.autograd.grad((-bce * weights).sum(), [logits, value])
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradgradcheck(bernoulli_log_prob, (logits, value))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_first_order_gradients_keep_the_value_and_give_the_closed_form_derivative(dtype):
    """Within first_order_gradients: the value bit for bit the composite formula's (and the
    in-place one's without gradients), the derivative x - sigmoid(logit) within float rounding
    of float64's (x - 1/2 at logit 0); values that need a gradient, and code outside the
    context, keep the composite formula, whose second derivative is right (gradgradcheck)."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(16, 784, generator=g, dtype=dtype) * 8
    logits[0, :5] = torch.tensor([0.0, 60.0, -60.0, 1e-7, -1e-7], dtype=dtype)
    x = torch.bernoulli(torch.rand(16, 784, generator=g, dtype=dtype))
    x[1] = torch.rand(784, generator=g, dtype=dtype)  # intensities: a cross-entropy
    weights = torch.randn(16, 784, generator=g, dtype=dtype)
    leaf = logits.clone().requires_grad_()
    with first_order_gradients():
        fast = bernoulli_log_prob(leaf, x)
    composite = bernoulli_log_prob(leaf, x)
    with torch.no_grad():
        in_place = bernoulli_log_prob(logits, x)
    assert torch.equal(fast.detach(), composite.detach()) and torch.equal(fast.detach(), in_place)
    (grad,) = torch.autograd.grad((fast * weights).sum(), leaf)
    exact = weights.double() * (x.double() - torch.sigmoid(logits.double()))
    tolerance = 2 * torch.finfo(dtype).eps * weights.abs().max().item()
    assert (grad.double() - exact).abs().max() <= tolerance
    assert grad[0, 0] == weights[0, 0] * (x[0, 0] - 0.5)
    (composite_grad,) = torch.autograd.grad((composite * weights).sum(), leaf)
    assert (composite_grad.double() - exact).abs().max() <= 2 * tolerance
    # values that broadcast beyond the logits' shape, and the other way
    for a, b in ((leaf[:1], x[:3]), (leaf[:3], x[0])):
        with first_order_gradients():
            broadcast = bernoulli_log_prob(a, b)
        expected = bernoulli_log_prob(a, b)  # the composite formula
        assert broadcast.shape == (3, 784) and torch.equal(broadcast.detach(), expected.detach())
        got, want = (torch.autograd.grad(t.sum(), a)[0] for t in (broadcast, expected))
        assert (got - want).abs().max() <= 3 * tolerance / weights.abs().max().item()
    # a value that needs its own gradient: the composite formula, differentiable in both
    value = x.clone().requires_grad_()
    with first_order_gradients():
        both = bernoulli_log_prob(leaf, value)
    grads = torch.autograd.grad(both.sum(), [leaf, value])
    torch.testing.assert_close(grads[1], logits)  # d/dx of x l - softplus(l)
    # outside the context the second derivative is the log density's: -sigmoid (1 - sigmoid)
    small = (3 * torch.randn(2, 5, generator=g, dtype=torch.float64)).requires_grad_()
    target = torch.rand(2, 5, generator=g, dtype=torch.float64)
    assert torch.autograd.gradgradcheck(lambda t: bernoulli_log_prob(t, target), (small,))
    with first_order_gradients():  # within it, the derivative is a constant in the logits
        (first,) = torch.autograd.grad(bernoulli_log_prob(small, target).sum(), small,
                                       create_graph=True)  # fmt: skip
    assert not first.requires_grad
