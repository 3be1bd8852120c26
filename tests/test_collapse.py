"""Collapse diagnostics against the linear-Gaussian closed forms: activity, KL per dimension,
mutual information under q."""

import math
import weakref

import pyro
import pytest
import torch
from helpers import Flatten, MeanField
from pyro.distributions import TransformedDistribution
from torch.distributions import AffineTransform

from ppl_vae.collapse import (
    active_units,
    kl_per_dimension,
    latent_activity,
    mutual_information,
    posterior_means,
)
from ppl_vae.errors import InputError
from ppl_vae.guides import FlowGuide, GaussianGuide


def aggregate(case: MeanField):
    """q's mean map A (x - b) and its covariance over x ~ p(x): A C A^T."""
    return case.gain @ case.marginal.covariance_matrix @ case.gain.T


def test_an_unused_dimension_is_inactive_and_the_others_have_their_activity():
    case = MeanField(n=4000, unused=1)
    activity = latent_activity(case.guide, case.x)
    expected = aggregate(case).diagonal()
    assert expected[2] == 0 and activity[2] < 1e-20  # W's last column is 0: q ignores x there
    assert torch.allclose(activity[:2], expected[:2], rtol=0.1, atol=0)  # sampling of 4000 x
    assert active_units(case.guide, case.x) == 2
    assert active_units(case.guide, case.x, threshold=2 * expected[:2].max().item()) == 0


def test_kl_per_dimension_is_the_closed_form_and_adds_up_for_a_diagonal_guide():
    case = MeanField(unused=1)
    kl = kl_per_dimension(case.guide, case.x, batch_size=3)
    q = torch.distributions.Normal((case.x - case.b) @ case.gain.T, case.scale)
    expected = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0))
    assert kl.shape == (8, 3) and torch.allclose(kl, expected, atol=1e-12, rtol=0)
    assert torch.allclose(kl[:, 2], torch.zeros(8, dtype=torch.float64), atol=1e-6)  # unused
    full = torch.distributions.kl_divergence(
        case.guide.distribution(case.x), case.model.prior((8,))
    )
    assert torch.allclose(kl.sum(1), full, atol=1e-12, rtol=0)


class AffineGuide(torch.nn.Module):
    """The mean-field guide as an affine map of N(0, I): not recognised as Gaussian."""

    def __init__(self, case):
        super().__init__()
        self.case = case

    def distribution(self, x):
        q = self.case.guide.distribution(x).base_dist
        base = torch.distributions.Normal(torch.zeros_like(q.loc), 1.0)
        return TransformedDistribution(base, AffineTransform(q.loc, q.scale)).to_event(1)


def test_moments_from_draws_where_the_marginals_are_not_known():
    pyro.set_rng_seed(0)
    case = MeanField()
    exact = kl_per_dimension(case.guide, case.x)
    drawn = kl_per_dimension(AffineGuide(case), case.x, num_samples=20000)
    assert torch.allclose(drawn, exact, atol=0.02, rtol=0)
    means = posterior_means(AffineGuide(case), case.x, num_samples=20000)
    assert torch.allclose(means, posterior_means(case.guide, case.x), atol=0.02, rtol=0)


class CountingGuide(AffineGuide):
    """Counts the batch distributions alive when the next one is made (a flow's q keeps its
    draws cached in its transforms, so each alive q holds its batch's draws)."""

    def __init__(self, case):
        super().__init__(case)
        self.alive, self.most = weakref.WeakSet(), 0

    def distribution(self, x):
        self.most = max(self.most, len(self.alive))
        q = super().distribution(x)
        self.alive.add(q)
        return q


def test_the_diagnostics_hold_one_batch_distribution_at_a_time():
    case = MeanField()
    x = case.x.repeat(4, 1)  # several batches of 2
    for diagnostic in (kl_per_dimension, latent_activity, posterior_means):
        guide = CountingGuide(case)
        diagnostic(guide, x, batch_size=2, num_samples=10)
        assert guide.most <= 1, (diagnostic.__name__, guide.most)  # all batches at once before


def test_mutual_information_approaches_the_closed_form():
    """With x ~ N(b, C) and q(z|x) = N(A (x - b), D), z ~ N(0, A C A^T + D) under q, so
    I(x; z) = (log det(A C A^T + D) - log det D) / 2 (about 1.6 nats here)."""
    pyro.set_rng_seed(1)
    case = MeanField(n=2000)
    d = torch.diag(case.scale.square())
    exact = 0.5 * (torch.logdet(aggregate(case) + d) - torch.logdet(d)).item()
    estimate = mutual_information(case.guide, case.x, num_samples=2, batch_size=500)
    assert abs(estimate - exact) < 0.05, (estimate, exact)
    few = mutual_information(case.guide, case.x[:4], num_samples=50)
    assert few <= math.log(4) + 1e-9  # the mixture of N points: at most log N


def test_refusals():
    case = MeanField()
    flow = FlowGuide(Flatten(4), 3, flow="planar").double()
    with pytest.raises(InputError, match="only the Gaussian guides"):
        mutual_information(flow, case.x)
    with pytest.raises(InputError, match="batch_size must be a positive integer"):
        kl_per_dimension(GaussianGuide(Flatten(4), 3).double(), case.x, batch_size=0)


def test_drawn_means_do_not_make_an_unused_unit_active():
    """An unused unit keeps the prior's variance 1 under q; the mean of 100 draws varies by
    1/100 over the points: the threshold itself. The activity subtracts that noise, so the
    unit stays inactive and the used ones keep their closed-form activity."""
    pyro.set_rng_seed(2)
    case = MeanField(n=4000, unused=1)
    case.set_guide(case.gain, torch.tensor([0.3, 0.3, 1.0], dtype=torch.float64))
    guide = AffineGuide(case)
    drawn_means = posterior_means(guide, case.x).var(0)
    assert drawn_means[2] == pytest.approx(0.01, rel=0.1)  # what the old count took as activity
    activity = latent_activity(guide, case.x)
    assert abs(activity[2]) < 1e-3  # noise removed: about 0.01 * sqrt(2 / 4000) is left
    expected = aggregate(case).diagonal()
    assert torch.allclose(activity[:2], expected[:2], rtol=0.1, atol=0)
    assert active_units(guide, case.x) == 2
