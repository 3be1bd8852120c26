"""The Gaussian mixture against scikit-learn, closed forms and torch.distributions; CUDA."""

import math
import warnings

import numpy as np
import pytest
import torch
from helpers import blobs, record_sources, sklearn_agreement

from ppl_vae.data import DataConfig, load_data
from ppl_vae.errors import InputError
from ppl_vae.mixture import (
    COVARIANCE_TYPES,
    INITS,
    BernoulliMixture,
    ConvergenceWarning,
    GaussianMixture,
)

F64 = torch.float64

# many fits here run a fixed number of iterations (tol=0) and so end unconverged; the tests of
# the warning itself catch it with pytest.warns, which sees warnings whatever the filters
pytestmark = pytest.mark.filterwarnings("ignore::ppl_vae.mixture.ConvergenceWarning")


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
    gm.fit(t(x), **_start(w, m, p))
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
    gm = GaussianMixture(4, covariance_type, tol=1e-3, max_iter=200).fit(t(x), **_start(w, m, p))
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


def _start(w, m, p):
    """The keyword arguments of fit that start EM from the given (NumPy) parameters."""
    t = torch.from_numpy
    return {"weights_init": t(w), "means_init": t(m), "precisions_init": t(p)}


def _same_start(covariance_type, **kwargs):
    """scikit-learn's GaussianMixture and ours with blobs' shared start, and the data."""
    mixture = pytest.importorskip("sklearn.mixture")
    x, w, m, p = blobs(**kwargs)
    p = p[covariance_type]
    t = torch.from_numpy

    def sklearn(**settings):
        return mixture.GaussianMixture(
            4, covariance_type=covariance_type, weights_init=w, means_init=m,
            precisions_init=p, **settings,
        )  # fmt: skip

    def ours(**settings):
        gm = GaussianMixture(4, covariance_type, **settings)
        return gm, (t(x), _start(w, m, p))

    return x, sklearn, ours


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("max_iter, tol", [(2, 1e-7), (2, 1e-1), (300, 1e-7), (300, 1e-1)])
def test_fit_predict_labels_are_the_fitted_model_s_as_in_sklearn(covariance_type, max_iter, tol):
    # scikit-learn's own scenario (test_gaussian_mixture_fit_predict): strict and loose
    # non-convergence and convergence; fit_predict(x) must equal fit(x).predict(x)
    x, sklearn, ours = _same_start(covariance_type)
    gm, (xt, start) = ours(max_iter=max_iter, tol=tol)
    labels = gm.fit_predict(xt, **start)
    again, _ = ours(max_iter=max_iter, tol=tol)
    assert torch.equal(labels, again.fit(xt, **start).predict(xt))
    sk = sklearn(max_iter=max_iter, tol=tol)
    np.testing.assert_array_equal(labels.numpy(), sk.fit_predict(x))
    assert gm.n_iter_ == sk.n_iter_
    if max_iter == 2:  # the labels of the E-step before the last M-step are not these
        stale, _ = ours(max_iter=1, tol=0)
        assert (stale.fit(xt, **start).predict(xt) != labels).sum() > 10


@pytest.mark.parametrize("covariance_type", ["full", "tied"])
def test_bic_picks_the_true_number_of_components_as_sklearn_does(covariance_type):
    mixture = pytest.importorskip("sklearn.mixture")
    x = blobs(k=3)[0]  # three clusters sharing one anisotropic covariance
    ks = range(1, 7)
    ours = [GaussianMixture(k, covariance_type, n_init=2, seed=0).fit(x).bic(x) for k in ks]
    theirs = [
        mixture.GaussianMixture(k, covariance_type=covariance_type, n_init=2, random_state=0)
        .fit(x)
        .bic(x)
        for k in ks
    ]
    assert np.argmin(ours) + 1 == np.argmin(theirs) + 1 == 3
    assert min(b for b in ours if b != ours[2]) - ours[2] > 10  # not a close call


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_bic_and_aic_equal_sklearn_on_the_same_fit(covariance_type):
    x, sklearn, ours = _same_start(covariance_type)
    sk = sklearn(tol=0, max_iter=25).fit(x)
    gm, (xt, start) = ours(tol=0, max_iter=25)
    gm.fit(xt, **start)
    assert gm._n_parameters() == sk._n_parameters()
    assert gm.bic(xt) == pytest.approx(sk.bic(x), rel=1e-8)
    assert gm.aic(xt) == pytest.approx(sk.aic(x), rel=1e-8)
    # from the definitions: -2 log L + P log N and -2 log L + 2 P
    n, log_l = len(x), gm.score_samples(xt).sum().item()
    p = gm._n_parameters()
    assert gm.bic(xt) == pytest.approx(-2 * log_l + p * math.log(n), rel=1e-12)
    assert gm.aic(xt) == pytest.approx(-2 * log_l + 2 * p, rel=1e-12)


def test_the_number_of_parameters_is_sklearn_s_count():
    # K = 2 components in D = 5 (scikit-learn's test_gaussian_mixture_n_parameters)
    x = torch.randn(50, 5, generator=torch.Generator().manual_seed(0), dtype=F64)
    expected = {"spherical": 13, "diag": 21, "tied": 26, "full": 41}
    for covariance_type, count in expected.items():
        gm = GaussianMixture(2, covariance_type, seed=0).fit(x)
        assert gm._n_parameters() == count


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_convergence_warning_follows_sklearn(covariance_type):
    from sklearn.exceptions import ConvergenceWarning as SklearnConvergenceWarning

    x, sklearn, ours = _same_start(covariance_type)
    assert issubclass(ConvergenceWarning, UserWarning)
    for settings in ({"max_iter": 2, "tol": 1e-3}, {"max_iter": 3, "tol": 0}):
        gm, (xt, start) = ours(**settings)
        with pytest.warns(ConvergenceWarning, match="max_iter=.*raise max_iter or tol, or reg_co"):
            gm.fit(xt, **start)
        assert gm.converged_ is False
        with pytest.warns(SklearnConvergenceWarning):
            sklearn(**settings).fit(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither warns: converged, or no iteration asked
        gm, (xt, start) = ours(max_iter=300, tol=1e-3)
        sk = sklearn(max_iter=300, tol=1e-3).fit(x)
        assert gm.fit(xt, **start).converged_ and sk.converged_ and gm.n_iter_ == sk.n_iter_
        gm, (xt, start) = ours(max_iter=0)
        assert gm.fit(xt, **start).converged_ is False
        # scikit-learn 1.9.1 fails on max_iter=0 with all three initial parameters given (it
        # never sets covariances_); its own test of max_iter=0 gives the means only
        sk = sklearn(max_iter=0).set_params(weights_init=None, precisions_init=None).fit(x)
        assert sk.converged_ is False


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_warm_start_continues_as_sklearn_does(covariance_type):
    x, sklearn, ours = _same_start(covariance_type)
    sk = sklearn(tol=0, max_iter=3, warm_start=True)
    gm, (xt, start) = ours(tol=0, max_iter=3, warm_start=True)
    sk.fit(x).fit(x)
    gm.fit(xt, **start)
    gm.fit(xt)  # the initial parameters are not given again
    straight, _ = ours(tol=0, max_iter=6)
    straight.fit(xt, **start)
    for name in ("weights_", "means_", "covariances_"):
        np.testing.assert_allclose(getattr(gm, name).numpy(), getattr(sk, name), rtol=1e-9)
        assert torch.allclose(getattr(gm, name), getattr(straight, name), rtol=1e-12)
    # scikit-learn's test_convergence_detected_with_warm_start: one iteration per fit, the
    # change measured from the last fit's lower bound; both converge on the same fit
    sk = sklearn(tol=1e-3, max_iter=1, warm_start=True)
    gm, (xt, start) = ours(tol=1e-3, max_iter=1, warm_start=True)
    fits = {}
    for name, fit in (("sklearn", lambda: sk.fit(x)), ("ours", lambda: gm.fit(xt, **start))):
        for count in range(1, 300):
            if fit().converged_:
                fits[name] = count
                break
    assert fits["ours"] == fits["sklearn"] > 5 and gm.n_iter_ == 1


def test_agreement_with_sklearn_is_as_docs_results_says():
    pytest.importorskip("sklearn")
    # docs/RESULTS.md (mixture section) gives these figures; the bounds leave a margin
    ordinary = sklearn_agreement(0.0)
    assert ordinary["ours-sklearn", "score"] < 1e-13
    assert ordinary["ours-sklearn", "parameters"] < 1e-10
    assert ordinary["ours-sklearn", "history"] < 1e-11
    # 1e4 away from the origin scikit-learn loses digits; ours (centred first) does not
    offset = sklearn_agreement(1e4)
    assert offset["ours-reference", "score"] < 1e-12
    assert offset["ours-reference", "parameters"] < 1e-8
    assert offset["sklearn-reference", "parameters"] > 1e-7
    assert offset["sklearn-reference", "score"] > 100 * offset["ours-reference", "score"]


def test_verbose_prints_progress_like_sklearn(capsys):
    x, w, m, p = blobs()
    t = torch.from_numpy
    xt, start = t(x), _start(w, m, p["full"])
    GaussianMixture(4, tol=0, max_iter=7, verbose_interval=3).fit(xt, **start)
    assert capsys.readouterr().out == ""
    GaussianMixture(4, tol=0, max_iter=7, verbose=1, verbose_interval=3).fit(xt, **start)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "initialisation 1 of 1",
        "  iteration 3",
        "  iteration 6",
        "initialisation 1: did not converge",
    ]
    GaussianMixture(4, max_iter=200, verbose=2, n_init=2, seed=0).fit(t(x))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "initialisation 1 of 2" and "initialisation 2 of 2" in lines
    steps = [line for line in lines if line.startswith("  iteration")]
    assert steps and all(" s since the last line, change " in line for line in steps)
    ends = [line for line in lines if line.startswith("initialisation") and "converged" in line]
    assert len(ends) == 2 and all("lower bound -" in line for line in ends)


def test_lists_and_integers_are_fitted_in_float64_and_list_starts_are_not_rounded():
    x, w, m, p = blobs()
    t = torch.from_numpy
    start = {"weights_init": w, "means_init": m, "precisions_init": p["full"]}
    as_lists = {name: a.tolist() for name, a in start.items()}
    listed = GaussianMixture(4, tol=0, max_iter=5).fit(x.tolist(), **as_lists)
    array = GaussianMixture(4, tol=0, max_iter=5).fit(t(x), **_start(w, m, p["full"]))
    assert listed.means_.dtype == F64 and torch.equal(listed.means_, array.means_)
    start = GaussianMixture(4, max_iter=0).fit(x, **as_lists)
    assert torch.equal(start.means_, t(m))  # float64 throughout, not through float32
    assert torch.equal(start.precisions_, t(p["full"]))
    start32 = GaussianMixture(4, max_iter=0).fit(
        t(x).float(), weights_init=w.tolist(), means_init=m.tolist()
    )
    assert start32.means_.dtype == torch.float32
    assert torch.equal(start32.means_, t(m).float())  # rounded once, to the fitted dtype
    rounded = GaussianMixture(4, max_iter=0).fit(np.rint(x).astype(np.int64))
    assert rounded.means_.dtype == F64  # as scikit-learn: integer input is fitted in float64


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
    start = {"weights_init": w, "means_init": m, "precisions_init": p}
    g32 = GaussianMixture(8, tol=0, max_iter=30).fit(x, **start)
    start64 = {name: a.double() for name, a in start.items()}
    g64 = GaussianMixture(8, tol=0, max_iter=30).fit(x.double(), **start64)
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
            torch.from_numpy(x).to(dtype),
            **{name: a.to(dtype) for name, a in _start(w, m, p).items()},
        )
        for dtype in (torch.float32, torch.float64)
    }
    s32 = fits[torch.float32].score(torch.from_numpy(x).float())
    s64 = fits[torch.float64].score(torch.from_numpy(x))
    assert abs(s32 - s64) < 1e-5 * abs(s64)


def test_tol_zero_runs_exactly_max_iter_and_max_iter_zero_keeps_the_start():
    x, w, m, p = blobs()
    t = torch.from_numpy
    gm = GaussianMixture(4, tol=0, max_iter=7).fit(t(x), **_start(w, m, p["full"]))
    assert gm.n_iter_ == 7 and len(gm.history_) == 7 and not gm.converged_
    start = GaussianMixture(4, max_iter=0).fit(t(x), **_start(w, m, p["full"]))
    assert torch.equal(start.means_, t(m)) and start.history_ == [] and start.n_iter_ == 0
    assert torch.allclose(start.precisions_, t(p["full"]))
    assert torch.allclose(start.covariances_, torch.linalg.inv(t(p["full"])))


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_samples_have_the_mixture_moments(covariance_type):
    x, w, m, p = blobs()
    t = torch.from_numpy
    gm = GaussianMixture(4, covariance_type, max_iter=5).fit(
        t(x), **_start(w, m, p[covariance_type])
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
            GaussianMixture(2, covariance_type, seed=0).fit(torch.cat([t, t], 1))
        # and the suggested fix works: a reg_covar that is not lost against 1e24
        GaussianMixture(2, covariance_type, reg_covar=1e12, seed=0).fit(torch.cat([t, t], 1))


# -- CUDA ------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_same_fit_on_cuda_and_cpu(dtype):
    x, w, m, p = (torch.from_numpy(a).to(dtype) for a in blobs()[:3] + (blobs()[3]["full"],))
    start = {"weights_init": w, "means_init": m, "precisions_init": p}
    cpu = GaussianMixture(4, tol=0, max_iter=10).fit(x, **start)
    on_gpu = {name: a.cuda() for name, a in start.items()}
    gpu = GaussianMixture(4, tol=0, max_iter=10).fit(x.cuda(), **on_gpu)
    assert gpu.means_.is_cuda and gpu.means_.dtype == dtype
    rel = 1e-4 if dtype == torch.float32 else 1e-10
    assert gpu.score(x.cuda()) == pytest.approx(cpu.score(x), rel=rel)
    assert torch.allclose(gpu.means_.cpu(), cpu.means_, rtol=rel * 10, atol=rel * 10)
    xb = torch.bernoulli(torch.full((500, 20), 0.3, dtype=dtype))
    bm = BernoulliMixture(3, seed=0, max_iter=5, init="random").fit(xb.cuda())
    assert bm.means_.is_cuda and bm.score(xb) < 0


# -- the computations -----------------------------------------------------------------------------


def test_full_and_diag_statistics_are_made_per_chunk(monkeypatch):
    from ppl_vae.mixture.covariances import computation

    x = torch.randn(50, 5, dtype=F64)
    rows, cols = torch.triu_indices(5, 5)
    expected = {
        "full": torch.cat([x, x[:, rows] * x[:, cols]], 1),
        "diag": torch.cat([x, x * x], 1),
    }
    expected["tied"] = expected["full"]
    for covariance_type, want in expected.items():
        made = computation(covariance_type, F64)
        work = torch.full((want.numel() + 7,), float("nan"), dtype=F64)  # a pass's work space
        for stats in (made.statistics(x), made.statistics(x, work)):
            if covariance_type == "diag":  # (x, x^2): x itself, its square in the work space
                assert stats.x is x and stats.shape == want.shape
                stats = torch.cat(stats, 1)
            assert torch.equal(stats, want), covariance_type
    assert computation("diag", F64).statistics(x, work).square.data_ptr() == work.data_ptr()
    # full and diag keep no cache of the statistics; spherical's (D + 1 values) stays
    made = record_sources(monkeypatch)
    x, w, m, p = blobs()
    for covariance_type in ("full", "diag", "spherical"):
        GaussianMixture(4, covariance_type, tol=0, max_iter=2).fit(torch.from_numpy(x))
    assert made[0].cached is None and made[1].cached is None and made[2].cached is not None


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_diag_joint_and_sums_equal_the_products_with_the_whole_statistics(dtype):
    """The diagonal E-step and M-step sums, made from x and x^2 apart, equal A T(x)^T + b and
    r T(x) with T(x) = (x, x^2) as one (n, 2 D) tensor, in float64."""
    from ppl_vae.mixture.chunks import PassSpace
    from ppl_vae.mixture.covariances import computation

    g = torch.Generator().manual_seed(0)
    k, d, n = 5, 7, 300
    x = torch.randn(n, d, generator=g, dtype=dtype)
    weights = torch.softmax(torch.randn(k, generator=g, dtype=dtype), 0)
    mu, u = torch.randn(k, d, generator=g, dtype=dtype), torch.rand(k, d, generator=g, dtype=dtype)
    made = computation("diag", dtype)
    natural = made.natural(weights, mu, u + 0.5)  # A's halves for x and x^2 apart, and b
    a, b = torch.cat(natural[:2], 1), natural[2]
    stats = made.statistics(x)
    whole = torch.cat([x, x * x], 1).double()
    space = PassSpace(k, n, x)
    for out in (None, space.joint):
        joint = made.joint(stats, natural, out)
        want = whole @ a.double().T + b.double()
        assert joint.shape == (k, n) and torch.allclose(joint.double(), want.T, rtol=1e-5)
    resp = torch.softmax(joint, 0)
    sums = made.sums(resp, stats, centre=None).double()
    bound = n * torch.finfo(dtype).eps * (resp.double() @ whole.abs())  # a sum's rounding
    assert sums.shape == (k, 2 * d) and ((sums - resp.double() @ whole).abs() <= bound).all()


@pytest.mark.parametrize("block", [None, 37])
@pytest.mark.parametrize("kept", ["all pairs", "one component each", "a few pairs each"])
def test_float32_scatter_sums_equal_the_explicit_sums_in_float64(kept, block, monkeypatch):
    from ppl_vae.mixture.covariances import computation

    if block is not None:  # the chunk's (K, rows, D) differences made in blocks of 37 rows
        monkeypatch.setattr("ppl_vae.mixture.covariances.chunk_rows", lambda width, x: block)

    g = torch.Generator().manual_seed(0)
    k, d, n = 10, 4, 300  # two of ten components each: a fifth of the pairs (the sparse path)
    x = torch.randn(n, d, generator=g) + 3
    c = torch.randn(k, d, generator=g)
    resp = torch.softmax(4 * torch.randn(k, n, generator=g), 0)
    if kept != "all pairs":  # the rest far below float32's resolution, or exactly zero
        top = resp.topk(1 if kept == "one component each" else 2, 0).indices
        mask = torch.zeros_like(resp, dtype=torch.bool).scatter_(0, top, True)
        resp = torch.where(mask, resp, resp * 1e-20)
        resp[:, ::7] = torch.where(mask[:, ::7], resp[:, ::7], 0.0)
        resp = resp / resp.sum(0)
    sums = computation("full", torch.float32).sums(resp, x, lambda: c)
    r, x64, c64 = resp.double(), x.double(), c.double()
    z = x64.unsqueeze(0) - c64.unsqueeze(1)  # (k, n, d)
    scatter = torch.einsum("kn,kni,knj->kij", r, z, z)
    expected = torch.cat([r @ x64, scatter.flatten(1)], 1)
    assert torch.allclose(sums.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max())


@pytest.mark.parametrize("d, bands", [(3, 1), (24, 3)])
@pytest.mark.parametrize("covariance_type", ["full", "tied"])
def test_float32_scatter_joint_in_blocks_equals_the_log_densities_in_float64(
    covariance_type, d, bands, monkeypatch
):
    from ppl_vae.mixture.covariances import computation

    # the (n, K D) product of a chunk is made in blocks of 37 rows (the last one shorter), and
    # for D = 24 in bands of 8 columns of each U_k, each from the rows of U it needs
    monkeypatch.setattr("ppl_vae.mixture.covariances.chunk_rows", lambda width, x: 37)
    g = torch.Generator().manual_seed(1)
    k, n = 5, 200
    x = torch.randn(n, d, generator=g, dtype=F64)
    mu = torch.randn(k, d, generator=g, dtype=F64)
    a = torch.randn(k, d, d, generator=g, dtype=F64)
    cov = a @ a.mT + 0.5 * torch.eye(d, dtype=F64)
    if covariance_type == "tied":
        cov = cov[0]
    weights = torch.softmax(torch.randn(k, generator=g, dtype=F64), 0)
    lower = torch.linalg.cholesky(cov)
    u = torch.linalg.solve_triangular(lower, torch.eye(d, dtype=F64), upper=False).mT
    made = computation(covariance_type, torch.float32)
    natural = made.natural(*(t.float() for t in (weights, mu, u)))
    assert len(natural[-1]) == bands
    joint = made.joint(x.float(), natural)
    normal = torch.distributions.MultivariateNormal(mu, scale_tril=lower.expand(k, d, d))
    expected = weights.log()[:, None] + normal.log_prob(x.unsqueeze(1)).T
    assert joint.shape == (k, n)
    assert torch.allclose(joint.double(), expected, rtol=1e-5, atol=1e-5)
