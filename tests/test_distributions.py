"""The standard-normal prior and the guides' diagonal normal against torch's Normal."""

import math

import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.kl import kl_divergence

from ppl_vae.distributions import DiagonalNormal, StandardNormal


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
