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
    x, w, m, p = blobs()
    gm = GaussianMixture(4, "diag", max_iter=5, tol=0).fit(torch.from_numpy(x).to(like.dtype))
    assert np.isfinite(gm.lower_bound_)
