"""EM mixtures against scikit-learn, closed forms and torch.distributions; bad input; the CLI."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import needs_mnist

from ppl_vae.cli import main
from ppl_vae.data import DataConfig, load_data
from ppl_vae.mixture import COVARIANCE_TYPES, INITS, BernoulliMixture, GaussianMixture

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64


def blobs(n=600, d=3, k=4, seed=0):
    """Four anisotropic, offset clusters (float64), with shared initial parameters."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    x += 5 * rng.normal(size=(k, d))[rng.integers(k, size=n)] + 10
    weights = np.full(k, 1 / k)
    means = x[rng.choice(n, k, replace=False)]
    a = rng.normal(size=(k, d, d))
    precisions = {
        "full": np.eye(d) + 0.1 * a @ a.transpose(0, 2, 1),
        "tied": np.eye(d) + 0.1 * a[0] @ a[0].T,
        "diag": 0.5 + rng.random((k, d)),
        "spherical": 0.5 + rng.random(k),
    }
    return x, weights, means, precisions


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


def test_warm_start_continues_where_the_last_fit_stopped():
    x, w, m, p = blobs()
    t = torch.from_numpy
    straight = GaussianMixture(4, tol=0, max_iter=10).fit(t(x), t(w), t(m), t(p["full"]))
    warm = GaussianMixture(4, tol=0, max_iter=4, warm_start=True)
    warm.fit(t(x), t(w), t(m), t(p["full"]))
    warm.max_iter = 6
    warm.fit(t(x))
    assert torch.allclose(warm.means_, straight.means_, rtol=1e-10)
    np.testing.assert_allclose(warm.history_, straight.history_[4:], rtol=1e-12)


def test_results_do_not_depend_on_chunks_or_on_caching(monkeypatch):
    import ppl_vae.mixture as mixture

    x, w, m, p = blobs()
    t = torch.from_numpy
    runs = []
    for rows, cache in ((None, mixture.CACHE_BYTES), (7, mixture.CACHE_BYTES), (7, 0)):
        if rows is not None:
            monkeypatch.setattr(mixture, "_chunk_rows", lambda width, x, rows=rows: rows)
        monkeypatch.setattr(mixture, "CACHE_BYTES", cache)
        gm = GaussianMixture(4, tol=0, max_iter=10).fit(t(x), t(w), t(m), t(p["full"]))
        runs.append((gm.means_, gm.history_, gm.score_samples(t(x))))
    for means, history, log_p in runs[1:]:
        assert torch.allclose(means, runs[0][0], rtol=1e-12)
        np.testing.assert_allclose(history, runs[0][1], rtol=1e-12)
        assert torch.allclose(log_p, runs[0][2], rtol=1e-12)


def test_a_failed_fit_leaves_the_estimator_as_it_was():
    x = load_data(DataConfig("ring8", num_train=500, num_test=10)).train.double()
    gm = GaussianMixture(2, reg_covar=0, seed=0).fit(x)
    before = {k: v.clone() for k, v in vars(gm).items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match="increase reg_covar"):
        gm.fit(torch.ones(50, 2, dtype=F64))
    assert all(torch.equal(getattr(gm, k), v) for k, v in before.items())
    with pytest.raises(ValueError, match="increase reg_covar"):
        GaussianMixture(1, reg_covar=0).fit(torch.ones(50, 2, dtype=F64))


def test_seed_reproduces_and_more_inits_never_do_worse():
    x = load_data(DataConfig("pinwheel", num_train=1500, num_test=10)).train.double()
    a = GaussianMixture(8, seed=3).fit(x)
    b = GaussianMixture(8, seed=3).fit(x)
    assert torch.equal(a.means_, b.means_)
    best = GaussianMixture(8, seed=3, n_init=4).fit(x)  # its first initialisation is a's
    assert best.lower_bound_ >= a.lower_bound_


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


# -- the Bernoulli mixture -------------------------------------------------------------------------


def binary_components(n=3000, seed=0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.full((3, 24), 0.05, dtype=F64)
    for k in range(3):
        probs[k, 8 * k : 8 * k + 8] = 0.9
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    z = torch.multinomial(weights, n, replacement=True, generator=g)
    x = torch.bernoulli(probs[z], generator=g)
    x[:, -1] = 0  # a pixel that is never on
    return x, probs, weights


def test_bernoulli_mixture_recovers_known_components():
    x, probs, weights = binary_components()
    bm = BernoulliMixture(3, seed=0).fit(x)
    order = bm.means_[:, :24:8].argmax(0)  # component k is on over pixels 8k..8k+7
    assert sorted(order.tolist()) == [0, 1, 2]
    assert torch.allclose(bm.weights_[order], weights, atol=0.03)
    assert torch.allclose(bm.means_[order, :-1], probs[:, :-1], atol=0.04)
    assert torch.equal(bm.predict(x[:3]), bm.predict_proba(x[:3]).argmax(1))


def test_bernoulli_map_step_keeps_probabilities_inside_zero_one_in_closed_form():
    x, _, _ = binary_components()
    alpha = 0.5
    bm = BernoulliMixture(3, alpha=alpha, tol=0, max_iter=20, seed=0).fit(x)
    assert ((bm.means_ > 0) & (bm.means_ < 1)).all()
    # the pixel never on: MAP estimate alpha / (N_k + 2 alpha), with N_k from the last E-step
    n_k = bm.weights_ * len(x)
    assert torch.allclose(bm.means_[:, -1], alpha / (n_k + 2 * alpha), rtol=1e-6)
    # one component: one step gives the closed form (sum_n x + alpha) / (N + 2 alpha)
    one = BernoulliMixture(1, alpha=alpha, tol=0, max_iter=1).fit(x)
    p = (x.sum(0) + alpha) / (len(x) + 2 * alpha)
    assert torch.allclose(one.means_[0], p, rtol=1e-12)
    hand = (x * p.log() + (1 - x) * torch.log1p(-p)).sum(1).mean()
    assert one.score(x) == pytest.approx(hand.item(), rel=1e-12)


def test_bernoulli_history_is_the_map_objective_and_never_decreases():
    x, _, _ = binary_components(seed=1)
    alpha = 1.0
    bm = BernoulliMixture(3, alpha=alpha, tol=0, max_iter=30, init="random", seed=0).fit(x)
    history = torch.tensor(bm.history_)
    assert (history.diff() >= -1e-9).all() and history[-1] > history[0] + 1
    # the objective at the parameters the last iteration started from, by hand
    start = BernoulliMixture(3, alpha=alpha, tol=0, max_iter=29, init="random", seed=0).fit(x)
    mu, w = start.means_, start.weights_
    log_px = torch.logsumexp(w.log() + x @ mu.log().T + (1 - x) @ torch.log1p(-mu).T, 1)
    a = torch.tensor(1 + alpha, dtype=F64)
    prior = torch.distributions.Beta(a, a).log_prob(mu).sum()
    assert bm.history_[-1] == pytest.approx(((log_px.sum() + prior) / len(x)).item(), rel=1e-12)
    assert torch.allclose(start.score_samples(x), start.distribution().log_prob(x), atol=1e-10)


def test_bernoulli_mixture_on_images_flattens_and_samples():
    g = torch.Generator().manual_seed(0)
    images = torch.bernoulli(torch.full((200, 1, 4, 4), 0.3), generator=g)
    bm = BernoulliMixture(2, seed=0, init="random_from_data").fit(images)
    assert bm.means_.shape == (2, 16) and bm.event_shape_ == (1, 4, 4)
    assert bm.score_samples(images).shape == (200,)
    draws, labels = bm.sample(1000, generator=g)
    assert draws.shape == (1000, 16) and set(draws.unique().tolist()) <= {0.0, 1.0}
    assert draws.mean().item() == pytest.approx(0.3, abs=0.03)


# -- bad input -------------------------------------------------------------------------------------


def test_bad_data_raise_clear_value_errors():
    x = torch.randn(10, 2, dtype=F64)
    with pytest.raises(ValueError, match="10 points but n_components=11"):
        GaussianMixture(11).fit(x)
    for bad in (math.nan, math.inf):
        y = x.clone()
        y[3, 1] = bad
        with pytest.raises(ValueError, match="NaN or infinite"):
            GaussianMixture(2).fit(y)
    with pytest.raises(ValueError, match=r"shape \(N, D\).*unsqueeze"):
        GaussianMixture(2).fit(x[:, 0])
    with pytest.raises(ValueError, match=r"shape \(N, D\).*reshape"):
        GaussianMixture(2).fit(x.reshape(10, 1, 2))
    gm = GaussianMixture(2, seed=0).fit(x)
    with pytest.raises(ValueError, match="D=3 features but the mixture was fitted on D=2"):
        gm.score(torch.randn(4, 3))
    with pytest.raises(ValueError, match="not fitted yet"):
        GaussianMixture(2).score(x)
    with pytest.raises(TypeError, match="float32 or float64"):
        GaussianMixture(2).fit(x.half())
    with pytest.raises(ValueError, match="binary data"):
        BernoulliMixture(2).fit(torch.rand(20, 5))
    with pytest.raises(ValueError, match="NaN or infinite"):
        BernoulliMixture(2).fit(torch.full((20, 5), math.nan))
    with pytest.raises(ValueError, match="D=5 values per point but the mixture was fitted on D=4"):
        BernoulliMixture(1).fit(torch.ones(10, 4)).score(torch.ones(2, 5))


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_a_covariance_that_stays_singular_asks_for_a_larger_reg_covar(covariance_type):
    constant = torch.ones(50, 2, dtype=F64)
    with pytest.raises(ValueError, match="even with reg_covar=0; increase reg_covar"):
        GaussianMixture(1, covariance_type, reg_covar=0).fit(constant)
    if covariance_type in ("full", "tied"):  # two identical columns at 1e12: 1e-6 is lost
        t = torch.randn(200, 1, generator=torch.Generator().manual_seed(0), dtype=F64) * 1e12
        with pytest.raises(ValueError, match="singular even with reg_covar=1e-06"):
            GaussianMixture(2, covariance_type).fit(torch.cat([t, t], 1))
        # and the suggested fix works: a reg_covar that is not lost against 1e24
        GaussianMixture(2, covariance_type, reg_covar=1e12).fit(torch.cat([t, t], 1))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_components": 0}, "n_components must be a positive integer"),
        ({"covariance_type": "banded"}, "unknown covariance_type 'banded'"),
        ({"tol": -1.0}, "tol must be a non-negative number"),
        ({"reg_covar": -1e-6}, "reg_covar must be a non-negative"),
        ({"max_iter": -1}, "max_iter must be a non-negative integer"),
        ({"n_init": 0}, "n_init must be a positive integer"),
        ({"init": "kmedoids"}, "unknown init 'kmedoids'"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GaussianMixture(**{"n_components": 2, **kwargs})


def test_bad_initial_parameters():
    x, w, m, p = blobs()
    t = torch.from_numpy
    x = t(x)
    gm = GaussianMixture(4)
    with pytest.raises(ValueError, match=r"weights_init must have shape \(4,\)"):
        gm.fit(x, weights_init=torch.ones(3) / 3)
    with pytest.raises(ValueError, match="sum to 1"):
        gm.fit(x, weights_init=torch.ones(4))
    with pytest.raises(ValueError, match=r"means_init must have shape \(4, 3\)"):
        gm.fit(x, means_init=torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"precisions_init must have shape \(4, 3, 3\)"):
        gm.fit(x, precisions_init=torch.ones(4, 3))
    asymmetric = t(p["full"]).clone()
    asymmetric[0, 0, 1] += 1
    with pytest.raises(ValueError, match="symmetric"):
        gm.fit(x, precisions_init=asymmetric)
    with pytest.raises(ValueError, match="positive definite"):
        gm.fit(x, precisions_init=-t(p["full"]))
    with pytest.raises(ValueError, match="positive"):
        GaussianMixture(4, "diag").fit(x, precisions_init=-t(p["diag"]))
    with pytest.raises(ValueError, match="alpha must be positive"):
        BernoulliMixture(2, alpha=0)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        BernoulliMixture(2).fit(torch.ones(5, 3), means_init=torch.ones(2, 3))


# -- command line ----------------------------------------------------------------------------------


def run_cli(*args, capsys):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_em_command_writes_results_and_a_density_picture(tmp_path, capsys):
    out = tmp_path / "em"
    code, stdout, err = run_cli(
        "em", "--dataset", "pinwheel", "--components", "8", "--covariance", "full",
        "--device", "cpu", "--out", str(out), capsys=capsys,
    )  # fmt: skip
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["mixture.png", "results.json"]
    r = json.loads((out / "results.json").read_text())
    data = load_data(DataConfig("pinwheel"))
    gm = GaussianMixture(8, seed=0).fit(data.train.double())
    assert r["test_log_likelihood"] == pytest.approx(gm.score(data.test.double()), rel=1e-12)
    assert r["train_log_likelihood"] == pytest.approx(gm.score(data.train.double()), rel=1e-12)
    assert r["n_iter"] == gm.n_iter_ and r["converged"] is True and r["seconds"] > 0
    assert r["settings"]["mixture"]["components"] == 8 and r["num_test"] == 2000
    assert f"test {r['test_log_likelihood']:.4f}" in stdout
    assert (out / "mixture.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_mnist
def test_em_command_on_mnist_fits_a_bernoulli_mixture(tmp_path, capsys):
    out = tmp_path / "mnist"
    code, _, err = run_cli(
        "em", "--dataset", "mnist", "--components", "3", "--max-iter", "3", "--init", "random",
        "--dtype", "float32", "--device", "cpu", "--out", str(out), capsys=capsys,
    )  # fmt: skip
    assert code == 0, err
    r = json.loads((out / "results.json").read_text())
    assert r["mixture"] == "BernoulliMixture" and r["n_iter"] == 3
    # three components: far better than uniform pixels (784 log 2 = 543 nats), worse than a VAE
    assert -230 < r["test_log_likelihood"] < -150
    assert (out / "mixture.png").stat().st_size > 1000


def test_em_help_documents_every_flag(capsys):
    assert main(["em", "--help"]) == 0
    text = capsys.readouterr().out
    flags = ["--dataset", "--components", "--covariance", "--max-iter", "--tol", "--reg-covar",
             "--seed", "--data-dir", "--n-init", "--out"]  # fmt: skip
    assert not [f for f in flags if f not in text]


@pytest.fixture
def bad_files(tmp_path):
    x = np.random.default_rng(0).normal(size=(50, 2))
    nan = x.copy()
    nan[3, 1] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    np.save(tmp_path / "few.npy", x[:9])  # 9 points: 8 for training, 1 for testing
    np.save(tmp_path / "constant.npy", np.full((50, 2), 3.0))
    (tmp_path / "a_file").write_text("not a directory")
    return tmp_path


BAD = [
    (["--components", "0"], "n_components must be a positive integer"),
    (["--covariance", "banded"], "invalid choice: 'banded'"),
    (["--max-iter", "-1"], "max_iter must be a non-negative integer"),
    (["--tol", "-1"], "tol must be a non-negative number"),
    (["--reg-covar", "-1"], "reg_covar must be a non-negative"),
    (["--n-init", "0"], "n_init must be a positive integer"),
    (["--components", "two"], "invalid int value"),
    (["--dataset", "cifar"], "unknown data set 'cifar'"),
    (["--dataset", "{tmp}/nan.npy"], "NaN or infinite"),
    (["--dataset", "{tmp}/few.npy", "--components", "9"], "8 points but n_components=9"),
    (["--dataset", "{tmp}/constant.npy", "--reg-covar", "0"], "increase reg_covar"),
    (["--out", "{tmp}/a_file/run"], "cannot create output directory"),
    (["--device", "tpu"], "unknown device 'tpu'"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_em_bad_input_is_one_line_exit_2_and_leaves_nothing(args, message, bad_files, capsys):
    before = sorted(bad_files.rglob("*"))
    args = [a.replace("{tmp}", str(bad_files)) for a in args]
    out = [] if "--out" in args else ["--out", str(bad_files / "run")]
    dataset = [] if "--dataset" in args else ["--dataset", "ring8"]
    code, _, err = run_cli("em", *dataset, *args, *out, capsys=capsys)
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and err.startswith("ppl-vae") and "error:" in err
    assert "Traceback" not in err
    assert sorted(bad_files.rglob("*")) == before  # no half-written files or folders


# -- the EM-versus-SVI example ---------------------------------------------------------------------


def test_em_vs_svi_example_em_bound_touches_after_every_e_step(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("em_vs_svi", ROOT / "examples" / "em_vs_svi.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--quick", "--out", str(tmp_path / "em_vs_svi.png")])
    em, svi, local = result["em"], result["svi"], result["svi_local"]
    ll, after_e, after_m = em["log_likelihood"], em["bound_after_e"], em["bound_after_m"]
    assert len(after_e) == 30 and result["max_touch_gap"] < 1e-6
    assert all(
        abs(a - b) < 1e-6 for a, b in zip(ll, after_e, strict=False)
    )  # F(q_t, theta_t) = log p
    assert all(
        m <= a + 1e-12 for a, m in zip(ll[1:], after_m, strict=True)
    )  # F(q_t, theta_t+1) <= log p
    assert (
        max(a - m for a, m in zip(ll[1:], after_m, strict=True)) > 1e-4
    )  # and strictly below somewhere
    assert all(b >= a - 1e-9 for a, b in zip(ll, ll[1:], strict=False)) and ll[-1] > ll[0] + 1
    # Pyro's enumerated ELBO is the log-likelihood itself; the fixed-q and local-q bounds lag
    assert svi["max_loss_mismatch"] < 1e-8 and local["max_loss_mismatch"] < 1e-8
    assert svi["log_likelihood"][-1] - svi["bound"][-1] > 1.0
    assert all(
        a - b > 1e-4 for a, b in zip(local["log_likelihood"][50:], local["bound"][50:], strict=True)
    )
    assert (tmp_path / "em_vs_svi.png").stat().st_size > 10_000
    assert "max |bound after E-step - log-likelihood|" in capsys.readouterr().out


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
