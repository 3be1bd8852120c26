r"""Conditional normalizing-flow steps for amortized guides: Pyro's transforms and Sylvester flows.

Every step is a :class:`~pyro.distributions.ConditionalTransformModule`: ``step.condition(h)``
returns a bijection whose parameters are computed from the context ``h`` (the encoder's features
of one data point), so a flow of such steps on top of an amortized base distribution is an
amortized guide. Planar, radial and affine autoregressive (IAF) steps are Pyro's; the spline
autoregressive step is :mod:`ppl_vae.splines` (Pyro's values and parameter names, with shapes that
do not depend on values, so that a step of it can be recorded); Pyro has no conditional Sylvester
flow, so it is written here.

References:
    Rezende & Mohamed (2015), Variational inference with normalizing flows.
    Kingma et al. (2016), Improved variational inference with inverse autoregressive flow.
    Durkan et al. (2019), Neural spline flows.
    Dolatabadi, Erfani & Leckie (2020), Invertible generative modeling using linear rational
    splines.
    van den Berg et al. (2018), Sylvester normalizing flows for variational inference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.transforms import (
    ConditionalAffineAutoregressive,
    ConditionalPlanar,
    ConditionalRadial,
)
from pyro.nn import ConditionalAutoRegressiveNN
from torch import Tensor, nn
from torch.distributions import Transform, constraints

from ppl_vae.errors import InputError
from ppl_vae.registry import Registry
from ppl_vae.splines import ConditionalAutoregressiveSpline, RationalSpline

__all__ = [
    "FLOWS",
    "DenseBasis",
    "HouseholderBasis",
    "PermutationBasis",
    "SYLVESTER_VARIANTS",
    "MAX_FLOW_LENGTH",
    "ConditionalSylvester",
    "Hypernet",
    "Sylvester",
    "check_flow_length",
    "conditional_iaf",
    "conditional_planar",
    "conditional_radial",
    "conditional_spline",
    "flow_steps",
    "step_size",
]

SylvesterVariant = Literal["orthogonal", "householder", "triangular"]
SYLVESTER_VARIANTS: tuple[str, ...] = get_args(SylvesterVariant)


class Hypernet(nn.Module):
    r"""A linear map from context features to the parameters of one flow step.

    As in van den Berg et al. (2018), a flow step's parameters are an affine function of the
    encoder's last hidden layer.

    Arguments:
        context_dim: Size of the context (the encoder's features).
        param_dims: Sizes of the parameter tensors, returned in this order.
    """

    def __init__(self, context_dim: int, param_dims: Sequence[int]):
        super().__init__()
        self.param_dims = [int(d) for d in param_dims]
        self.linear = nn.Linear(context_dim, sum(self.param_dims))

    def forward(self, context: Tensor) -> tuple[Tensor, ...]:
        return self.linear(context).split(self.param_dims, dim=-1)


def _matvec(m: Tensor, v: Tensor) -> Tensor:
    """``m @ v`` over the last dimensions, for ``v`` with the batch shape of ``m`` or more.

    Without extra dimensions, a broadcast product and sum (on CPU much cheaper than many tiny
    matrix-vector products). With extra leading dimensions in ``v`` (particles, say), those are
    moved into columns so that each matrix multiplies all its vectors at once and is never
    copied per particle.
    """
    extra = v.dim() - (m.dim() - 1)
    if extra <= 0:
        return (m * v.unsqueeze(-2)).sum(-1)
    lead = v.shape[:extra]
    columns = v.reshape(-1, *v.shape[extra:]).movedim(0, -1)  # (*batch, K, N)
    out = m @ columns  # (*batch, M, N)
    return out.movedim(-1, 0).reshape(*lead, *out.shape[:-1])


class DenseBasis:
    """Q given as a matrix with orthonormal columns, shape ``(..., D, M)``."""

    def __init__(self, q: Tensor):
        self.q = q

    def project(self, x: Tensor) -> Tensor:
        """Q^T x."""
        return _matvec(self.q.transpose(-1, -2), x)

    def embed(self, a: Tensor) -> Tensor:
        """Q a."""
        return _matvec(self.q, a)


class HouseholderBasis:
    """Q = H_1 ... H_K, H_k = I - 2 v_k v_k^T / |v_k|^2, from ``vectors`` of shape (..., K, D).

    The reflections are applied one by one, so Q (D x D) is never formed.
    """

    def __init__(self, vectors: Tensor):
        self.units = (vectors / vectors.norm(dim=-1, keepdim=True)).unbind(-2)

    @staticmethod
    def _reflect(x: Tensor, u: Tensor) -> Tensor:
        return x - 2 * u * (x * u).sum(-1, keepdim=True)

    def project(self, x: Tensor) -> Tensor:
        """Q^T x = H_K ... H_1 x."""
        for u in self.units:
            x = self._reflect(x, u)
        return x

    def embed(self, a: Tensor) -> Tensor:
        """Q a = H_1 ... H_K a."""
        for u in reversed(self.units):
            a = self._reflect(a, u)
        return a


class PermutationBasis:
    """Q = I, or the reversal permutation when ``reverse`` (its own inverse)."""

    def __init__(self, reverse: bool):
        self.reverse = reverse

    def project(self, x: Tensor) -> Tensor:
        """Q^T x."""
        return x.flip(-1) if self.reverse else x

    def embed(self, a: Tensor) -> Tensor:
        """Q a."""
        return a.flip(-1) if self.reverse else a


Basis = DenseBasis | HouseholderBasis | PermutationBasis


class Sylvester(Transform):
    r"""A Sylvester flow step with given parameters (van den Berg et al., 2018):

    .. math:: y = x + Q R_1 \tanh(R_2 Q^\top x + b),

    with ``Q`` (``D x M``) with orthonormal columns — a :class:`DenseBasis`,
    :class:`HouseholderBasis` or :class:`PermutationBasis` — and ``R_1``, ``R_2`` upper
    triangular ``(..., M, M)`` whose diagonals lie in (-1, 1). By Sylvester's determinant
    identity

    .. math:: \log |\det J| = \sum_{i=1}^{M} \log |1 + R_{1,ii} R_{2,ii} \tanh'(a_i)|,
        \quad a = R_2 Q^\top x + b,

    and every term is positive, so the step is invertible. The inverse has no closed form:
    values are scored through the cache of the forward pass (``cache_size=1``), which is how a
    guide scores its own draws. Leading dimensions of ``x`` broadcast against the parameters'.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, basis: Basis, r1: Tensor, r2: Tensor, bias: Tensor):
        super().__init__(cache_size=1)
        self.basis, self.r1, self.r2, self.bias = basis, r1, r2, bias

    def _preactivation(self, x: Tensor) -> Tensor:
        return _matvec(self.r2, self.basis.project(x)) + self.bias

    def _call(self, x: Tensor) -> Tensor:
        return x + self.basis.embed(_matvec(self.r1, torch.tanh(self._preactivation(x))))

    def _inverse(self, y: Tensor) -> Tensor:
        raise NotImplementedError(
            "a Sylvester flow has no closed-form inverse; only values it produced can be scored"
        )

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        slope = 1 - torch.tanh(self._preactivation(x)).pow(2)
        diag = self.r1.diagonal(dim1=-2, dim2=-1) * self.r2.diagonal(dim1=-2, dim2=-1)
        return torch.log1p(diag * slope).sum(-1)


class ConditionalSylvester(ConditionalTransformModule):
    r"""A Sylvester step whose ``Q``, ``R_1``, ``R_2`` and ``b`` are predicted from the context.

    Variants (van den Berg et al., 2018):

    - ``orthogonal``: ``Q`` is the orthonormal factor of a predicted ``D x M`` matrix (QR);
    - ``householder``: ``Q`` is a product of ``M`` predicted Householder reflections (D x D);
    - ``triangular``: ``Q`` is the identity, or the reversal permutation when ``reverse``.

    As in the paper, one predicted square matrix gives the strict upper triangles of both
    ``R_1`` (its upper part) and ``R_2`` (its lower part, transposed); the two diagonals are
    predicted separately and pass through tanh. The predictions start near 0, so a new step is
    close to the identity.

    Arguments:
        input_dim: Dimension D of the flow's variable.
        context_dim: Size of the context.
        variant: One of ``orthogonal``, ``householder``, ``triangular``.
        num_vectors: M, the number of orthonormal columns (``orthogonal``) or reflections
            (``householder``); ignored for ``triangular``. Defaults to D.
        reverse: For ``triangular``, use the reversal permutation as ``Q``.

    Example:
        >>> step = ConditionalSylvester(3, 5, "orthogonal", num_vectors=2)
        >>> step.condition(torch.randn(4, 5))(torch.randn(4, 3)).shape
        torch.Size([4, 3])
    """

    def __init__(
        self,
        input_dim: int,
        context_dim: int,
        variant: SylvesterVariant = "orthogonal",
        num_vectors: int | None = None,
        reverse: bool = False,
    ):
        super().__init__()
        if variant not in SYLVESTER_VARIANTS:
            choices = ", ".join(SYLVESTER_VARIANTS)
            raise InputError(f"unknown Sylvester variant {variant!r}; choose one of {choices}")
        num_vectors = input_dim if num_vectors is None else num_vectors
        if num_vectors < 1 or (variant == "orthogonal" and num_vectors > input_dim):
            raise InputError(f"num_vectors must lie in 1..{input_dim}, got {num_vectors}")
        self.input_dim, self.variant, self.num_vectors = input_dim, variant, num_vectors
        self.reverse = reverse
        self.width = num_vectors if variant == "orthogonal" else input_dim  # M, columns of Q
        q_size = {"orthogonal": input_dim * num_vectors, "householder": num_vectors * input_dim}
        m = self.width
        self.nn = Hypernet(context_dim, [q_size.get(variant, 0), m * m, m, m, m])
        with torch.no_grad():  # start close to the identity: R_1, R_2 and b near 0
            self.nn.linear.weight.mul_(0.01)
            self.nn.linear.bias.mul_(0.01)

    def _basis(self, raw: Tensor) -> Basis:
        d = self.input_dim
        if self.variant == "orthogonal":
            return DenseBasis(torch.linalg.qr(raw.unflatten(-1, (d, self.num_vectors))).Q)
        if self.variant == "householder":
            return HouseholderBasis(raw.unflatten(-1, (self.num_vectors, d)))
        return PermutationBasis(self.reverse)

    def condition(self, context: Tensor) -> Sylvester:
        raw_q, full, diag1, diag2, bias = self.nn(context)
        full = full.unflatten(-1, (self.width, self.width))
        r1 = full.triu(1) + torch.diag_embed(torch.tanh(diag1))
        r2 = full.transpose(-1, -2).triu(1) + torch.diag_embed(torch.tanh(diag2))
        return Sylvester(self._basis(raw_q), r1, r2, bias)


def _permutation(dim: int, reverse: bool) -> Tensor:
    """The order of an autoregressive step: natural, or reversed."""
    order = torch.arange(dim)
    return order.flip(0) if reverse else order


FLOWS: Registry[ConditionalTransformModule] = Registry("flow")
MADE_OUTPUTS = {  # the flows on a conditional MADE: its outputs per dimension (param_dims)
    "iaf": lambda: [1, 1],  # shift and log-scale
    "spline": lambda bins=8: RationalSpline(bins).param_dims,  # widths, heights, slopes, splits
}


@FLOWS.register("planar", help="planar steps (Rezende & Mohamed 2015)")
def conditional_planar(input_dim: int, context_dim: int) -> ConditionalTransformModule:
    """A planar step whose parameters are a linear function of the context."""
    return ConditionalPlanar(Hypernet(context_dim, [1, input_dim, input_dim]))


@FLOWS.register("radial", help="radial steps (Rezende & Mohamed 2015)")
def conditional_radial(input_dim: int, context_dim: int) -> ConditionalTransformModule:
    """A radial step whose parameters are a linear function of the context, starting as the
    identity.

    Pyro's step is z' = z + beta h(alpha, r)(z - z0) with alpha = softplus(alpha'), beta =
    -alpha + softplus(beta'); the rows of alpha' and beta' start at zero, so beta = 0 and a
    ``radial`` guide starts as the diagonal Gaussian guide of the same seed. (:class:`~ppl_vae.
    guides.FlowGuide` starts z0's rows as the base's mean.) In 50 dimensions a radial step is
    weak whatever its start, since |z - z0| hardly varies among the draws of one point:
    after 10 epochs on MNIST, -0.25 +- 0.12 nats from the diagonal Gaussian started this way,
    +0.05 +- 0.12 with random rows (docs/RESULTS.md).
    """
    hypernet = Hypernet(context_dim, [input_dim, 1, 1])
    with torch.no_grad():
        hypernet.linear.weight[input_dim:] = 0.0
        hypernet.linear.bias[input_dim:] = 0.0
    return ConditionalRadial(hypernet)


@FLOWS.register("iaf", options=("hidden_dim", "reverse"), help="affine autoregressive (IAF)")
def conditional_iaf(
    input_dim: int, context_dim: int, hidden_dim: int, reverse: bool = False
) -> ConditionalTransformModule:
    """An affine autoregressive step (Kingma et al. 2016) with a conditional MADE, starting as
    the identity.

    The step is z' = exp(s) z + m, (m, s) from the MADE, whose last layer starts at zero: the
    step is the identity at initialization, so an ``iaf`` guide starts as the diagonal Gaussian
    guide built from the same seed (the same ELBO; ``tests/test_guides.py``). Pyro's default,
    the gated step with random last weights, started 17 nats below that Gaussian on MNIST and
    ended below it (docs/RESULTS.md, "Guides at equal budget").
    """
    made = ConditionalAutoRegressiveNN(
        input_dim,
        context_dim,
        [hidden_dim],
        param_dims=MADE_OUTPUTS["iaf"](),
        permutation=_permutation(input_dim, reverse),
    )
    with torch.no_grad():
        made.layers[-1].weight.zero_()
        made.layers[-1].bias.zero_()
    return ConditionalAffineAutoregressive(made, stable=False)


@FLOWS.register(
    "spline", options=("hidden_dim", "reverse"), help="linear rational splines (autoregressive)"
)
def conditional_spline(
    input_dim: int,
    context_dim: int,
    hidden_dim: int,
    reverse: bool = False,
    bins: int = 8,
    bound: float = 3.0,
) -> ConditionalTransformModule:
    """A spline autoregressive step (Durkan et al. 2019) with a conditional MADE.

    The splines are linear rational (Dolatabadi et al. 2020), Pyro's default order and what
    ``spline`` runs have always used; the identity outside ``[-bound, bound]``.
    """
    spline = RationalSpline(bins, bound, "linear")
    made = ConditionalAutoRegressiveNN(
        input_dim,
        context_dim,
        [hidden_dim],
        param_dims=spline.param_dims,
        permutation=_permutation(input_dim, reverse),
    )
    return ConditionalAutoregressiveSpline(input_dim, made, spline)


def _sylvester(variant: SylvesterVariant, max_vectors: int | None):
    def factory(input_dim: int, context_dim: int, reverse: bool = False) -> ConditionalSylvester:
        vectors = None if max_vectors is None else min(input_dim, max_vectors)
        return ConditionalSylvester(input_dim, context_dim, variant, vectors, reverse)

    factory.__doc__ = f"A conditional Sylvester step, {variant} variant."
    return factory


FLOWS.register(
    "sylvester", _sylvester("orthogonal", 32), options=("reverse",),
    help="orthogonal Sylvester steps, 32 columns at most (van den Berg et al. 2018)",
)  # fmt: skip
FLOWS.register(
    "sylvester-householder", _sylvester("householder", 8), options=("reverse",),
    help="Householder Sylvester steps, 8 reflections at most",
)  # fmt: skip
FLOWS.register(
    "sylvester-triangular", _sylvester("triangular", None), options=("reverse",),
    help="triangular Sylvester steps",
)  # fmt: skip


MAX_FLOW_LENGTH = 1000  # published flow guides use tens of steps; each step is a module


def check_flow_length(length: int) -> int:
    """``length`` if it is a whole number of flow steps in 1..:data:`MAX_FLOW_LENGTH`."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise InputError(f"the flow length must be a positive integer, got {length!r}")
    if length > MAX_FLOW_LENGTH:
        raise InputError(
            f"flow_length {length} is far more steps than a flow guide needs (published ones "
            f"use tens; building and running each step takes time and memory); pass "
            f"--flow-length {MAX_FLOW_LENGTH} or fewer"
        )
    return length


def step_size(kind: str, input_dim: int, context_dim: int, hidden: int | None = None) -> int:
    """Parameters and buffers (elements) of one step of the flow ``kind``, counted without
    allocating them: the steps are built on the ``meta`` device, except those on Pyro's
    conditional MADE, which cannot be (its masks are read back), and are counted from its
    layers' shapes.
    """
    options = FLOWS.options(kind)
    if kind in MADE_OUTPUTS:
        d, c, h = input_dim, context_dim, max(4 * input_dim, 32) if hidden is None else hidden
        m = sum(MADE_OUTPUTS[kind]())
        # (d + c) -> h and h -> d * m masked linear layers (weight, bias and mask), permutation
        return 2 * h * (d + c) + h + 2 * h * d * m + d * m + d
    step = {"hidden_dim": hidden} if "hidden_dim" in options else {}
    with torch.device("meta"):
        module = FLOWS.build(kind, input_dim, context_dim, **step)
    return sum(t.numel() for t in (*module.parameters(), *module.buffers()))


def flow_steps(
    kind: str, input_dim: int, context_dim: int, length: int, hidden: int | None = None
) -> nn.ModuleList:
    """``length`` conditional steps of the flow ``kind`` (a name in :data:`FLOWS`).

    Steps that take ``reverse`` alternate it (odd steps reverse the order), so that
    autoregressive and triangular steps see every dimension both first and last.

    Arguments:
        kind: The flow.
        input_dim: Dimension of the flow's variable.
        context_dim: Size of the context the steps condition on.
        length: Number of steps.
        hidden: Width of the autoregressive networks (flows that take ``hidden_dim``);
            defaults to ``max(4 * input_dim, 32)``.
    """
    options = FLOWS.options(kind)
    check_flow_length(length)
    if hidden is not None and "hidden_dim" not in options:
        raise InputError(f"the {kind} flow has no hidden layer; drop --flow-hidden")
    if hidden is not None and hidden < 1:
        raise InputError(f"the flow's hidden width must be a positive integer, got {hidden}")
    steps = []
    for i in range(length):
        step = {"reverse": i % 2 == 1}
        if "hidden_dim" in options:
            step["hidden_dim"] = max(4 * input_dim, 32) if hidden is None else hidden
        steps.append(
            FLOWS.build(
                kind, input_dim, context_dim, **{k: v for k, v in step.items() if k in options}
            )
        )
    return nn.ModuleList(steps)
