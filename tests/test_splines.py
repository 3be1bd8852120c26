"""Rational splines with identity tails chosen by torch.where: Pyro's values, fixed shapes."""

import pytest
import torch
from pyro.distributions.transforms import ConditionalSplineAutoregressive, Spline
from pyro.nn import ConditionalAutoRegressiveNN
from torch.fx.experimental.proxy_tensor import make_fx

from ppl_vae.errors import InputError
from ppl_vae.flows import conditional_spline
from ppl_vae.splines import ConditionalAutoregressiveSpline, RationalSpline

DIM, CONTEXT, BINS, BOUND = 4, 3, 6, 2.0
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}
# the inverse of a steep bin loses digits (Pyro's own round trip is off by 1e-2 in float32 and
# 1e-11 in float64 here): ours agrees with Pyro's well within what both lose
# ours against Pyro's inverse: D sequential network passes through steep bins amplify rounding
# (both lose up to 5e-7 against x itself; ours and Pyro's differ by 2e-10 under torch 2.14.1,
# by less under 2.15)
INVERSE = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-9, atol=1e-9)}


def points(n, dtype):
    """Normal draws wide enough that about a third lie outside [-BOUND, BOUND], the ends too."""
    x = 2.0 * torch.randn(n, DIM, dtype=dtype)
    x[0] = torch.tensor([-BOUND, BOUND, 0.0, 50.0])
    return x


def pyro_spline(order, dtype):
    spline = Spline(DIM, count_bins=BINS, bound=BOUND, order=order).to(dtype)
    with torch.no_grad():
        for p in spline.parameters():
            p.mul_(2.0)  # uneven bins and slopes
    raw = [spline.unnormalized_widths, spline.unnormalized_heights]
    raw.append(spline.unnormalized_derivatives)
    if order == "linear":
        raw.append(spline.unnormalized_lambdas)
    return spline, raw  # (D, K): ours take them transposed, (K, D)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("order", ["linear", "quadratic"])
def test_values_log_slopes_and_inverse_are_pyros_inside_and_outside_the_interval(order, dtype):
    torch.manual_seed(0)
    theirs, raw = pyro_spline(order, dtype)
    ours = RationalSpline(BINS, BOUND, order)
    x = points(200, dtype)
    outside = x.abs() > BOUND
    assert 0.2 < outside.float().mean() < 0.5
    y = theirs(x)
    want = theirs.log_abs_det_jacobian(x, y)
    got_y, got = ours.forward(x, *(r.T for r in raw))
    assert torch.allclose(got_y, y, **TOLERANCE[dtype])
    assert torch.allclose(got, want, **TOLERANCE[dtype])
    assert torch.equal(got_y[outside], x[outside]) and (got[outside] == 0).all()
    x_back = theirs._inverse(y)  # computed afresh: the cache holds x -> y only
    got_x, got_back = ours.inverse(y, *(r.T for r in raw))
    assert torch.allclose(got_x, x_back, **INVERSE[dtype])
    assert torch.allclose(got_back, theirs._cache_log_detJ, **INVERSE[dtype])
    if dtype == torch.float64:  # in float32 steep bins lose digits in both libraries alike
        assert torch.allclose(got_x, x, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("order", ["linear", "quadratic"])
def test_gradients_are_pyros_and_finite_at_every_point(order):
    torch.manual_seed(1)
    theirs, raw = pyro_spline(order, torch.float64)
    x = points(100, torch.float64).requires_grad_()
    y = theirs(x)
    (theirs.log_abs_det_jacobian(x, y).sum() + y.square().sum()).backward()
    want = [p.grad.clone() for p in (x, *raw)]
    for p in (x, *raw):
        p.grad = None
    y, log_slopes = RationalSpline(BINS, BOUND, order).forward(x, *(r.T for r in raw))
    (log_slopes.sum() + y.square().sum()).backward()
    for p, w in zip((x, *raw), want, strict=True):
        assert torch.isfinite(p.grad).all()
        assert torch.allclose(p.grad, w, rtol=1e-10, atol=1e-10)


def made_pair(reverse=False):
    """Our step and Pyro's on one conditional MADE."""
    made = ConditionalAutoRegressiveNN(
        DIM, CONTEXT, [16], param_dims=[BINS, BINS, BINS - 1, BINS],
        permutation=torch.arange(DIM).flip(0) if reverse else torch.arange(DIM),
    ).double()  # fmt: skip
    with torch.no_grad():
        for p in made.parameters():
            p.mul_(3.0)
    ours = ConditionalAutoregressiveSpline(DIM, made, RationalSpline(BINS, BOUND))
    theirs = ConditionalSplineAutoregressive(DIM, made, count_bins=BINS, bound=BOUND)
    return ours, theirs


@pytest.mark.parametrize("reverse", [False, True])
def test_the_autoregressive_step_is_pyros_forward_and_inverse(reverse):
    torch.manual_seed(2)
    ours, theirs = made_pair(reverse)
    h = torch.randn(7, CONTEXT, dtype=torch.float64)
    x = points(3 * 7, torch.float64).reshape(3, 7, DIM)  # particles, points, D
    mine, pyros = ours.condition(h), theirs.condition(h)
    y, want_y = mine(x), pyros(x)
    assert torch.allclose(y, want_y, rtol=1e-12, atol=1e-12)
    want = pyros.log_abs_det_jacobian(x, want_y)
    assert torch.allclose(mine.log_abs_det_jacobian(x, y), want, rtol=1e-12, atol=1e-12)
    fresh = ours.condition(h)  # no cache: the D network passes of the inverse
    x_back = fresh.inv(y)
    assert torch.allclose(x_back, theirs.condition(h).inv(y), **INVERSE[torch.float64])
    assert torch.allclose(x_back, x, rtol=1e-5, atol=1e-5)  # steep bins: digits lost alike
    assert torch.allclose(fresh.log_abs_det_jacobian(x_back, y), want, rtol=1e-5, atol=1e-5)
    uncached = ours.condition(h).log_abs_det_jacobian(x, y)  # recomputed from x
    assert torch.allclose(uncached, want, rtol=1e-12, atol=1e-12)


def test_the_step_has_pyros_parameter_names_and_loads_its_state():
    torch.manual_seed(3)
    pyros = ConditionalSplineAutoregressive(
        DIM,
        ConditionalAutoRegressiveNN(DIM, CONTEXT, [16], param_dims=[8, 8, 7, 8]),
        count_bins=8,
    )
    ours = conditional_spline(DIM, CONTEXT, hidden_dim=16)
    assert ours.state_dict().keys() == pyros.state_dict().keys()
    ours.load_state_dict(pyros.state_dict())
    h, x = torch.randn(5, CONTEXT), points(5, torch.float32)
    assert torch.allclose(ours.condition(h)(x), pyros.condition(h)(x), rtol=1e-5, atol=1e-5)


def test_a_step_records_with_value_independent_shapes():
    torch.manual_seed(4)
    step = conditional_spline(DIM, CONTEXT, hidden_dim=16)

    def forward(h, x):
        t = step.condition(h)
        y = t(x)
        return y, t.log_abs_det_jacobian(x, y)

    h, x = torch.randn(5, CONTEXT), points(5, torch.float32)
    record = make_fx(forward)(h, x)
    targets = {str(n.target) for n in record.graph.nodes if n.op == "call_function"}
    assert not {t for t in targets if "index" in t or "nonzero" in t or "masked" in t}
    x2 = 3 * torch.randn(5, DIM)  # other points outside the interval: the same record serves
    for got, want in zip(record(h, x2), forward(h, x2), strict=True):
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)


def test_bad_spline_arguments_name_the_fix():
    with pytest.raises(InputError, match="unknown spline order 'cubic'; choose one of linear"):
        RationalSpline(order="cubic")
    with pytest.raises(InputError, match="a spline needs 2..1000 bins, got 1"):
        RationalSpline(bins=1)
    with pytest.raises(InputError, match="bound must be positive, got 0"):
        RationalSpline(bound=0.0)
