"""log p(x) by importance sampling against closed forms and a quadrature."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from ppl_vae.evaluate import log_likelihood

# ---- linear-Gaussian model: z ~ N(0, I_L), x | z ~ N(W z + b, sigma^2 I_D) -------------------


def linear_gaussian(d=4, latent=2, sigma=0.7, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, latent, generator=g, dtype=torch.float64)
    b = torch.randn(d, generator=g, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * 2

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(latent, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ w.T + b, sigma).to_event(1), obs=x)

    precision = torch.eye(latent, dtype=torch.float64) + w.T @ w / sigma**2
    post_cov = torch.linalg.inv(precision)

    def exact_guide(x):
        loc = (x - b) @ w @ post_cov / sigma**2  # posterior mean, one row per point
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.MultivariateNormal(loc, covariance_matrix=post_cov))

    def prior_guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample(
                "z", dist.Normal(torch.zeros(len(x), latent, dtype=x.dtype), 1.0).to_event(1)
            )

    cov = w @ w.T + sigma**2 * torch.eye(d, dtype=torch.float64)
    exact = dist.MultivariateNormal(b, covariance_matrix=cov).log_prob(x)
    return model, exact_guide, prior_guide, x, exact


@pytest.mark.parametrize("k", [1, 7, 100])
def test_exact_posterior_guide_gives_the_closed_form_for_any_k(k):
    model, guide, _, x, exact = linear_gaussian()
    est = log_likelihood(model, guide, x, num_samples=k)
    assert est.shape == (6,) and est.dtype == torch.float64
    assert torch.allclose(est, exact, atol=1e-5, rtol=0)


def test_prior_guide_converges_as_k_grows_within_its_standard_error():
    model, _, guide, x, exact = linear_gaussian(sigma=1.5, seed=1)
    small = log_likelihood(model, guide, x, num_samples=10, diagnostics=True)
    big = log_likelihood(model, guide, x, num_samples=20000, diagnostics=True)
    # delta method: sd(log mean w) = sqrt(CV^2 / K) with CV^2 = K / ESS - 1, from the same draws
    se = ((20000 / big.ess - 1) / 20000).sqrt()
    assert ((big.log_px - exact).abs() < 4 * se + 1e-9).all(), (big.log_px - exact, se)
    assert (big.log_px - exact).abs().mean() < (small.log_px - exact).abs().mean()


# ---- a 2-D latent with a non-linear decoder, log p(x) by quadrature -------------------------

SIGMA_X = 0.4


def decode(z):
    z1, z2 = z[..., 0], z[..., 1]
    return torch.stack([torch.tanh(z1 + 0.5 * z2**2), torch.sin(z2), 0.5 * z1 * z2], -1)


def nonlinear_model(x):
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(decode(z), SIGMA_X).to_event(1), obs=x)


def quadrature(x, half_width=7.0, n=1401):
    """log p(x) = log sum over a grid of p(z) p(x|z) dA, and the posterior moments."""
    t = torch.linspace(-half_width, half_width, n, dtype=torch.float64)
    z = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)
    log_joint = (
        dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
        + dist.Normal(decode(z)[:, None], SIGMA_X).log_prob(x).sum(-1).T
    )
    log_da = 2 * math.log(t[1] - t[0])
    log_px = torch.logsumexp(log_joint, 1) + log_da
    post = torch.softmax(log_joint, 1)
    mean = post @ z
    centred = z[None] - mean[:, None]
    cov = torch.einsum("nk,nki,nkj->nij", post, centred, centred)
    return log_px, mean, cov


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


# ---- chunks, several latent sites, diagnostics, errors ----------------------------------------


def test_chunked_and_unchunked_results_are_equal_for_the_same_draws():
    model, _, guide, x, _ = linear_gaussian()
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
    model, _, guide, x, _ = linear_gaussian(sigma=1.0)
    r = log_likelihood(model, guide, x, num_samples=3000, diagnostics=True, iwae_ks=(1, 10, 100))
    assert torch.allclose(r.iwae[1], r.elbo)  # IWAE_1 is the ELBO
    means = [r.elbo.mean(), r.iwae[10].mean(), r.iwae[100].mean(), r.log_px.mean()]
    assert all(a < b for a, b in zip(means[:-1], means[1:], strict=True)), means
    assert ((r.ess >= 1) & (r.ess <= 3000)).all()
    model, exact_guide, _, x, _ = linear_gaussian()
    r = log_likelihood(model, exact_guide, x, num_samples=200, diagnostics=True)
    assert torch.allclose(r.ess, torch.full_like(r.ess, 200.0))
    assert torch.allclose(r.elbo, r.log_px, atol=1e-9)


def test_sites_outside_the_data_plate_and_mismatched_guides_are_rejected():
    model, _, guide, x, _ = linear_gaussian()

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
