r"""Monotonic rational splines with identity tails, chosen elementwise so a step has fixed shapes.

Pyro's spline transforms (``pyro.distributions.transforms.spline``) compute the spline for
every point and then overwrite the points outside ``[-B, B]`` with the identity through a
boolean mask (``y[outside] = x[outside]``), an operation whose shapes depend on values: a
record of the step (:class:`ppl_vae.capture.CapturedLoss`) cannot follow it, and the ``spline``
guide ran eagerly. Here the spline is evaluated at every point, those outside replaced by 0 (so
that every branch is finite and has finite gradients), the identity at the input itself, and
``torch.where`` chooses between them point by point. The values are Pyro's: the same knots,
minimum widths, heights and derivatives, the same bin search, the same formulas (the two
pieces of a linear rational bin are chosen by ``torch.where`` before the one division, where
Pyro multiplies by 0/1 masks), and the step's module holds only the autoregressive network,
named ``nn`` as in Pyro's :class:`~pyro.distributions.transforms.ConditionalSplineAutoregressive`,
so that checkpoints of either load into the other.

References:
    Durkan et al. (2019), Neural spline flows.
    Dolatabadi, Erfani & Leckie (2020), Invertible generative modeling using linear rational
    splines.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from pyro.distributions.conditional import ConditionalTransformModule
from torch import Tensor, nn
from torch.distributions import Transform, constraints

from ppl_vae.errors import InputError

__all__ = [
    "SPLINE_ORDERS",
    "AutoregressiveSpline",
    "ConditionalAutoregressiveSpline",
    "RationalSpline",
]

SplineOrder = Literal["linear", "quadratic"]
SPLINE_ORDERS: tuple[str, ...] = get_args(SplineOrder)
_MIN_WIDTH = _MIN_HEIGHT = _MIN_DERIVATIVE = 1e-3  # Pyro's defaults: every bin stays usable
_MIN_LAMBDA = 0.025  # the split point of a linear rational bin stays inside it
_EPS = 1e-6  # knots are moved right by this in the bin search, as in Pyro


def _normalized(raw: Tensor, minimum: float) -> Tensor:
    """Fractions summing to 1 over the bins (dim -2), each at least ``minimum``: a softmax."""
    return minimum + (1.0 - minimum * raw.shape[-2]) * F.softmax(raw, dim=-2)


def _knots(fractions: Tensor, bound: float) -> Tensor:
    """The K + 1 knots on ``[-bound, bound]`` (dim -2) from K fractions summing to 1.

    The end knots are exactly ``-bound`` and ``bound`` (not the rounded cumulative sums).
    """
    lower, upper = -bound, bound
    knots = (upper - lower) * F.pad(torch.cumsum(fractions, dim=-2), (0, 0, 1, 0)) + lower
    last = torch.arange(knots.shape[-2], device=knots.device) == knots.shape[-2] - 1
    return torch.where(last[:, None], upper, knots)


def _bins(values: Tensor, knots: Tensor) -> Tensor:
    """The bin of each value, ``(..., 1, D)``: the last knot (shifted by eps) not above it."""
    index = torch.sum(values[..., None, :] >= knots + _EPS, dim=-2, keepdim=True) - 1
    return index.clamp(min=0, max=knots.shape[-2] - 2)


def _select(table: Tensor, index: Tensor, like: Tensor) -> tuple[Tensor, ...]:
    """The rows ``index`` and ``index + 1`` of ``table`` ``(..., K + 1, D, P)``: P pairs of
    tensors like ``like`` (the values at a bin's left and right knots)."""
    shape = torch.broadcast_shapes(table.shape[:-3], like.shape[:-1])
    table = table.expand(*shape, *table.shape[-3:])
    index = torch.cat([index, index + 1], dim=-2).expand(*shape, 2, like.shape[-1])
    pairs = table.gather(-3, index[..., None].expand(*index.shape, table.shape[-1]))
    return tuple(zip(pairs[..., 0, :, :].unbind(-1), pairs[..., 1, :, :].unbind(-1), strict=True))


def _linear_knot(bottom, height, delta, d0, d1, lam):
    """A linear rational bin's weights at its right end and split point (1 at its left end),
    its bottom and top, and its value at the split point."""
    wb = torch.sqrt(d0 / d1)
    wc = (lam * d0 + (1 - lam) * wb * d1) / delta
    ya, yb = bottom, height + bottom
    yc = ((1.0 - lam) * ya + lam * wb * yb) / ((1.0 - lam) + lam * wb)
    return wb, wc, ya, yb, yc


def _linear_forward(x, left, width, bottom, height, delta, d0, d1, lam):
    """A linear rational bin (Dolatabadi et al. 2020): y and log dy/dx at x in the bin."""
    wb, wc, ya, yb, yc = _linear_knot(bottom, height, delta, d0, d1, lam)
    theta = (x - left) / width
    first = theta <= lam
    numerator = torch.where(
        first, ya * (lam - theta) + wc * yc * theta, wc * yc * (1 - theta) + wb * yb * (theta - lam)
    )
    denominator = torch.where(
        first, (lam - theta) + wc * theta, wc * (1 - theta) + wb * (theta - lam)
    )
    slope = torch.where(first, wc * lam * (yc - ya), wb * wc * (1 - lam) * (yb - yc)) / width
    return numerator / denominator, torch.log(slope) - 2 * torch.log(torch.abs(denominator))


def _linear_inverse(y, left, width, bottom, height, delta, d0, d1, lam):
    """The inverse of :func:`_linear_forward` in the bin: x and log dy/dx at x."""
    wb, wc, ya, yb, yc = _linear_knot(bottom, height, delta, d0, d1, lam)
    first = y <= yc
    numerator = torch.where(first, lam * (ya - y), (wc - lam * wb) * y + lam * wb * yb - wc * yc)
    denominator = torch.where(first, (wc - 1) * y + ya - wc * yc, (wc - wb) * y + wb * yb - wc * yc)
    slope = torch.where(first, wc * lam * (yc - ya), wb * wc * (1 - lam) * (yb - yc)) * width
    x = numerator / denominator * width + left
    return x, -(torch.log(slope) - 2 * torch.log(torch.abs(denominator)))


def _quadratic_forward(x, left, width, bottom, height, delta, d0, d1):
    """A rational-quadratic bin (Durkan et al. 2019): y and log dy/dx at x in the bin."""
    theta = (x - left) / width
    between = theta * (1 - theta)
    denominator = delta + (d0 + d1 - 2 * delta) * between
    y = bottom + height * (delta * theta.pow(2) + d0 * between) / denominator
    slope = delta.pow(2) * (d1 * theta.pow(2) + 2 * delta * between + d0 * (1 - theta).pow(2))
    return y, torch.log(slope) - 2 * torch.log(denominator)


def _quadratic_inverse(y, left, width, bottom, height, delta, d0, d1):
    """The inverse of :func:`_quadratic_forward` in the bin: x and log dy/dx at x."""
    curvature = d0 + d1 - 2 * delta
    a = (y - bottom) * curvature + height * (delta - d0)
    b = height * d0 - (y - bottom) * curvature
    c = -delta * (y - bottom)
    root = (2 * c) / (-b - torch.sqrt((b.pow(2) - 4 * a * c).clamp(min=0)))
    between = root * (1 - root)
    denominator = delta + curvature * between
    slope = delta.pow(2) * (d1 * root.pow(2) + 2 * delta * between + d0 * (1 - root).pow(2))
    return root * width + left, torch.log(slope) - 2 * torch.log(denominator)


_ORDERS = {  # order -> (forward, inverse) of one bin
    "linear": (_linear_forward, _linear_inverse),
    "quadratic": (_quadratic_forward, _quadratic_inverse),
}


@dataclass(frozen=True)
class RationalSpline:
    r"""An elementwise monotonic rational spline on ``[-bound, bound]``, the identity outside.

    Parameters come unconstrained, as a network predicts them, with shapes ``(..., K, D)``
    (``K - 1`` rows for the derivatives at the inner knots; a MADE's layout): widths and
    heights pass through a softmax, derivatives through a softplus, and the linear order's
    split points through a sigmoid. Each function returns the output and ``log |dy/dx|`` per
    element.

    Arguments:
        bins: K, the number of bins.
        bound: B; the spline maps ``[-B, B]`` onto itself.
        order: ``linear`` (Dolatabadi et al. 2020; Pyro's default, with a split point per bin)
            or ``quadratic`` (Durkan et al. 2019).

    Example:
        >>> s = RationalSpline(bins=4, bound=3.0, order="quadratic")
        >>> raw = torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(3, 2)  # D = 2
        >>> y, log_slope = s.forward(torch.tensor([0.5, 7.0]), *raw)
        >>> y[1].item(), log_slope[1].item()  # outside [-3, 3]: the identity
        (7.0, 0.0)
    """

    bins: int = 8
    bound: float = 3.0
    order: SplineOrder = "linear"

    def __post_init__(self):
        if self.order not in SPLINE_ORDERS:
            choices = ", ".join(SPLINE_ORDERS)
            raise InputError(f"unknown spline order {self.order!r}; choose one of {choices}")
        if self.bins < 2 or self.bins * _MIN_WIDTH > 1:
            raise InputError(f"a spline needs 2..{int(1 / _MIN_WIDTH)} bins, got {self.bins}")
        if not self.bound > 0:
            raise InputError(f"the spline's bound must be positive, got {self.bound}")

    @property
    def param_dims(self) -> list[int]:
        """The number of unconstrained parameters per dimension, in the order taken."""
        k = self.bins
        return [k, k, k - 1] + ([k] if self.order == "linear" else [])

    def _apply(self, values: Tensor, params: tuple[Tensor, ...], inverse: bool):
        widths, heights, derivatives, *lambdas = params
        xs = _knots(_normalized(widths, _MIN_WIDTH), self.bound)
        ys = _knots(_normalized(heights, _MIN_HEIGHT), self.bound)
        slopes = F.pad(
            _MIN_DERIVATIVE + F.softplus(derivatives), (0, 0, 1, 1), value=1 - _MIN_DERIVATIVE
        )
        columns = [xs, ys, slopes]
        if self.order == "linear":  # a split point per bin, padded to K + 1 rows like the rest
            split = (1 - 2 * _MIN_LAMBDA) * torch.sigmoid(lambdas[0]) + _MIN_LAMBDA
            columns.append(F.pad(split, (0, 0, 0, 1), value=0.5))
        inside = (values >= -self.bound) & (values <= self.bound)
        safe = torch.where(inside, values, 0.0)  # outside, the spline at 0: finite, as its grads
        index = _bins(safe, ys if inverse else xs)
        (left, right), (bottom, top), (d0, d1), *split = _select(
            torch.stack(columns, dim=-1), index, safe
        )
        width, height = right - left, top - bottom
        bin_params = [left, width, bottom, height, height / width, d0, d1]
        bin_params += [lam for lam, _ in split]
        out, log_slope = _ORDERS[self.order][1 if inverse else 0](safe, *bin_params)
        return torch.where(inside, out, values), torch.where(inside, log_slope, 0.0)

    def forward(self, x: Tensor, *params: Tensor) -> tuple[Tensor, Tensor]:
        """``y`` and ``log |dy/dx|`` at ``x``, given the unconstrained parameters."""
        return self._apply(x, params, inverse=False)

    def inverse(self, y: Tensor, *params: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` and ``log |dy/dx|`` at that ``x``, given the unconstrained parameters."""
        return self._apply(y, params, inverse=True)


class AutoregressiveSpline(Transform):
    r"""An autoregressive spline step: :math:`y_d = g_{\theta_d(x_{<d})}(x_d)`.

    ``made(x)`` returns the spline's unconstrained parameters, each ``(..., P, D)`` (a MADE's
    layout), for every dimension from the preceding ones in its order. The forward pass is one
    network evaluation; the inverse takes D, one per dimension of the order. ``log |det J|`` is
    cached with the last pair (``cache_size=1``), which is how a guide scores its own draws.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    autoregressive = True

    def __init__(self, made: Callable[[Tensor], tuple[Tensor, ...]], spline: RationalSpline):
        super().__init__(cache_size=1)
        self.made, self.spline = made, spline
        self._log_slopes: Tensor | None = None  # of the cached pair

    def _params(self, x: Tensor) -> tuple[Tensor, ...]:
        return self.made(x)

    def _call(self, x: Tensor) -> Tensor:
        y, self._log_slopes = self.spline.forward(x, *self._params(x))
        return y

    def _inverse(self, y: Tensor) -> Tensor:
        x = torch.zeros_like(y)
        for _ in range(y.shape[-1]):  # dimension i of the order is right after pass i
            x, self._log_slopes = self.spline.inverse(y, *self._params(x))
        return x

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        cached_x, cached_y = self._cached_x_y
        if x is cached_x and y is cached_y and self._log_slopes is not None:
            return self._log_slopes.sum(-1)
        return self.spline.forward(x, *self._params(x))[1].sum(-1)


class ConditionalAutoregressiveSpline(ConditionalTransformModule):
    r"""A spline autoregressive step whose network also reads a context (Durkan et al. 2019).

    The values of Pyro's :class:`~pyro.distributions.transforms.ConditionalSplineAutoregressive`
    with the same network, and its parameter names (the network is ``nn``).

    Arguments:
        input_dim: D.
        autoregressive_nn: A conditional MADE, ``nn(x, context=h)`` returning the spline's
            parameters with ``param_dims`` equal to ``spline.param_dims``.
        spline: The spline of every dimension.

    Example:
        >>> from pyro.nn import ConditionalAutoRegressiveNN
        >>> made = ConditionalAutoRegressiveNN(3, 5, [16], param_dims=[8, 8, 7, 8])
        >>> step = ConditionalAutoregressiveSpline(3, made, RationalSpline(bins=8))
        >>> step.condition(torch.randn(4, 5))(torch.randn(4, 3)).shape
        torch.Size([4, 3])
    """

    def __init__(self, input_dim: int, autoregressive_nn: nn.Module, spline: RationalSpline):
        super().__init__()
        self.input_dim, self.nn, self.spline = input_dim, autoregressive_nn, spline

    def condition(self, context: Tensor) -> AutoregressiveSpline:
        return AutoregressiveSpline(partial(self.nn, context=context), self.spline)
