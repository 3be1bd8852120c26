"""Importance-sampled log p(x) against closed forms and quadrature; site checks."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from helpers import SIGMA_X, decode, linear_gaussian_programs, nonlinear_model, quadrature

from ppl_vae.importance import log_likelihood


@pytest.mark.parametrize("k", [1, 7, 100])
def test_exact_posterior_guide_gives_the_closed_form_for_any_k(k):
    model, guide, _, x, exact = linear_gaussian_programs()
    est = log_likelihood(model, guide, x, num_samples=k)
    assert est.shape == (6,) and est.dtype == torch.float64
    assert torch.allclose(est, exact, atol=1e-5, rtol=0)


def test_prior_guide_converges_as_k_grows_within_its_standard_error():
    model, _, guide, x, exact = linear_gaussian_programs(sigma=1.5, seed=1)
    small = log_likelihood(model, guide, x, num_samples=10, diagnostics=True)
    big = log_likelihood(model, guide, x, num_samples=20000, diagnostics=True)
    # delta method: sd(log mean w) = sqrt(CV^2 / K) with CV^2 = K / ESS - 1, from the same draws
    se = ((20000 / big.ess - 1) / 20000).sqrt()
    assert ((big.log_px - exact).abs() < 4 * se + 1e-9).all(), (big.log_px - exact, se)
    assert (big.log_px - exact).abs().mean() < (small.log_px - exact).abs().mean()


def test_nonlinear_model_matches_quadrature_to_two_hundredths_of_a_nat():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(8, 2, generator=g, dtype=torch.float64)
    x = decode(z) + SIGMA_X * torch.randn(8, 3, generator=g, dtype=torch.float64)
    exact, mean, cov = quadrature(x)

    def guide(x):  # moment-matched Gaussian, widened so its tails cover the posterior's
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.MultivariateNormal(mean, covariance_matrix=2.0 * cov))

    torch.manual_seed(0)
    est = log_likelihood(nonlinear_model, guide, x, num_samples=5000)
    assert (est - exact).abs().max() < 0.02, est - exact


def test_chunked_and_unchunked_results_are_equal_for_the_same_draws():
    model, _, guide, x, _ = linear_gaussian_programs()
    torch.manual_seed(3)
    whole = log_likelihood(model, guide, x, num_samples=64, chunk_size=64)
    torch.manual_seed(3)
    chunked = log_likelihood(model, guide, x, num_samples=64, chunk_size=16)
    assert torch.allclose(whole, chunked, atol=1e-12, rtol=0)
    torch.manual_seed(3)
    uneven = log_likelihood(model, guide, x, num_samples=64, chunk_size=24, diagnostics=True)
    assert uneven.num_samples == 64 and torch.isfinite(uneven.log_px).all()


def test_several_latent_sites():
    """z1 ~ N(0,1), z2 | z1 ~ N(z1, 1), x | z2 ~ N(z2, 1), so p(x) = N(0, 3)."""

    def model(x):
        with pyro.plate("data", len(x)):
            z1 = pyro.sample("z1", dist.Normal(torch.zeros_like(x), 1.0))
            z2 = pyro.sample("z2", dist.Normal(z1, 1.0))
            pyro.sample("x", dist.Normal(z2, 1.0), obs=x)

    def exact_guide(x):  # p(z2 | x) = N(2x/3, 2/3), p(z1 | z2) = N(z2/2, 1/2)
        with pyro.plate("data", len(x)):
            z2 = pyro.sample("z2", dist.Normal(2 * x / 3, (2 / 3) ** 0.5))
            pyro.sample("z1", dist.Normal(z2 / 2, 0.5**0.5))

    x = torch.tensor([-2.0, 0.0, 0.5, 3.0], dtype=torch.float64)
    est = log_likelihood(model, exact_guide, x, num_samples=50)
    assert torch.allclose(est, dist.Normal(0.0, 3**0.5).log_prob(x).double(), atol=1e-6)


def test_diagnostics_order_elbo_below_iwae_k_below_log_px():
    model, _, guide, x, _ = linear_gaussian_programs(sigma=1.0)
    r = log_likelihood(model, guide, x, num_samples=3000, diagnostics=True, iwae_ks=(1, 10, 100))
    assert torch.allclose(r.iwae[1], r.elbo)  # IWAE_1 is the ELBO
    means = [r.elbo.mean(), r.iwae[10].mean(), r.iwae[100].mean(), r.log_px.mean()]
    assert all(a < b for a, b in zip(means[:-1], means[1:], strict=True)), means
    assert ((r.ess >= 1) & (r.ess <= 3000)).all()
    model, exact_guide, _, x, _ = linear_gaussian_programs()
    r = log_likelihood(model, exact_guide, x, num_samples=200, diagnostics=True)
    assert torch.allclose(r.ess, torch.full_like(r.ess, 200.0))
    assert torch.allclose(r.elbo, r.log_px, atol=1e-9)


def test_sites_outside_the_data_plate_and_mismatched_guides_are_rejected():
    model, _, guide, x, _ = linear_gaussian_programs()

    def global_model(x):
        s = pyro.sample("s", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(s, 1.0).expand([len(x), 4]).to_event(1), obs=x)

    def global_guide(x):
        pyro.sample("s", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="site 's' lies outside the plate 'data'"):
        log_likelihood(global_model, global_guide, x, num_samples=4)

    def wrong_guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("w", dist.Normal(torch.zeros(len(x), 2), 1.0).to_event(1))

    with pytest.raises(ValueError, match=r"latent sites \['w'\] do not match the model's \['z'\]"):
        log_likelihood(model, wrong_guide, x, num_samples=4)
    with pytest.raises(ValueError, match="num_samples must be a positive"):
        log_likelihood(model, guide, x, num_samples=0)
    with pytest.raises(ValueError, match="IWAE k must lie"):
        log_likelihood(model, guide, x, num_samples=5, diagnostics=True, iwae_ks=(10,))


def test_vae_model_and_guide():
    from ppl_vae.data import DataConfig, load_data
    from ppl_vae.networks import NetworkConfig
    from ppl_vae.vae import VAEConfig, build_vae

    data = load_data(DataConfig("moons", num_train=100, num_test=50))
    model, guide = build_vae(VAEConfig(latent_dim=2, network=NetworkConfig(hidden=(8,))), data)
    r = log_likelihood(model, guide, data.test, num_samples=500, diagnostics=True)
    assert r.log_px.shape == (50,) and (r.log_px >= r.elbo).all()
