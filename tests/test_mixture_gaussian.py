"""The Gaussian mixture against scikit-learn, closed forms and torch.distributions; CUDA."""

import numpy as np
import pytest
import torch
from helpers import blobs

from ppl_vae.data import DataConfig, load_data
from ppl_vae.errors import InputError
from ppl_vae.mixture import COVARIANCE_TYPES, INITS, BernoulliMixture, GaussianMixture

F64 = torch.float64


# -- agreement with scikit-learn -------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("iterations", [1, 25])
def test_the_same_iterations_from_the_same_start_agree_with_sklearn(covariance_type, iterations):
    mixture = pytest.importorskip("sklearn.mixture")
    x, w, m, p = blobs()
    p = p[covariance_type]
    sk = mixture.GaussianMixture(
        4, covariance_type=covariance_type, tol=0, max_iter=iterations,
        weights_init=w, means_init=m, precisions_init=p,
    ).fit(x)  # fmt: skip
    t = torch.from_numpy
    gm = GaussianMixture(4, covariance_type, tol=0, max_iter=iterations)
    gm.fit(t(x), t(w), t(m), t(p))
    assert gm.n_iter_ == sk.n_iter_ == iterations and gm.converged_ is False
    ours, theirs = gm.score(t(x)), sk.score(x)
    assert abs(ours - theirs) <= 1e-6 * abs(theirs)
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_", "precisions_"):
        np.testing.assert_allclose(getattr(gm, name).numpy(), getattr(sk, name), rtol=1e-6)
    if hasattr(sk, "lower_bounds_"):  # scikit-learn >= 1.6
        np.testing.assert_allclose(gm.history_, sk.lower_bounds_, rtol=1e-9)
    np.testing.assert_allclose(gm.score_samples(t(x)).numpy(), sk.score_samples(x), rtol=1e-9)
    np.testing.assert_allclose(gm.predict_proba(t(x)).numpy(), sk.predict_proba(x), atol=1e-9)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_convergence_follows_sklearn_tol_rule(covariance_type):
    mixture = pytest.importorskip("sklearn.mixture")
    x, w, m, p = blobs(seed=1)
    p = p[covariance_type]
    sk = mixture.GaussianMixture(
        4, covariance_type=covariance_type, tol=1e-3, max_iter=200,
        weights_init=w, means_init=m, precisions_init=p,
    ).fit(x)  # fmt: skip
    t = torch.from_numpy
    gm = GaussianMixture(4, covariance_type, tol=1e-3, max_iter=200).fit(t(x), t(w), t(m), t(p))
    assert (gm.n_iter_, gm.converged_) == (sk.n_iter_, sk.converged_) and gm.converged_
    assert abs(gm.lower_bound_ - sk.lower_bound_) < 1e-9 * abs(sk.lower_bound_)
    assert abs(gm.history_[-1] - gm.history_[-2]) < 1e-3 <= abs(gm.history_[-2] - gm.history_[-3])


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("init", INITS)
def test_em_never_decreases_the_log_likelihood(covariance_type, init):
    x = load_data(DataConfig("pinwheel", num_train=1500, num_test=10)).train.double()
    gm = GaussianMixture(6, covariance_type, tol=0, max_iter=40, init=init, seed=0).fit(x)
    history = torch.tensor(gm.history_)
    assert len(history) == 40 and (history.diff() >= -1e-9).all()
    assert history[-1] > history[0] or init == "random"  # random: may sit at a saddle
    # the last M-step improved on the last recorded value too
    assert gm.score(x) >= history[-1] - 1e-9


# -- densities, float32, samples -------------------------------------------------------------------


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_log_density_matches_torch_distributions_and_integrates_to_one(covariance_type):
    x = load_data(DataConfig("moons", num_train=800, num_test=10)).train.double()
    gm = GaussianMixture(3, covariance_type, seed=0).fit(x)
    grid = torch.cartesian_prod(*[torch.linspace(-5, 5, 301, dtype=F64)] * 2)
    log_p = gm.score_samples(grid)
    assert torch.allclose(log_p, gm.distribution().log_prob(grid), atol=1e-10)
    assert log_p.exp().sum().item() * (10 / 300) ** 2 == pytest.approx(1.0, abs=2e-3)
    proba = gm.predict_proba(x)
    assert torch.allclose(proba.sum(1), torch.ones(len(x), dtype=F64))
    assert torch.equal(gm.predict(x), proba.argmax(1))


def test_float32_follows_float64_and_keeps_its_dtype():
    x = load_data(DataConfig("ring8", num_train=2000, num_test=10)).train
    w, m = torch.full((8,), 1 / 8), x[:8]
    p = torch.eye(2).expand(8, 2, 2)
    g32 = GaussianMixture(8, tol=0, max_iter=30).fit(x, w, m, p)
    g64 = GaussianMixture(8, tol=0, max_iter=30).fit(x.double(), w.double(), m.double(), p.double())
    assert g32.means_.dtype == g32.covariances_.dtype == torch.float32
    assert g32.score(x) == pytest.approx(g64.score(x.double()), rel=1e-4)
    assert torch.allclose(g32.means_.double(), g64.means_, atol=1e-3)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_float32_is_accurate_for_thin_components_far_from_the_data_mean(covariance_type):
    # thin, randomly oriented components whose means lie far out in Mahalanobis terms: the
    # moment expansion x'Px - 2x'Pmu + mu'Pmu loses ~1e-4 here in float32 (full/tied are
    # therefore centred per component in float32, as scikit-learn does)
    rng = np.random.default_rng(1)
    k, d = 4, 8
    factors = rng.normal(size=(k, d, d)) / np.sqrt(d)
    z = rng.integers(k, size=4000)
    x = 4 * rng.normal(size=(k, d))[z] + np.einsum(
        "nij,nj->ni", factors[z], rng.normal(size=(4000, d))
    )
    w, m = np.full(k, 1 / k), x[:k]
    p = {"full": np.repeat(np.linalg.inv(np.cov(x.T))[None], k, 0), "diag": np.ones((k, d))}
    p = {**p, "tied": p["full"][0], "spherical": np.ones(k)}[covariance_type]
    fits = {
        dtype: GaussianMixture(k, covariance_type, tol=0, max_iter=30).fit(
            *(torch.from_numpy(a).to(dtype) for a in (x, w, m, p))
        )
        for dtype in (torch.float32, torch.float64)
    }
    s32 = fits[torch.float32].score(torch.from_numpy(x).float())
    s64 = fits[torch.float64].score(torch.from_numpy(x))
    assert abs(s32 - s64) < 1e-5 * abs(s64)


def test_tol_zero_runs_exactly_max_iter_and_max_iter_zero_keeps_the_start():
    x, w, m, p = blobs()
    t = torch.from_numpy
    gm = GaussianMixture(4, tol=0, max_iter=7).fit(t(x), t(w), t(m), t(p["full"]))
    assert gm.n_iter_ == 7 and len(gm.history_) == 7 and not gm.converged_
    start = GaussianMixture(4, max_iter=0).fit(t(x), t(w), t(m), t(p["full"]))
    assert torch.equal(start.means_, t(m)) and start.history_ == [] and start.n_iter_ == 0
    assert torch.allclose(start.precisions_, t(p["full"]))
    assert torch.allclose(start.covariances_, torch.linalg.inv(t(p["full"])))


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_samples_have_the_mixture_moments(covariance_type):
    x, w, m, p = blobs()
    t = torch.from_numpy
    gm = GaussianMixture(4, covariance_type, max_iter=5).fit(
        t(x), t(w), t(m), t(p[covariance_type])
    )
    draws, labels = gm.sample(40_000, generator=torch.Generator().manual_seed(0))
    assert draws.shape == (40_000, 3) and labels.shape == (40_000,)
    freq = torch.bincount(labels, minlength=4).double() / 40_000
    assert torch.allclose(freq, gm.weights_, atol=4 * 0.5 / 200)
    cov = gm.covariances_.expand(4, 3, 3) if covariance_type == "tied" else gm.covariances_
    if covariance_type in ("diag", "spherical"):
        cov = torch.diag_embed(cov if cov.dim() == 2 else cov[:, None].expand(4, 3))
    mean = (gm.weights_[:, None] * gm.means_).sum(0)
    spread = gm.means_ - mean
    total = (gm.weights_[:, None, None] * (cov + spread[:, :, None] * spread[:, None, :])).sum(0)
    se = (total.diagonal() / 40_000).sqrt()
    assert ((draws.mean(0) - mean).abs() < 4 * se).all()
    assert torch.allclose(torch.cov(draws.T), total, rtol=0.05, atol=0.05 * total.abs().max())
    a, _ = gm.sample(5, generator=torch.Generator().manual_seed(1))
    b, _ = gm.sample(5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


# -- singular covariances --------------------------------------------------------------------------


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_a_covariance_that_stays_singular_asks_for_a_larger_reg_covar(covariance_type):
    constant = torch.ones(50, 2, dtype=F64)
    with pytest.raises(InputError, match="even with reg_covar=0; increase reg_covar"):
        GaussianMixture(1, covariance_type, reg_covar=0).fit(constant)
    if covariance_type in ("full", "tied"):  # two identical columns at 1e12: 1e-6 is lost
        t = torch.randn(200, 1, generator=torch.Generator().manual_seed(0), dtype=F64) * 1e12
        with pytest.raises(InputError, match="singular even with reg_covar=1e-06"):
            GaussianMixture(2, covariance_type).fit(torch.cat([t, t], 1))
        # and the suggested fix works: a reg_covar that is not lost against 1e24
        GaussianMixture(2, covariance_type, reg_covar=1e12).fit(torch.cat([t, t], 1))


# -- CUDA ------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_same_fit_on_cuda_and_cpu(dtype):
    x, w, m, p = (torch.from_numpy(a).to(dtype) for a in blobs()[:3] + (blobs()[3]["full"],))
    cpu = GaussianMixture(4, tol=0, max_iter=10).fit(x, w, m, p)
    gpu = GaussianMixture(4, tol=0, max_iter=10).fit(x.cuda(), w.cuda(), m.cuda(), p.cuda())
    assert gpu.means_.is_cuda and gpu.means_.dtype == dtype
    rel = 1e-4 if dtype == torch.float32 else 1e-10
    assert gpu.score(x.cuda()) == pytest.approx(cpu.score(x), rel=rel)
    assert torch.allclose(gpu.means_.cpu(), cpu.means_, rtol=rel * 10, atol=rel * 10)
    xb = torch.bernoulli(torch.full((500, 20), 0.3, dtype=dtype))
    bm = BernoulliMixture(3, seed=0, max_iter=5, init="random").fit(xb.cuda())
    assert bm.means_.is_cuda and bm.score(xb) < 0
