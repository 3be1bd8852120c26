"""Behaviour shared by the mixtures: warm starts, chunks, failed fits, seeds, checks, registries."""

import contextlib
import inspect
import math
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from helpers import blobs, record_sources

from ppl_vae.data import DataConfig, load_data
from ppl_vae.errors import InputError, NotFittedError
from ppl_vae.mixture import (
    COVARIANCE_TYPES,
    INITS,
    MIXTURES,
    BernoulliMixture,
    ConvergenceWarning,
    GaussianMixture,
    chunks,
)
from ppl_vae.registry import Entry

F64 = torch.float64

pytestmark = pytest.mark.filterwarnings("ignore::ppl_vae.mixture.ConvergenceWarning")


# -- EM --------------------------------------------------------------------------------------------


def test_warm_start_continues_where_the_last_fit_stopped():
    x, w, m, p = blobs()
    t = torch.from_numpy
    straight = GaussianMixture(4, tol=0, max_iter=10).fit(
        t(x), weights_init=t(w), means_init=t(m), precisions_init=t(p["full"])
    )
    warm = GaussianMixture(4, tol=0, max_iter=4, warm_start=True)
    warm.fit(t(x), weights_init=t(w), means_init=t(m), precisions_init=t(p["full"]))
    warm.max_iter = 6
    warm.fit(t(x))
    assert torch.allclose(warm.means_, straight.means_, rtol=1e-10)
    np.testing.assert_allclose(warm.history_, straight.history_[4:], rtol=1e-12)


def test_on_iteration_follows_every_initialisation_and_is_not_a_parameter():
    x, *_ = blobs()
    seen = []
    m = GaussianMixture(4, n_init=2, max_iter=50)
    m.on_iteration = lambda init, n_iter, bound: seen.append((init, n_iter, bound))
    m.fit(torch.from_numpy(x))
    assert {init for init, _, _ in seen} == {1, 2}
    for init in (1, 2):  # iterations count from 1 within each initialisation
        steps = [n for i, n, _ in seen if i == init]
        assert steps == list(range(1, len(steps) + 1))
    finals = {i: [b for j, _, b in seen if j == i] for i in (1, 2)}
    assert any(f == m.history_ for f in finals.values())  # the kept fit's bounds, as recorded
    assert "on_iteration" not in m.get_params()
    assert GaussianMixture(**m.get_params()).on_iteration is None


@pytest.mark.parametrize(
    "covariance_type, dtype, rtol", [("full", F64, 1e-12), ("diag", torch.float32, 1e-5)]
)
def test_results_do_not_depend_on_chunks_or_on_caching(covariance_type, dtype, rtol, monkeypatch):
    x, w, m, p = blobs()  # 7 rows a chunk: the pass's work space is used by a short last chunk
    t = lambda a: torch.from_numpy(a).to(dtype)  # noqa: E731
    runs = []
    for rows, cache in ((None, chunks.CACHE_BYTES), (7, chunks.CACHE_BYTES), (7, 0)):
        if rows is not None:
            monkeypatch.setattr(chunks, "chunk_rows", lambda width, x, rows=rows: rows)
        monkeypatch.setattr(chunks, "CACHE_BYTES", cache)
        gm = GaussianMixture(4, covariance_type, tol=0, max_iter=10).fit(
            t(x), weights_init=t(w), means_init=t(m), precisions_init=t(p[covariance_type])
        )
        runs.append((gm.means_, gm.history_, gm.score_samples(t(x))))
    for means, history, log_p in runs[1:]:
        assert torch.allclose(means, runs[0][0], rtol=rtol, atol=rtol * 1e-3)
        np.testing.assert_allclose(history, runs[0][1], rtol=rtol)
        assert torch.allclose(log_p, runs[0][2], rtol=rtol)


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_work_spaces_hold_no_more_rows_than_there_are_points(covariance_type, monkeypatch):
    """Fewer points than a chunk's rows (every fit of 100k points on a GPU, where a chunk is
    2^28 bytes): the pass's work spaces are sized by the points, and the fit is unchanged."""
    x, w, m, p = blobs()  # 600 points
    t = lambda a: torch.from_numpy(a)  # noqa: E731
    fits, made = [], record_sources(monkeypatch)
    for rows in (None, 4096):  # as chosen for this CPU, then as a GPU's would be
        if rows is not None:
            monkeypatch.setattr(chunks, "chunk_rows", lambda width, x, rows=rows: rows)
        gm = GaussianMixture(4, covariance_type, tol=0, max_iter=5).fit(
            t(x), weights_init=t(w), means_init=t(m), precisions_init=t(p[covariance_type])
        )
        fits.append(gm.means_)
        source = made[-1]
        assert source.rows_per_chunk == len(x)
        assert source.pass_space(4).joint.numel() == 4 * len(x)
        assert source._work is None or source._work.numel() == len(x) * source.width
    assert torch.equal(fits[0], fits[1])


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("mixture", ["gaussian diag", "gaussian full", "bernoulli"])
def test_log_densities_are_the_log_sum_exp_of_the_joint(mixture, dtype, monkeypatch):
    # score_samples, score, bic and aic take log p(x_n) chunk by chunk from the pass's
    # exp2 form; torch's logsumexp of the whole joint, in float64, is the reference
    monkeypatch.setattr(chunks, "chunk_rows", lambda width, x: 7)  # a short last chunk
    x, *_ = blobs()
    if mixture == "bernoulli":
        x = torch.from_numpy(x > 0).to(dtype)
        m = BernoulliMixture(3, seed=0, max_iter=5).fit(x)
    else:
        x = torch.from_numpy(x).to(dtype)
        m = GaussianMixture(4, mixture.split()[1], seed=0, max_iter=5).fit(x)
    want = torch.logsumexp(m.joint_log_prob(x).double(), 1)
    rtol = 1e-6 if dtype == torch.float32 else 1e-13
    got = m.score_samples(x)
    assert got.dtype == dtype and got.shape == want.shape
    assert torch.allclose(got.double(), want, rtol=rtol, atol=rtol)
    assert m.score(x) == pytest.approx(want.mean().item(), rel=rtol)
    n_params = m._n_parameters()
    assert m.bic(x) == pytest.approx(-2 * want.sum().item() + n_params * math.log(600), rel=rtol)
    assert m.aic(x) == pytest.approx(-2 * want.sum().item() + 2 * n_params, rel=rtol)


def _flushing() -> bool:
    """Whether this thread reads and makes subnormal floats as zero (float32's 1e-39 is one)."""
    return torch.full((1,), 1e-39).mul_(1.0).item() == 0.0


@pytest.mark.parametrize("before", [False, True])
def test_the_pass_flushes_subnormals_and_leaves_the_mode_as_it_found_it(before, monkeypatch):
    from ppl_vae.mixture import base

    if not torch.set_flush_denormal(before):
        pytest.skip("this CPU cannot flush subnormals")
    try:
        seen, inside = [], []
        flushed = base.subnormals_flushed

        @contextlib.contextmanager
        def spy(device):
            seen.append(_flushing())
            with flushed(device) as floor:
                inside.append(_flushing())
                yield floor

        monkeypatch.setattr(base, "subnormals_flushed", spy)
        with flushed(torch.device("cpu")) as floor:
            assert _flushing() and not floor  # flushed: exp2 needs no floor
        assert _flushing() == before
        with pytest.raises(KeyError), flushed(torch.device("cpu")):
            raise KeyError
        assert _flushing() == before
        x, w, m, p = blobs()
        GaussianMixture(4, "diag", tol=0, max_iter=3).fit(torch.from_numpy(x).float())
        assert _flushing() == before  # one pass per iteration, each flushing
        assert seen == [before] * 3 and inside == [True] * 3
    finally:
        torch.set_flush_denormal(False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_shifted_exponential_with_subnormals_flushed_needs_no_floor(dtype):
    """Flushed, exp2 makes responsibilities below the smallest normal number exactly zero; the
    floor makes them about 4 times it instead: the sums agree to far below rounding."""
    from ppl_vae.mixture import base
    from ppl_vae.mixture.chunks import PassSpace

    g = torch.Generator().manual_seed(0)
    joint = -torch.rand(8, 500, generator=g, dtype=dtype) * (2 * -math.log(torch.finfo(dtype).tiny))
    tiny = torch.finfo(dtype).tiny
    got = {}
    for floor in (False, True):
        with base.subnormals_flushed(torch.device("cpu")) as slow:
            e, top, norm = base._shifted_exp(joint.clone(), PassSpace(8, 500, joint), floor)
            got[floor] = e.clone(), top.clone(), norm.clone()
        if not floor and slow:
            pytest.skip("this CPU cannot flush subnormals")
    (e0, top0, norm0), (e1, top1, norm1) = got[False], got[True]
    assert torch.equal(top0, joint.amax(0, keepdim=True)) and torch.equal(top0, top1)
    assert not ((e0 > 0) & (e0 < tiny)).any()  # no subnormal responsibility
    assert torch.allclose(e0, e1, rtol=0, atol=8 * tiny) and (e1 >= 4 * tiny * 0.99).all()
    assert torch.allclose(norm0, norm1, rtol=4 * torch.finfo(dtype).eps, atol=0)
    want = torch.exp(joint.double() - joint.double().amax(0))
    assert torch.allclose(e0.double(), want, rtol=1e3 * torch.finfo(dtype).eps, atol=8 * tiny)


def test_a_failed_fit_leaves_the_estimator_as_it_was():
    x = load_data(DataConfig("ring8", num_train=500, num_test=10)).train.double()
    gm = GaussianMixture(2, reg_covar=0, seed=0).fit(x)
    before = {k: v.clone() for k, v in vars(gm).items() if isinstance(v, torch.Tensor)}
    with pytest.raises(InputError, match="increase reg_covar"):
        gm.fit(torch.ones(50, 2, dtype=F64))
    assert all(torch.equal(getattr(gm, k), v) for k, v in before.items())
    with pytest.raises(InputError, match="increase reg_covar"):
        GaussianMixture(1, reg_covar=0).fit(torch.ones(50, 2, dtype=F64))


def test_seed_reproduces_and_more_inits_never_do_worse():
    x = load_data(DataConfig("pinwheel", num_train=1500, num_test=10)).train.double()
    a = GaussianMixture(8, seed=3).fit(x)
    b = GaussianMixture(8, seed=3).fit(x)
    assert torch.equal(a.means_, b.means_)
    best = GaussianMixture(8, seed=3, n_init=4).fit(x)  # its first initialisation is a's
    assert best.lower_bound_ >= a.lower_bound_


# -- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_finiteness_check_agrees_with_isfinite_wherever_the_bad_value_sits(dtype):
    """One pass of aminmax: a NaN or an infinity in any lane or in the tail of the
    vectorised loop is found, and extreme finite values pass."""
    from ppl_vae.mixture.checks import check_finite

    x = torch.randn(333, 7, dtype=dtype)
    big = torch.finfo(dtype).max
    check_finite(torch.tensor([[big, -big, torch.finfo(dtype).tiny]], dtype=dtype), "x")
    for bad in (math.nan, math.inf, -math.inf):
        for flat in (0, 1, 15, 16, 17, 1000, x.numel() - 2, x.numel() - 1):
            y = x.clone()
            y.view(-1)[flat] = bad
            assert not torch.isfinite(y).all()
            with pytest.raises(InputError, match="x contains NaN or infinite values"):
                check_finite(y, "x")
    assert check_finite(x, "x") is x and check_finite(x[:0], "x").numel() == 0


def test_bad_data_raise_clear_value_errors():
    x = torch.randn(10, 2, dtype=F64)
    with pytest.raises(InputError, match="10 points but n_components=11"):
        GaussianMixture(11).fit(x)
    for bad in (math.nan, math.inf, -math.inf):
        y = x.clone()
        y[3, 1] = bad
        with pytest.raises(InputError, match="NaN or infinite"):
            GaussianMixture(2).fit(y)
    with pytest.raises(InputError, match=r"shape \(N, D\).*unsqueeze"):
        GaussianMixture(2).fit(x[:, 0])
    with pytest.raises(InputError, match=r"shape \(N, D\).*reshape"):
        GaussianMixture(2).fit(x.reshape(10, 1, 2))
    gm = GaussianMixture(2, seed=0).fit(x)
    with pytest.raises(InputError, match="D=3 features but the mixture was fitted on D=2"):
        gm.score(torch.randn(4, 3))
    with pytest.raises(InputError, match="not fitted yet"):
        GaussianMixture(2).score(x)
    with pytest.raises(TypeError, match="float32 or float64"):
        GaussianMixture(2).fit(x.half())
    with pytest.raises(InputError, match="binary data"):
        BernoulliMixture(2).fit(torch.rand(20, 5))
    with pytest.raises(InputError, match="NaN or infinite"):
        BernoulliMixture(2).fit(torch.full((20, 5), math.nan))
    with pytest.raises(InputError, match="D=5 values per point but the mixture was fitted on D=4"):
        BernoulliMixture(1).fit(torch.ones(10, 4)).score(torch.ones(2, 5))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_components": 0}, "n_components must be a positive integer"),
        (
            {"covariance_type": "banded"},
            "unknown covariance type 'banded'; choose one of full, tied, diag, spherical",
        ),
        ({"tol": -1.0}, "tol must be a non-negative number"),
        ({"reg_covar": -1e-6}, "reg_covar must be a non-negative"),
        ({"max_iter": -1}, "max_iter must be a non-negative integer"),
        ({"n_init": 0}, "n_init must be a positive integer"),
        ({"init": "kmedoids"}, "unknown init 'kmedoids'"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(InputError, match=message):
        GaussianMixture(**{"n_components": 2, **kwargs})


def test_bad_initial_parameters():
    x, w, m, p = blobs()
    t = torch.from_numpy
    x = t(x)
    gm = GaussianMixture(4)
    with pytest.raises(InputError, match=r"weights_init must have shape \(4,\)"):
        gm.fit(x, weights_init=torch.ones(3) / 3)
    with pytest.raises(InputError, match="sum to 1"):
        gm.fit(x, weights_init=torch.ones(4))
    with pytest.raises(InputError, match=r"means_init must have shape \(4, 3\)"):
        gm.fit(x, means_init=torch.zeros(4, 2))
    with pytest.raises(InputError, match=r"precisions_init must have shape \(4, 3, 3\)"):
        gm.fit(x, precisions_init=torch.ones(4, 3))
    asymmetric = t(p["full"]).clone()
    asymmetric[0, 0, 1] += 1
    with pytest.raises(InputError, match="symmetric"):
        gm.fit(x, precisions_init=asymmetric)
    with pytest.raises(InputError, match="positive definite"):
        gm.fit(x, precisions_init=-t(p["full"]))
    with pytest.raises(InputError, match="positive"):
        GaussianMixture(4, "diag").fit(x, precisions_init=-t(p["diag"]))
    with pytest.raises(InputError, match="alpha must be a positive number"):
        BernoulliMixture(2, alpha=0)
    with pytest.raises(InputError, match="strictly between 0 and 1"):
        BernoulliMixture(2).fit(torch.ones(5, 3), means_init=torch.ones(2, 3))


def test_shared_initial_parameter_checks_apply_to_both_mixtures():
    x = torch.bernoulli(torch.full((40, 1, 2, 3), 0.5, dtype=F64))
    with pytest.raises(InputError, match=r"weights_init must have shape \(2,\)"):
        BernoulliMixture(2).fit(x, weights_init=torch.ones(3) / 3)
    with pytest.raises(InputError, match="non-negative and sum to 1, got sum 2"):
        BernoulliMixture(2).fit(x, weights_init=torch.ones(2))
    with pytest.raises(InputError, match=r"means_init must have shape \(2, 6\)"):
        BernoulliMixture(2).fit(x, means_init=torch.full((2, 5), 0.5))
    with pytest.raises(InputError, match="means_init contains NaN or infinite values"):
        BernoulliMixture(2).fit(x, means_init=torch.full((2, 6), math.nan))
    with pytest.raises(InputError, match="weights_init contains NaN or infinite values"):
        GaussianMixture(2).fit(x.flatten(1), weights_init=torch.tensor([math.inf, 0.5]))
    # Bernoulli means may come in the shape of the images; Gaussian means may not
    means = torch.full((2, 1, 2, 3), 0.5, dtype=F64)
    means[1] = 0.25
    bm = BernoulliMixture(2, max_iter=0).fit(x, means_init=means)
    assert torch.equal(bm.means_, means.reshape(2, 6))
    with pytest.raises(InputError, match=r"means_init must have shape \(2, 6\)"):
        GaussianMixture(2).fit(x.flatten(1), means_init=means)


@pytest.mark.parametrize("mixture", [GaussianMixture, BernoulliMixture])
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_components": True}, "n_components must be a positive integer, got True"),
        ({"n_components": 1.5}, "n_components must be a positive integer, got 1.5"),
        ({"tol": math.nan}, "tol must be a non-negative number, got nan"),
        ({"tol": "0.1"}, "tol must be a non-negative number, got '0.1'"),
        ({"max_iter": 2.0}, "max_iter must be a non-negative integer, got 2.0"),
        ({"n_init": -1}, "n_init must be a positive integer, got -1"),
        (
            {"init": "kmedoids"},
            "unknown init 'kmedoids'; choose one of kmeans, k-means++, random, random_from_data",
        ),
    ],
)
def test_both_mixtures_check_the_shared_settings(mixture, kwargs, message):
    with pytest.raises(InputError, match=re.escape(message)):
        mixture(**{"n_components": 2, **kwargs})


def test_mixture_specific_settings_are_input_errors():
    with pytest.raises(InputError, match=r"reg_covar must be a non-negative number, got nan"):
        GaussianMixture(2, reg_covar=math.nan)
    with pytest.raises(InputError, match=r"alpha must be a positive number \(a pseudo-count"):
        BernoulliMixture(2, alpha=-1)
    gm = GaussianMixture(1).fit(torch.randn(10, 2, dtype=F64))
    with pytest.raises(InputError, match="n_samples must be a positive integer, got 0"):
        gm.sample(0)


# -- registries ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("init", INITS)
def test_every_init_gives_responsibilities(init, dtype):
    x = torch.from_numpy(blobs(n=300)[0]).to(dtype)
    k = 4
    resp = INITS[init].factory(x, k, torch.Generator().manual_seed(0))
    assert resp.shape == (300, k) and resp.dtype == dtype and (resp >= 0).all()
    rows = resp.sum(1)
    if init in ("kmeans", "random"):  # every point shares itself out among the components
        assert torch.allclose(rows, torch.ones_like(rows))
    else:  # like scikit-learn: one seed point per component, the other rows 0
        assert torch.equal(resp.sum(0), torch.ones(k, dtype=dtype))
        assert torch.equal(rows.unique(), torch.tensor([0.0, 1.0], dtype=dtype))
        assert int(rows.sum()) == k
    again = INITS[init].factory(x, k, torch.Generator().manual_seed(0))
    assert torch.equal(resp, again)  # drawn from the generator alone
    if init == "kmeans":  # a hard partition into k non-empty clusters
        assert (resp.sum(0) > 0).all() and set(resp.unique().tolist()) == {0.0, 1.0}


def test_a_mixture_starts_from_the_registered_init(monkeypatch):
    x = torch.from_numpy(blobs(n=200)[0])
    calls = []

    def uniform(x, k, g):
        calls.append((x.shape, k))
        return torch.full((x.shape[0], k), 1 / k, dtype=x.dtype)

    monkeypatch.setitem(INITS._entries, "uniform", Entry("uniform", uniform))
    gm = GaussianMixture(3, init="uniform", max_iter=0).fit(x)
    assert calls == [((200, 3), 3)]
    assert torch.allclose(gm.means_, x.mean(0).expand(3, -1))  # every component: the data mean


def test_unknown_names_are_input_errors_that_list_the_choices():
    for registry in (COVARIANCE_TYPES, INITS, MIXTURES):
        message = f"unknown {registry.kind} 'nope'; choose one of {', '.join(registry.names)}"
        with pytest.raises(InputError) as caught:
            registry.check("nope")
        assert str(caught.value) == message
    assert COVARIANCE_TYPES.names == ("full", "tied", "diag", "spherical")
    assert INITS.names == ("kmeans", "k-means++", "random", "random_from_data")
    assert MIXTURES.names == ("gaussian", "bernoulli")
    with pytest.raises(InputError, match="unknown mixture 'poisson'; choose one of gaussian, b"):
        MIXTURES.build("poisson", n_components=2)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_covariance_types_give_the_shape_of_the_precisions(covariance_type):
    x = torch.from_numpy(blobs()[0])
    gm = GaussianMixture(4, covariance_type, max_iter=2, seed=0).fit(x)
    shape = COVARIANCE_TYPES[covariance_type].factory(4, 3)
    assert gm.precisions_.shape == gm.covariances_.shape == shape
    with pytest.raises(InputError, match=rf"precisions_init must have shape \({shape[0]},"):
        GaussianMixture(4, covariance_type).fit(x, precisions_init=torch.ones(shape + (1,)))


def test_mixtures_are_built_by_name_with_their_declared_options():
    gm = MIXTURES.build("gaussian", n_components=3, covariance_type="diag", seed=1)
    assert isinstance(gm, GaussianMixture) and (gm.n_components, gm.covariance_type) == (3, "diag")
    bm = MIXTURES.build("bernoulli", n_components=2, alpha=0.5)
    assert isinstance(bm, BernoulliMixture) and bm.alpha == 0.5
    for name in MIXTURES:  # the declared options are exactly what the constructor takes
        cls = type(MIXTURES.build(name))
        assert MIXTURES.options(name) == tuple(inspect.signature(cls).parameters)
    code = "import sys, ppl_vae.cli; print('sklearn' in sys.modules)"  # names without estimators
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    with pytest.raises(InputError, match="reg_covar does not apply to the mixture 'bernoulli'"):
        MIXTURES.build("bernoulli", n_components=2, reg_covar=1e-3)


# -- the scikit-learn surface ----------------------------------------------------------------------


def _binary(n=60, d=6, seed=0):
    return torch.bernoulli(
        torch.full((n, d), 0.4, dtype=F64), generator=torch.Generator().manual_seed(seed)
    )


def test_not_fitted_error_is_a_value_error_and_an_attribute_error():
    assert issubclass(NotFittedError, InputError) and issubclass(NotFittedError, AttributeError)
    error = NotFittedError("message")
    assert isinstance(error, ValueError) and isinstance(error, AttributeError)
    assert str(error) == "message"


@pytest.mark.parametrize("mixture", [GaussianMixture, BernoulliMixture])
@pytest.mark.parametrize(
    "method",
    ["predict", "predict_proba", "score", "score_samples", "joint_log_prob", "bic", "aic",
     "sample", "distribution"],
)  # fmt: skip
def test_every_method_that_needs_a_fit_raises_not_fitted_error(mixture, method):
    call = {"sample": lambda m: m.sample(3), "distribution": lambda m: m.distribution()}
    run = call.get(method, lambda m: getattr(m, method)(_binary()))
    with pytest.raises(
        NotFittedError,
        match=rf"this {mixture.__name__} is not fitted yet; call fit\(x\) before {method}",
    ):
        run(mixture(2))
    with pytest.raises(AttributeError):  # what getattr-style code written for sklearn expects
        run(mixture(2))
    run(mixture(2, seed=0).fit(_binary()))  # and fitted, it works


@pytest.mark.parametrize("mixture", [GaussianMixture, BernoulliMixture])
def test_get_params_are_the_constructor_arguments_and_clone_as_sklearn(mixture):
    names = sorted(p for p in inspect.signature(mixture).parameters)
    m = mixture(3, tol=np.float32(0.01), max_iter=np.int64(7), seed=5, verbose_interval=2)
    params = m.get_params()
    assert list(params) == names == sorted(m.get_params(deep=False))
    assert params["max_iter"] is m.max_iter and params["verbose"] == 0
    assert type(params["max_iter"]) is np.int64  # kept as given, as scikit-learn keeps it
    copy = type(m)(**m.get_params())
    assert copy.get_params() == params and not hasattr(copy, "weights_")
    base_module = pytest.importorskip("sklearn.base")
    cloned = base_module.clone(m)  # scikit-learn's clone checks that every argument is kept
    assert type(cloned) is mixture and cloned.get_params() == params
    x = _binary()
    fitted = m.fit(x)
    assert torch.equal(cloned.fit(x).means_, fitted.means_)  # the same seed: the same fit
    assert torch.equal(type(m)(**m.get_params()).fit(x).means_, fitted.means_)
    assert repr(mixture(3, seed=5)) == f"{mixture.__name__}(n_components=3, seed=5)"
    assert fitted.score(x, None) == fitted.score(x)  # scikit-learn's scorers pass y=None


@pytest.mark.parametrize("mixture", [GaussianMixture, BernoulliMixture])
def test_set_params_checks_names_and_values_and_returns_self(mixture):
    m = mixture(2)
    assert m.set_params() is m
    assert m.set_params(n_components=3, tol=0.5) is m and (m.n_components, m.tol) == (3, 0.5)
    with pytest.raises(InputError, match=r"'reg_covr' is not a parameter of \w+Mixture; its pa"):
        m.set_params(reg_covr=1e-3)
    with pytest.raises(InputError, match="is not a parameter"):
        m.set_params(n_components__x=1)  # no argument is a nested estimator
    with pytest.raises(InputError, match="max_iter must be a non-negative integer, got -1"):
        m.set_params(tol=0.1, max_iter=-1)
    assert (m.tol, m.max_iter) == (0.5, 100)  # a failed set_params changes nothing
    m.n_init = 0  # assigned directly: fit checks the settings too
    with pytest.raises(InputError, match="n_init must be a positive integer, got 0"):
        m.fit(_binary())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"verbose": -1}, "verbose must be a non-negative integer, got -1"),
        ({"verbose_interval": 0}, "verbose_interval must be a positive integer, got 0"),
        ({"warm_start": "yes"}, "warm_start must be True or False, got 'yes'"),
        ({"seed": -1}, "seed must be None or an integer in [0, 2**63), got -1"),
        ({"seed": 2**64}, "seed must be None or an integer in [0, 2**63), got 1844"),
        ({"n_components": np.bool_(True)}, "n_components must be a positive integer"),
    ],
)
def test_bad_scikit_learn_settings(kwargs, message):
    for mixture in (GaussianMixture, BernoulliMixture):
        with pytest.raises(InputError, match=re.escape(message)):
            mixture(**{"n_components": 2, **kwargs})


def test_numpy_scalars_are_accepted_wherever_python_numbers_are():
    x = torch.from_numpy(blobs()[0])
    i = np.int64
    settings = dict(
        n_components=i(3), max_iter=i(20), n_init=i(2), seed=i(4), verbose=i(0),
        verbose_interval=i(5), tol=np.float32(1e-3), reg_covar=np.float64(1e-6),
        warm_start=np.bool_(False),
    )  # fmt: skip
    gm = GaussianMixture(**settings).fit(x)
    plain = GaussianMixture(**{k: v.item() for k, v in settings.items()}).fit(x)
    assert torch.equal(gm.means_, plain.means_) and gm.means_.shape == (3, 3)
    assert gm.sample(i(4))[0].shape == (4, 3)
    bm = BernoulliMixture(i(2), alpha=np.float32(0.5), max_iter=i(5), seed=i(0)).fit(_binary())
    assert bm.means_.shape == (2, 6)


@pytest.mark.parametrize("mixture", [GaussianMixture, BernoulliMixture])
def test_input_dtypes_follow_sklearn(mixture):
    x = _binary()
    assert mixture(2, seed=0).fit(x.numpy().astype(np.int64)).means_.dtype == F64
    assert mixture(2, seed=0).fit(x.numpy().astype(bool)).means_.dtype == F64
    assert mixture(2, seed=0).fit(x.to(torch.uint8)).means_.dtype == F64
    assert mixture(2, seed=0).fit(x.tolist()).means_.dtype == F64
    assert mixture(2, seed=0).fit(x.float()).means_.dtype == torch.float32
    assert mixture(2, seed=0).fit(x.numpy().astype(np.float32)).means_.dtype == torch.float32
    ints = mixture(2, seed=0).fit(x.numpy().astype(np.int64))
    assert torch.equal(ints.means_, mixture(2, seed=0).fit(x).means_)
    # negative strides and read-only arrays are copied, silently
    flipped = x.numpy()[::-1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = mixture(2, seed=0).fit(flipped)
        frozen = np.array(flipped)
        frozen.flags.writeable = False
        b = mixture(2, seed=0).fit(frozen)
    assert torch.equal(a.means_, b.means_)
    assert torch.equal(a.predict(flipped), a.predict(torch.from_numpy(flipped.copy())))


@pytest.mark.parametrize("mixture", [GaussianMixture, BernoulliMixture])
def test_complex_and_non_numeric_input_is_refused(mixture):
    x = _binary().numpy()
    for bad in (x.astype(complex), torch.from_numpy(x).to(torch.complex64), [[1 + 2j, 0j]] * 5):
        with pytest.raises(InputError, match=r"x is complex .*; pass real values"):
            mixture(2).fit(bad)
    with pytest.raises(InputError, match="weights_init is complex"):
        mixture(2).fit(x, weights_init=np.array([0.5, 0.5], dtype=complex))
    with pytest.raises(InputError, match="x has dtype <U1; pass real numbers"):
        mixture(2).fit([["a", "b"]] * 5)
    with pytest.raises(InputError, match="x is not an array of numbers"):
        mixture(2).fit([[1.0, 0.0], [1.0]])
    fitted = mixture(2, seed=0).fit(x)
    with pytest.raises(InputError, match="x is complex"):
        fitted.score(x.astype(complex))


@pytest.mark.parametrize("mixture", [GaussianMixture, BernoulliMixture])
def test_zero_points_are_an_input_error_as_in_sklearn(mixture):
    # scikit-learn raises ValueError for 0 samples in predict, predict_proba, score_samples and
    # score (and fit needs 2); so do we, with our own message, rather than returning empty results
    x = _binary()
    fitted = mixture(2, seed=0).fit(x)
    for method in ("predict", "predict_proba", "score_samples", "score", "bic", "aic"):
        with pytest.raises(InputError, match=r"x has no points \(shape \(0, 6\)\); pass at least"):
            getattr(fitted, method)(x[:0])
    for n in (0, 1):
        with pytest.raises(InputError, match=rf"x has {n} point\(s\); fitting needs at least 2"):
            mixture(1).fit(x[:n])


@pytest.mark.parametrize("mixture", [GaussianMixture, BernoulliMixture])
def test_a_warm_start_on_another_number_of_features_is_an_input_error(mixture):
    # scikit-learn fails inside its E-step (a matmul shape error); we say what is wrong
    x = _binary()
    warm = mixture(2, seed=0, warm_start=True).fit(x)
    means = warm.means_.clone()
    what = "features" if mixture is GaussianMixture else "values per point"
    with pytest.raises(
        InputError,
        match=rf"x has D=7 {what} but warm_start continues the mixture fitted on D=6; .*"
        rf"set warm_start=False",
    ):
        warm.fit(torch.cat([x, x[:, :1]], 1))
    assert torch.equal(warm.means_, means)
    warm.warm_start = False  # the fix given: a fresh fit
    assert warm.fit(torch.cat([x, x[:, :1]], 1)).means_.shape == (2, 7)
    # a warm start continues in the dtype of the fitted parameters
    again = mixture(2, seed=0, warm_start=True).fit(x)
    assert again.fit(x.float()).means_.dtype == F64


@pytest.mark.parametrize("mixture", [GaussianMixture, BernoulliMixture])
def test_fit_predict_equals_fit_then_predict_and_sets_the_fit(mixture):
    x = _binary(n=200, d=8)
    labels = mixture(3, init="random", seed=0, max_iter=2, tol=0).fit_predict(x)
    fitted = mixture(3, init="random", seed=0, max_iter=2, tol=0).fit(x)
    assert torch.equal(labels, fitted.predict(x)) and labels.shape == (200,)
    stale = mixture(3, init="random", seed=0, max_iter=1, tol=0).fit(x).predict(x)
    assert not torch.equal(labels, stale)  # labels after the last M-step, not before it


def test_the_convergence_warning_points_at_the_caller_and_names_the_fix():
    x = torch.from_numpy(blobs()[0])
    with pytest.warns(ConvergenceWarning) as caught:
        GaussianMixture(4, max_iter=1, seed=0).fit(x)
    assert caught[0].filename == __file__
    assert "max_iter=1" in str(caught[0].message) and "raise max_iter or tol" in str(
        caught[0].message
    )
    with pytest.warns(ConvergenceWarning) as caught:
        GaussianMixture(4, max_iter=1, seed=0).fit_predict(x)
    assert caught[0].filename == __file__
    with pytest.warns(ConvergenceWarning, match="raise max_iter or tol, or try another") as caught:
        BernoulliMixture(2, max_iter=1, tol=0, seed=0).fit(_binary())
    assert "reg_covar" not in str(caught[0].message)
    with warnings.catch_warnings():  # no iteration asked for: no warning, as scikit-learn
        warnings.simplefilter("error")
        GaussianMixture(4, max_iter=0, seed=0).fit(x)
