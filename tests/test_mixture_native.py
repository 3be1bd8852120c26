"""The compiled normalisation of the E-step (ppl_vae.mixture.native): the same responsibilities,
counts and log-likelihood as a float64 log-sum-exp, the same fits as torch's operations, and a
build that leaves nothing behind, changes no floating-point mode, and steps aside cleanly."""

import tempfile

import numpy as np
import pytest
import torch
from helpers import blobs

from ppl_vae.mixture import BernoulliMixture, GaussianMixture, native

F32 = torch.float32
pytestmark = pytest.mark.filterwarnings("ignore::ppl_vae.mixture.ConvergenceWarning")


def built():
    """The kernel, or a skip where this machine cannot build it (no C compiler or libmvec)."""
    normalise = native.kernel(torch.zeros(1), native.MIN_VALUES)
    if normalise is None:
        pytest.skip("no C compiler with glibc's vectorised exp2f here")
    return normalise


def test_the_kernel_gives_the_log_sum_exp_responsibilities_and_counts_of_float64():
    normalise = built()
    g = torch.Generator().manual_seed(0)
    k, n = 7, 1000  # 1000 points: three whole blocks of 256 and a short one
    joint = 30 * torch.randn(k, n, generator=g, dtype=torch.float64) - 500
    joint[:, 0] = torch.linspace(-3, 3, k, dtype=torch.float64)  # a point between several
    joint[2] -= 1e4  # far below the others: exp2's floor, responsibilities of 1e-38 at most
    joint[4] = -float("inf")  # a component of weight 0
    joint = joint.to(F32).double()  # the kernel's input, exactly
    want_r = torch.softmax(joint, 0)
    want_total = torch.logsumexp(joint, 0).sum().item()
    r = joint.to(F32)
    nk = torch.full((k,), 0.5, dtype=F32)  # the kernel adds to what is there
    total = normalise(r, nk)
    assert abs(total - want_total) <= 1e-7 * abs(want_total)  # float32 sums of 256, in double
    # float32 rounds (joint - top) log2(e) by a few eps |log r|, so r moves by that, relatively;
    # below the smallest normal float, 2^-126, exp2's floor puts at most that instead
    tiny = torch.finfo(F32).tiny
    bound = 4e-7 * (1 + want_r.clamp(min=tiny).log().abs()) * want_r + tiny
    assert torch.all((r.double() - want_r).abs() <= bound)
    # weight 0 too, like torch's floored path on a CPU that cannot flush subnormals
    assert torch.all(r[2] <= tiny) and torch.all(r[4] <= tiny)
    assert torch.allclose(nk.double(), 0.5 + want_r.sum(1), rtol=1e-6)
    with pytest.raises(ValueError, match="contiguous"):
        normalise(r.T, nk)


@pytest.mark.parametrize("mixture", ["diag", "full", "spherical", "bernoulli"])
def test_a_fit_with_the_kernel_equals_one_with_torchs_operations(mixture, monkeypatch):
    built()
    x, w, m, p = blobs()
    t = lambda a: torch.from_numpy(a).to(F32)  # noqa: E731
    if mixture == "bernoulli":
        pixels = torch.rand(600, 30, generator=torch.Generator().manual_seed(0)) < t(x[:, :1]) / 20
        make = lambda: BernoulliMixture(4, tol=0, max_iter=20, seed=0).fit(pixels.to(F32))  # noqa: E731
    else:
        start = dict(weights_init=t(w), means_init=t(m), precisions_init=t(p[mixture]))
        make = lambda: GaussianMixture(4, mixture, tol=0, max_iter=20).fit(t(x), **start)  # noqa: E731
    fits = []
    for use in (False, True):
        if use:  # every pass of these 600 points uses it
            monkeypatch.setattr(native, "MIN_VALUES", 0)
        else:
            monkeypatch.setattr(native, "kernel", lambda like, values: None)
        fits.append(make())
        monkeypatch.undo()
    torch_ops, compiled = fits
    assert torch.allclose(compiled.means_, torch_ops.means_, rtol=1e-5, atol=1e-4)
    assert torch.allclose(compiled.weights_, torch_ops.weights_, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(compiled.history_, torch_ops.history_, rtol=1e-5)


def test_the_build_leaves_no_files_and_no_flush_mode(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(native, "_library", False)  # build again, in tmp_path
    built()
    assert list(tmp_path.iterdir()) == []  # the temporary folder went once loaded
    # -ffast-math at link time would add code that flushes subnormals when the library loads
    assert torch.full((1,), 1e-39, dtype=F32).mul_(1.0).item() != 0.0


@pytest.mark.parametrize(
    "setting", ["PPL_VAE_NATIVE=0", "CC=/nonexistent/cc", "CC=false", "float64", "small", "threads"]
)
def test_without_a_kernel_the_pass_uses_torchs_operations(setting, monkeypatch):
    monkeypatch.setattr(native, "_library", False)
    like, values = torch.zeros(1), native.MIN_VALUES
    if setting == "float64":
        like = like.double()
    elif setting == "small":
        values -= 1
    elif setting == "threads":
        monkeypatch.setattr(torch, "get_num_threads", lambda: native.MAX_THREADS + 1)
    else:
        monkeypatch.setenv(*setting.split("="))
    assert native.kernel(like, values) is None
    assert native.diag_pass(like.new_zeros(values, 1), 1) is None
    x, w, m, p = blobs()
    gm = GaussianMixture(4, "diag", max_iter=5, tol=0).fit(torch.from_numpy(x).to(like.dtype))
    assert np.isfinite(gm.lower_bound_)


def whole():
    """diag_pass's library, or a skip where this machine cannot build it with AVX-512."""
    built()
    if native.diag_pass(torch.zeros(native.MIN_VALUES, 1), 1) is None:
        pytest.skip("the compiler here does not target AVX-512")
    return native._library


def test_the_register_transpose_is_a_transpose():
    m = torch.arange(256, dtype=F32).view(16, 16)
    t = m.clone()
    whole().transpose_check(t.data_ptr())
    assert torch.equal(t, m.T)


@pytest.mark.parametrize(
    "n, d, k",
    [(1000, 32, 16), (1003, 7, 5), (37, 9, 1), (16, 8, 16), (271, 1, 3), (600, 17, 16)],
)
def test_the_whole_diag_pass_gives_float64s_sums_counts_and_log_likelihood(n, d, k, monkeypatch):
    """Against the same pass in float64: the joint a_x x + a_square x^2 + b, its softmax over the
    components, [r^T x, r^T x^2], sum_n r and the log-sum-exp; shapes with groups of 16 and
    blocks of 256 points cut short, columns in 8s and not, one to 16 components."""
    whole()
    monkeypatch.setattr(native, "MIN_VALUES", 0)
    g = torch.Generator().manual_seed(n + d + k)
    x = torch.randn(n, d, generator=g) + 0.5
    mu, prec = 2 * torch.randn(k, d, generator=g), torch.rand(k, d, generator=g) + 0.5
    a_x, a_square = mu * prec, -0.5 * prec
    b = torch.rand(k, generator=g).log() - 0.5 * (mu * a_x).sum(1) + 0.5 * prec.log().sum(1)
    if k > 2:
        b[1] = -float("inf")  # a component of weight 0
        b[2] -= 1e4  # far below the others: exp2's floor
    stats, nk, total = native.diag_pass(x, k)(a_x, a_square, b)
    x64, a_x, a_square, b = (t.double() for t in (x, a_x, a_square, b))
    joint = b[:, None] + a_x @ x64.T + a_square @ (x64 * x64).T
    r = torch.softmax(joint, 0)
    want = torch.cat([r @ x64, r @ (x64 * x64)], 1)
    # float32 rounding: sums of up to 256 products each, then over blocks
    assert torch.allclose(stats.double(), want, rtol=2e-6, atol=2e-6 * want.abs().max())
    assert torch.allclose(nk.double(), r.sum(1), rtol=2e-6, atol=1e-5)
    want_total = torch.logsumexp(joint, 0).sum().item()
    assert abs(total - want_total) <= 2e-7 * torch.logsumexp(joint, 0).abs().sum().item()
    if k > 2:
        assert nk[1] <= n * torch.finfo(F32).tiny and nk[2] <= n * torch.finfo(F32).tiny


def test_the_whole_diag_pass_steps_aside_where_it_cannot_run(monkeypatch):
    whole()
    x = torch.zeros(native.MIN_VALUES // 16, 16)
    assert native.diag_pass(x, native.LANES) is not None
    assert native.diag_pass(x, native.LANES + 1) is None  # one register of components
    assert native.diag_pass(x.T, native.LANES) is None  # not contiguous
    assert native.diag_pass(x.double(), native.LANES) is None
    monkeypatch.setattr(native, "_library", False)
    monkeypatch.setattr(native, "DIAG_SOURCE", "#error no AVX-512 here")
    assert native.diag_pass(x, native.LANES) is None  # built without it
    assert native.kernel(x, native.MIN_VALUES) is not None  # the normalisation still is


def test_a_diag_fit_runs_on_the_whole_pass_and_equals_the_chunked_one(monkeypatch):
    whole()
    x, w, m, p = blobs()
    t = lambda a: torch.from_numpy(a).to(F32)  # noqa: E731
    start = dict(weights_init=t(w), means_init=t(m), precisions_init=t(p["diag"]))
    calls = []
    pass_ = native.diag_pass

    def recorded(x, k):
        run = pass_(x, k)
        calls.append(run is not None)
        return run

    monkeypatch.setattr(native, "diag_pass", recorded)
    fits = []
    for values in (native.MIN_VALUES, 0):  # 600 points x 4: below, then above
        monkeypatch.setattr(native, "MIN_VALUES", values)
        fits.append(GaussianMixture(4, "diag", tol=0, max_iter=20).fit(t(x), **start))
    assert calls == 20 * [False] + 20 * [True]  # whole in the second fit only, every pass
    chunked, whole_ = fits
    assert torch.allclose(whole_.means_, chunked.means_, rtol=1e-5, atol=1e-4)
    assert torch.allclose(whole_.weights_, chunked.weights_, rtol=1e-4, atol=1e-6)
    assert torch.allclose(whole_.covariances_, chunked.covariances_, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(whole_.history_, chunked.history_, rtol=1e-5)
