"""The closed-form KL of full- and low-rank Gaussian guides against the diagonal prior, which
torch and Pyro do not register: against torch's MVN-MVN formula on an explicit MVN prior, and
against a Monte Carlo average of log q - log p."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from helpers import linear_gaussian_vae
from pyro.distributions.kl import kl_divergence

from ppl_vae.distributions import StandardNormal
from ppl_vae.guides import FullRankGaussianGuide, LowRankGaussianGuide
from ppl_vae.losses import LOSSES, TraceMeanFieldELBO, gaussian_kl_or_pyros
from ppl_vae.networks import MLPEncoder


def guides(d=3, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(n, d, generator=g, dtype=torch.float64)
    tril = torch.randn(n, d, d, generator=g, dtype=torch.float64).tril(-1)
    tril = tril + torch.diag_embed(torch.rand(n, d, generator=g, dtype=torch.float64) + 0.5)
    factor = torch.randn(n, d, 2, generator=g, dtype=torch.float64)
    diag = torch.rand(n, d, generator=g, dtype=torch.float64) + 0.3
    return (
        dist.MultivariateNormal(loc, scale_tril=tril),
        dist.LowRankMultivariateNormal(loc, factor, diag),
    )


@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("prior", ["normal", "standard"])
def test_against_torch_and_monte_carlo(which, prior):
    q = guides()[which]
    n, d = q.batch_shape[0], q.event_shape[0]
    if prior == "normal":
        loc = torch.linspace(-1, 1, d, dtype=torch.float64).expand(n, d)
        scale = torch.linspace(0.5, 2, d, dtype=torch.float64).expand(n, d)
        p = dist.Normal(loc, scale).to_event(1)
    else:
        loc, scale = torch.zeros(n, d, dtype=torch.float64), torch.ones(n, d, dtype=torch.float64)
        p = StandardNormal((n, d), torch.float64).to_event(1)
    with pytest.raises(NotImplementedError):
        kl_divergence(q, p)  # the pair this fills in
    kl = gaussian_kl_or_pyros(q, p)
    explicit = kl_divergence(q, dist.MultivariateNormal(loc, torch.diag_embed(scale**2)))
    assert torch.allclose(kl, explicit, atol=1e-12, rtol=0)
    torch.manual_seed(0)
    z = q.sample((200_000,))
    mc = (q.log_prob(z) - p.log_prob(z)).mean(0)
    sd = (q.log_prob(z) - p.log_prob(z)).std(0) / 200_000**0.5
    assert ((kl - mc).abs() < 4 * sd).all(), (kl - mc, sd)


def test_other_pairs_still_raise():
    q = dist.MultivariateNormal(torch.zeros(2), torch.eye(2))
    with pytest.raises(NotImplementedError):
        gaussian_kl_or_pyros(q, dist.Laplace(torch.zeros(2), 1.0).to_event(1))


@pytest.mark.parametrize("guide_class", [FullRankGaussianGuide, LowRankGaussianGuide])
def test_the_meanfield_loss_uses_it_for_the_rank_guides(guide_class):
    """With the KL in closed form, the loss's spread over draws is that of the likelihood term
    alone: compare its value against the explicit formula on the guide's own distribution."""
    model, data, _ = linear_gaussian_vae(n=10)
    guide = guide_class(MLPEncoder([5], [8], "tanh"), 2)
    x = data.train[:6]
    pyro.set_rng_seed(0)
    trace = pyro.poutine.trace(guide).get_trace(x)
    q = trace.nodes["z"]["fn"]
    want_kl = kl_divergence(q, dist.MultivariateNormal(torch.zeros(2), torch.eye(2)))
    z = trace.nodes["z"]["value"]
    log_lik = model.observation(z).log_prob(x)
    pyro.set_rng_seed(0)
    loss = LOSSES.build("meanfield").loss(model, guide, x)
    assert loss == pytest.approx(-(log_lik - want_kl).sum().item(), rel=1e-5)
    pyro.set_rng_seed(0)  # the class's default is Pyro's TraceMeanField_ELBO: the draw
    pyro_loss = pyro.infer.TraceMeanField_ELBO().loss(model, guide, x)
    assert TraceMeanFieldELBO().loss(model, guide, x) != loss
    pyro.set_rng_seed(0)
    assert TraceMeanFieldELBO().loss(model, guide, x) == pytest.approx(pyro_loss, rel=1e-6)
