"""Importance-sampled log p(x) against closed forms and quadrature; site checks."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from helpers import SIGMA_X, decode, linear_gaussian_programs, nonlinear_model, quadrature

from ppl_vae.errors import InputError
from ppl_vae.guides import GaussianGuide
from ppl_vae.importance import _IWAEWindows, log_likelihood, log_likelihood_diagnostics
from ppl_vae.model import FixedGaussianLikelihood, VAEModel
from ppl_vae.networks import MLPDecoder, MLPEncoder


@pytest.mark.parametrize("k", [1, 7, 100])
def test_exact_posterior_guide_gives_the_closed_form_for_any_k(k):
    model, guide, _, x, exact = linear_gaussian_programs()
    est = log_likelihood(model, guide, x, num_samples=k)
    assert est.shape == (6,) and est.dtype == torch.float64
    assert torch.allclose(est, exact, atol=1e-5, rtol=0)


def test_prior_guide_converges_as_k_grows_within_its_standard_error():
    model, _, guide, x, exact = linear_gaussian_programs(sigma=1.5, seed=1)
    small = log_likelihood_diagnostics(model, guide, x, num_samples=10)
    big = log_likelihood_diagnostics(model, guide, x, num_samples=20000)
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
    uneven = log_likelihood_diagnostics(model, guide, x, num_samples=64, chunk_size=24)
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
    r = log_likelihood_diagnostics(model, guide, x, num_samples=3000, iwae_ks=(1, 10, 100))
    assert torch.allclose(r.iwae[1], r.elbo)  # IWAE_1 is the ELBO
    means = [r.elbo.mean(), r.iwae[10].mean(), r.iwae[100].mean(), r.log_px.mean()]
    assert all(a < b for a, b in zip(means[:-1], means[1:], strict=True)), means
    assert ((r.ess >= 1) & (r.ess <= 3000)).all()
    model, exact_guide, _, x, _ = linear_gaussian_programs()
    r = log_likelihood_diagnostics(model, exact_guide, x, num_samples=200)
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
        log_likelihood_diagnostics(model, guide, x, num_samples=5, iwae_ks=(10,))


@pytest.mark.parametrize("sigma", [0.7, 1.5])
def test_iwae_k_that_does_not_divide_k_uses_every_draw_and_keeps_the_order_pointwise(sigma):
    """K = 50 with k = 7 and 30 (and 10, which divides it): elbo <= iwae[k] <= log_px for every
    point, not only on average; 0.1 dropped the K mod k last draws and broke it by 0.5 nats."""
    model, _, guide, x, _ = linear_gaussian_programs(sigma=sigma, n=50)
    for seed in range(5):
        torch.manual_seed(seed)
        r = log_likelihood_diagnostics(model, guide, x, num_samples=50, iwae_ks=(1, 7, 10, 30, 50))
        assert torch.allclose(r.iwae[1], r.elbo) and torch.allclose(r.iwae[50], r.log_px)
        for k in (7, 10, 30):
            assert (r.elbo <= r.iwae[k] + 1e-12).all() and (r.iwae[k] <= r.log_px + 1e-12).all()
        assert (r.iwae[7] < r.iwae[30]).float().mean() > 0.9  # the bound tightens with k


def test_iwae_windows_are_the_cyclic_windows_at_multiples_of_gcd_whatever_the_passes():
    lw = 3 * torch.randn(50, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    for k in (1, 7, 10, 30, 49, 50):
        starts = range(0, 50, math.gcd(50, k))  # k = 10: the 5 disjoint groups
        windows = [lw[[(s + j) % 50 for j in range(k)]] for s in starts]
        exact = torch.stack([torch.logsumexp(w, 0) - math.log(k) for w in windows]).mean(0)
        for passes in ([50], [3] * 16 + [2], [1] * 50, [6, 44]):
            got, done = _IWAEWindows(k, 50), 0
            for c in passes:
                got.add(lw[done : done + c])
                done += c
            assert torch.allclose(got.mean(), exact, rtol=0, atol=1e-12), (k, passes)


def test_chunks_give_the_same_iwae_bounds_for_the_same_draws():
    model, _, guide, x, _ = linear_gaussian_programs(sigma=1.0)
    runs = []
    for chunk in (64, 16):
        torch.manual_seed(2)
        runs.append(
            log_likelihood_diagnostics(
                model, guide, x, num_samples=64, chunk_size=chunk, iwae_ks=(7, 30)
            )
        )
    assert torch.allclose(runs[0].log_px, runs[1].log_px, rtol=0, atol=1e-12)
    for k in (7, 30):
        assert torch.allclose(runs[0].iwae[k], runs[1].iwae[k], rtol=0, atol=1e-12)


def _subsampled_programs(subsample_size):
    """z ~ N(0, 1), x | z ~ N(z, 1) in a data plate of 6 points with ``subsample_size``; the
    guide is the exact posterior of each point of the subsample."""
    x = torch.tensor([-3.0, -1.0, 0.0, 0.5, 2.0, 4.0], dtype=F64)

    def model(x):
        with pyro.plate("data", len(x), subsample_size=subsample_size) as idx:
            z = pyro.sample("z", dist.Normal(torch.zeros(len(idx), dtype=F64), 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x[idx])

    def guide(x):
        with pyro.plate("data", len(x), subsample_size=subsample_size) as idx:
            pyro.sample("z", dist.Normal(x[idx] / 2, 0.5**0.5))

    return model, guide, x


def test_a_subsampled_data_plate_is_refused_against_its_full_size():
    """Each pass of draws would take a new subsample, so one estimate would mix points (0.1:
    0.32 nats from every point's log p(x) with the exact posterior as guide)."""
    model, guide, x = _subsampled_programs(3)
    with pytest.raises(ValueError, match=r"plate 'data' is subsampled \(3 of its 6 points\)"):
        log_likelihood(model, guide, x, num_samples=10, chunk_size=2)
    with pytest.raises(ValueError, match=r"pyro.plate\('data', len\(x\)\) with no subsample"):
        log_likelihood_diagnostics(model, guide, x, num_samples=10)
    model, guide, x = _subsampled_programs(6)  # a "subsample" of every point is the plate
    exact = dist.Normal(0.0, 2**0.5).log_prob(x)
    assert torch.allclose(log_likelihood(model, guide, x, num_samples=4), exact, atol=1e-10)


def test_the_0_1_diagnostics_keyword_still_works_with_a_deprecation_warning():
    model, _, guide, x, _ = linear_gaussian_programs()
    torch.manual_seed(0)
    new = log_likelihood_diagnostics(model, guide, x, num_samples=20, iwae_ks=(1, 3))
    torch.manual_seed(0)
    with pytest.warns(DeprecationWarning, match="use log_likelihood_diagnostics"):
        old = log_likelihood(model, guide, x, num_samples=20, diagnostics=True, iwae_ks=(1, 3))
    assert torch.equal(old.log_px, new.log_px) and torch.equal(old.iwae[3], new.iwae[3])
    torch.manual_seed(0)
    with pytest.warns(DeprecationWarning):
        plain = log_likelihood(model, guide, x, num_samples=20, diagnostics=False)
    assert torch.equal(plain, new.log_px)


def test_iwae_loss_still_takes_the_0_1_data_plate_keyword_with_a_deprecation_warning():
    from ppl_vae.losses import IWAELoss

    with pytest.warns(DeprecationWarning, match=r"IWAELoss\(data_plate=...\) does nothing"):
        loss = IWAELoss(3, data_plate="data")
    assert loss.num_particles == 3
    with pytest.raises(TypeError, match="unexpected keywords"):
        IWAELoss(3, data_plates="data")


def test_vae_model_and_guide():
    from ppl_vae.data import DataConfig, load_data
    from ppl_vae.networks import NetworkConfig
    from ppl_vae.vae import VAEConfig, build_vae

    data = load_data(DataConfig("moons", num_train=100, num_test=50))
    model, guide = build_vae(VAEConfig(latent_dim=2, network=NetworkConfig(hidden=(8,))), data)
    r = log_likelihood_diagnostics(model, guide, data.test, num_samples=500)
    assert r.log_px.shape == (50,) and (r.log_px >= r.elbo).all()


# -- closed forms: with the exact posterior as guide every weight is p(x), for any K ---------------

F64 = torch.float64


def test_masked_entries_and_a_data_plate_at_dim_minus_2():
    """x_ij ~ N(w_j z_i, s^2) on a (points x features) grid with some entries masked out:
    log p(x_i) is the Gaussian marginal of the observed entries alone."""
    g = torch.Generator().manual_seed(0)
    n, d, s = 6, 4, 0.6
    w = torch.randn(d, generator=g, dtype=F64)
    x = torch.randn(n, d, generator=g, dtype=F64)
    mask = torch.rand(n, d, generator=g) < 0.6
    mask[:, 0] = True  # every point keeps one entry

    def model(x):
        with pyro.plate("data", n, dim=-2):
            z = pyro.sample("z", dist.Normal(torch.zeros(n, 1, dtype=F64), 1.0))
            with pyro.plate("features", d, dim=-1), pyro.poutine.mask(mask=mask):
                pyro.sample("x", dist.Normal(z * w, s), obs=x)

    m = mask.to(F64)
    precision = 1 + (m * w**2).sum(1, keepdim=True) / s**2
    mean = (m * w * x).sum(1, keepdim=True) / s**2 / precision

    def guide(x):
        with pyro.plate("data", n, dim=-2):
            pyro.sample("z", dist.Normal(mean, precision.rsqrt()))

    exact = torch.stack([
        dist.MultivariateNormal(
            torch.zeros(int(r.sum()), dtype=F64),
            torch.outer(w[r], w[r]) + s**2 * torch.eye(int(r.sum()), dtype=F64),
        ).log_prob(x[i, r])
        for i, r in enumerate(mask)
    ])  # fmt: skip
    got = log_likelihood(model, guide, x, num_samples=3)
    assert torch.allclose(got, exact, rtol=0, atol=1e-10)
    unmasked = exact.new_tensor(  # what the unmasked model would give: off by whole nats
        [dist.Normal(0, 1).log_prob(torch.tensor(0.0)).item()] * n
    )
    assert (got - unmasked).abs().max() > 0.5


def test_two_dependent_latents():
    """z1 ~ N(0, 1), z2 | z1 ~ N(a z1, t^2), x | z ~ N(b1 z1 + b2 z2, s^2): the guide is the
    exact posterior, q(z1 | x) q(z2 | z1, x), by Gaussian conditioning."""
    a, t, b1, b2, s = 0.8, 0.5, 1.2, -0.7, 0.4
    x = torch.tensor([-1.0, 0.3, 2.2], dtype=F64)
    n = len(x)
    cov_z = torch.tensor([[1.0, a], [a, a * a + t * t]], dtype=F64)
    b = torch.tensor([b1, b2], dtype=F64)
    var_x = b @ cov_z @ b + s * s
    gain = cov_z @ b / var_x  # posterior mean of z = gain * x
    post = cov_z - torch.outer(cov_z @ b, cov_z @ b) / var_x

    def model(x):
        with pyro.plate("data", n):
            z1 = pyro.sample("z1", dist.Normal(torch.zeros(n, dtype=F64), 1.0))
            z2 = pyro.sample("z2", dist.Normal(a * z1, t))
            pyro.sample("x", dist.Normal(b1 * z1 + b2 * z2, s), obs=x)

    def guide(x):
        with pyro.plate("data", n):
            z1 = pyro.sample("z1", dist.Normal(gain[0] * x, post[0, 0].sqrt()))
            cond_mean = gain[1] * x + post[1, 0] / post[0, 0] * (z1 - gain[0] * x)
            cond_sd = (post[1, 1] - post[1, 0] ** 2 / post[0, 0]).sqrt()
            pyro.sample("z2", dist.Normal(cond_mean, cond_sd))

    exact = dist.Normal(0.0, var_x.sqrt()).log_prob(x)
    assert torch.allclose(log_likelihood(model, guide, x, num_samples=5), exact, atol=1e-10)


def test_gamma_poisson_gives_the_negative_binomial():
    a, b = 2.5, 0.7
    x = torch.tensor([0.0, 1.0, 4.0, 9.0], dtype=F64)
    n = len(x)

    def model(x):
        with pyro.plate("data", n):
            rate = pyro.sample("rate", dist.Gamma(torch.full((n,), a, dtype=F64), b))
            pyro.sample("x", dist.Poisson(rate), obs=x)

    def guide(x):
        with pyro.plate("data", n):
            pyro.sample("rate", dist.Gamma(a + x, b + 1.0))

    exact = (
        torch.lgamma(a + x) - math.lgamma(a) - torch.lgamma(x + 1)
        + a * math.log(b / (b + 1)) - x * math.log(b + 1)
    )  # fmt: skip
    assert torch.allclose(log_likelihood(model, guide, x, num_samples=4), exact, atol=1e-10)


def test_dirichlet_multinomial():
    alpha = torch.tensor([0.5, 1.5, 3.0], dtype=F64)
    counts = torch.tensor([[3.0, 0.0, 2.0], [0.0, 0.0, 5.0], [1.0, 2.0, 2.0]], dtype=F64)
    n, total = len(counts), 5

    def model(c):
        with pyro.plate("data", n):
            probs = pyro.sample("probs", dist.Dirichlet(alpha.expand(n, 3)))
            pyro.sample("c", dist.Multinomial(total, probs), obs=c)

    def guide(c):
        with pyro.plate("data", n):
            pyro.sample("probs", dist.Dirichlet(alpha + c))

    exact = (
        math.lgamma(total + 1) - torch.lgamma(counts + 1).sum(1)
        + torch.lgamma(alpha.sum()) - torch.lgamma(total + alpha.sum())
        + (torch.lgamma(counts + alpha) - torch.lgamma(alpha)).sum(1)
    )  # fmt: skip
    got = log_likelihood(model, guide, counts, num_samples=4)
    assert torch.allclose(got, exact, atol=1e-9)


def test_obs_mask_scores_the_observed_entries_only():
    """pyro.sample(obs_mask=m) with the missing entries drawn by the guide from their exact
    conditional: log p(x_i) is the density of the observed entries."""
    x = torch.tensor([0.4, -1.3, 2.0, 0.1], dtype=F64)
    mask = torch.tensor([True, False, True, False])
    n, s = len(x), 0.5

    def model(x):
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Normal(torch.zeros(n, dtype=F64), 1.0))
            pyro.sample("x", dist.Normal(z, s), obs=x, obs_mask=mask)

    prec = 1 + mask.to(F64) / s**2

    def guide(x):
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Normal(torch.where(mask, x, 0.0) / s**2 / prec, prec.rsqrt()))
            with pyro.poutine.mask(mask=~mask):
                pyro.sample("x_unobserved", dist.Normal(z, s))

    exact = torch.where(mask, dist.Normal(0.0, (1 + s**2) ** 0.5).log_prob(x), 0.0)
    assert torch.allclose(log_likelihood(model, guide, x, num_samples=3), exact, atol=1e-10)


def _tiny_vae():
    torch.manual_seed(0)
    model = VAEModel(MLPDecoder(2, [3], [4], "tanh"), FixedGaussianLikelihood([3]), 2, [3])
    return model, GaussianGuide(MLPEncoder([3], [4], "tanh"), 2)


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.zeros(3), r"takes a batch of shape \(N, 3\), got shape \(3,\) \(one point"),
        (torch.zeros(4, 5), r"the model takes a batch of shape \(N, 3\), got shape \(4, 5\)"),
        (torch.zeros(0, 3), r"x is empty \(shape \(0, 3\)\); pass at least one data point"),
        (torch.zeros(4, 3, dtype=torch.long), "x has dtype torch.int64, the model's parameters "
         r"torch.float32; pass x.to\(torch.float32\)"),
        (torch.zeros(4, 3, dtype=torch.float64), "x has dtype torch.float64, the model's"),
        (torch.zeros(4, 3, device="meta"), "x is on meta, the model's parameters on cpu; pass"),
    ],
)  # fmt: skip
def test_log_likelihood_refuses_points_the_model_cannot_take(x, message):
    model, guide = _tiny_vae()
    for estimate in (log_likelihood, log_likelihood_diagnostics):
        with pytest.raises(InputError, match=message) as e:
            estimate(model, guide, x, num_samples=4)
        assert "\n" not in str(e.value)  # raised before any trace adds its shapes


def test_log_likelihood_takes_numpy_points_as_the_tensors_they_hold():
    model, guide = _tiny_vae()
    x = np.random.default_rng(0).normal(size=(4, 3))  # float64, as NumPy makes them
    pyro.set_rng_seed(1)
    from_numpy = log_likelihood(model, guide, x, num_samples=8)
    pyro.set_rng_seed(1)
    assert torch.equal(
        from_numpy, log_likelihood(model, guide, torch.tensor(x).float(), num_samples=8)
    )


def test_log_likelihood_of_a_model_that_observes_nothing_is_refused():
    def model(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(
        InputError, match=r"the model observes nothing \(no pyro.sample\(\.\.\., obs"
    ):
        log_likelihood(model, guide, torch.zeros(3), num_samples=2)
