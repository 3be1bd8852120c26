r"""Amortized guides q(z|x) as Pyro programs: Gaussians and normalizing flows, looked up by name."""

from __future__ import annotations

from functools import partial

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.conditional import ConditionalDistribution
from torch import Tensor, nn
from torch.distributions import Distribution

from ppl_vae.distributions import DiagonalNormal
from ppl_vae.errors import InputError
from ppl_vae.flows import FLOWS, flow_steps, step_size
from ppl_vae.registry import Registry
from ppl_vae.sites import LATENT, check_batch, data_plate

__all__ = [
    "GUIDES",
    "AmortizedGuide",
    "DiagonalNormalHead",
    "FlowGuide",
    "FullRankGaussianGuide",
    "GaussianGuide",
    "LowRankGaussianGuide",
    "ZukoGuide",
    "guide_size",
    "make_guide",
]


class AmortizedGuide(nn.Module):
    r"""Base class of amortized guides: an encoder and a head mapping features to q(z|x).

    A subclass implements :meth:`distribution`, which maps a batch ``x`` to a distribution over
    ``z`` with batch shape ``x.shape[:1]`` and event shape ``(latent_dim,)``. Calling the guide
    runs it as the Pyro guide matching :class:`~ppl_vae.model.VAEModel`.

    A guide whose q(z|x) is a fixed map of per-point parameters also has
    ``point_parameters(x)``, shape ``(N, P)``, and ``family(params)``, the distribution of
    those parameters, with ``distribution(x) == family(point_parameters(x))``; the best q of
    the family for each point (:func:`ppl_vae.gaps.inference_gaps`) optimizes them freely.
    For the Gaussian guides the parameters are the head's output (the Gaussian itself); for
    the flow guides they are the base Gaussian's and the context the steps are conditioned
    on, the steps' own weights held fixed.

    Arguments:
        encoder: Maps ``x`` to features of size ``encoder.feature_dim``.
        latent_dim: Dimension of ``z``.
    """

    def __init__(self, encoder: nn.Module, latent_dim: int):
        super().__init__()
        self.encoder = encoder
        self.latent_dim = latent_dim

    def distribution(self, x: Tensor) -> Distribution:
        raise NotImplementedError

    def forward(self, x: Tensor, num_data: int | None = None) -> Tensor:
        event_shape = getattr(self.encoder, "event_shape", None)  # where the encoder says
        if event_shape is not None:
            check_batch(x, event_shape, "the guide")
        pyro.module("guide", self)
        with data_plate(x, num_data):
            return pyro.sample(LATENT, self.distribution(x))


class DiagonalNormalHead(nn.Linear, ConditionalDistribution):
    r"""A linear layer read as N(mu(h), diag(sigma(h)^2)), sigma = softplus + 1e-6.

    ``head.condition(h)`` is the distribution for features ``h``; it is the base distribution
    of the flow guides.
    """

    def __init__(self, feature_dim: int, latent_dim: int):
        super().__init__(feature_dim, 2 * latent_dim)

    def condition(self, features: Tensor) -> Distribution:
        return self.family(self(features))

    @staticmethod
    def family(params: Tensor) -> Distribution:
        """The diagonal Gaussian of the head's output ``params``: loc, then raw scale."""
        loc, raw_scale = params.chunk(2, dim=-1)
        return DiagonalNormal(loc, nn.functional.softplus(raw_scale) + 1e-6).to_event(1)


class GaussianGuide(AmortizedGuide):
    r"""q(z|x) = N(mu(x), diag(sigma(x)^2)), with sigma = softplus of the encoder's output.

    Example:
        >>> import torch
        >>> from ppl_vae.networks import MLPEncoder
        >>> guide = GaussianGuide(MLPEncoder([4], [8], "tanh"), latent_dim=2)
        >>> guide.distribution(torch.ones(3, 4)).batch_shape
        torch.Size([3])
    """

    def __init__(self, encoder: nn.Module, latent_dim: int):
        super().__init__(encoder, latent_dim)
        self.head = DiagonalNormalHead(encoder.feature_dim, latent_dim)

    def family(self, params: Tensor) -> Distribution:
        return self.head.family(params)

    def point_parameters(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))

    def distribution(self, x: Tensor) -> Distribution:
        return self.family(self.point_parameters(x))


class LowRankGaussianGuide(AmortizedGuide):
    r"""q(z|x) = N(mu(x), diag(sigma(x)) (I + V(x) V(x)^T) diag(sigma(x))), V of shape
    (latent_dim, rank).

    mu and sigma come from the diagonal Gaussian's head (:class:`DiagonalNormalHead`, built
    first, as in :class:`GaussianGuide`), V from a second linear head whose weights start at
    1/100 of PyTorch's default (V = 0 exactly would be a saddle: the ELBO's gradient in V is
    linear in V). V is dimensionless, relative to sigma, as M of :class:`FullRankGaussianGuide`:
    with the factor in the data's units beside sigma ~ 0.1, the guide did not beat the diagonal
    Gaussian on MNIST after 10 epochs (docs/RESULTS.md).

    Arguments:
        encoder: Maps ``x`` to features.
        latent_dim: Dimension of ``z``.
        rank: Columns of the covariance factor V.
    """

    def __init__(self, encoder: nn.Module, latent_dim: int, rank: int = 2):
        super().__init__(encoder, latent_dim)
        if not 1 <= rank <= latent_dim:
            raise InputError(f"the rank must lie in 1..{latent_dim} (the latent dim), got {rank}")
        self.rank = rank
        self.head = DiagonalNormalHead(encoder.feature_dim, latent_dim)
        self.factor = nn.Linear(encoder.feature_dim, latent_dim * rank)
        with torch.no_grad():
            self.factor.weight *= 0.01
            self.factor.bias *= 0.01

    def point_parameters(self, x: Tensor) -> Tensor:
        features = self.encoder(x)
        return torch.cat([self.head(features), self.factor(features)], dim=-1)

    def distribution(self, x: Tensor) -> Distribution:
        return self.family(self.point_parameters(x))

    def family(self, params: Tensor) -> Distribution:
        d = self.latent_dim
        loc, raw_scale, factor = params.split([d, d, d * self.rank], dim=-1)
        scale = nn.functional.softplus(raw_scale) + 1e-6
        relative = factor.unflatten(-1, (d, self.rank))
        return dist.LowRankMultivariateNormal(loc, scale.unsqueeze(-1) * relative, scale**2)


class FullRankGaussianGuide(AmortizedGuide):
    r"""q(z|x) = N(mu(x), L(x) L(x)^T) with L(x) = diag(sigma(x)) (I + M(x)), M strictly lower.

    mu and sigma come from the diagonal Gaussian's head (:class:`DiagonalNormalHead`), M from a
    second linear head that starts at zero, so the guide starts as the diagonal Gaussian guide
    of the same seed (the same ELBO; ``tests/test_guides.py``). M is dimensionless: row i of
    z - mu is sigma_i (eps_i + sum_{j<i} M_ij eps_j). The second head's output is scaled by
    1/sqrt(latent_dim) (:attr:`shear_scale`): a row of M sums up to latent_dim - 1 entries, and
    at the head's full scale Adam's steps, noisy for every entry alike, moved each row's
    correlations sqrt(latent_dim) times as far as a diagonal entry, and the guide ended below
    the diagonal Gaussian on MNIST (docs/RESULTS.md).
    """

    def __init__(self, encoder: nn.Module, latent_dim: int):
        super().__init__(encoder, latent_dim)
        rows, cols = torch.tril_indices(latent_dim, latent_dim, offset=-1)
        self.register_buffer("rows", rows, False)
        self.register_buffer("cols", cols, False)
        self.head = DiagonalNormalHead(encoder.feature_dim, latent_dim)
        self.shear_scale = latent_dim**-0.5
        # built without drawing from the random stream, so what is built after it is as beside
        # a diagonal Gaussian guide (and on the head's device, "meta" when only counted)
        self.shear = nn.Linear(encoder.feature_dim, rows.numel(), device="meta")
        self.shear.to_empty(device=self.head.weight.device)
        with torch.no_grad():
            self.shear.weight.zero_()
            self.shear.bias.zero_()

    def point_parameters(self, x: Tensor) -> Tensor:
        features = self.encoder(x)
        return torch.cat([self.head(features), self.shear(features)], dim=-1)

    def distribution(self, x: Tensor) -> Distribution:
        return self.family(self.point_parameters(x))

    def family(self, params: Tensor) -> Distribution:
        d = self.latent_dim
        loc, raw_scale, entries = params.split([d, d, self.rows.numel()], dim=-1)
        scale = nn.functional.softplus(raw_scale) + 1e-6
        unit = (
            torch.eye(d, dtype=params.dtype, device=params.device)
            .expand(*entries.shape[:-1], d, d)
            .clone()
        )
        unit[..., self.rows, self.cols] = self.shear_scale * entries
        return dist.MultivariateNormal(loc, scale_tril=scale.unsqueeze(-1) * unit)


class FlowGuide(AmortizedGuide):
    r"""q(z|x): the diagonal Gaussian of :class:`GaussianGuide` pushed through flow steps.

    Every step is conditioned on the encoder's features of the same data point, so the whole
    flow is amortized: the density is Pyro's ``ConditionalTransformedDistribution`` of the base
    and the steps, conditioned on those features.

    Arguments:
        encoder: Maps ``x`` to features of size ``encoder.feature_dim``.
        latent_dim: Dimension of ``z``.
        flow: A name in :data:`ppl_vae.flows.FLOWS`.
        flow_length: Number of steps.
        flow_hidden: Width of the autoregressive networks (``iaf``, ``spline``).
    """

    def __init__(
        self,
        encoder: nn.Module,
        latent_dim: int,
        flow: str = "planar",
        flow_length: int = 4,
        flow_hidden: int | None = None,
    ):
        super().__init__(encoder, latent_dim)
        self.head = DiagonalNormalHead(encoder.feature_dim, latent_dim)
        self.steps = flow_steps(flow, latent_dim, encoder.feature_dim, flow_length, flow_hidden)
        if flow == "radial":  # each step's centre z0 starts at the base's mean mu(x)
            with torch.no_grad():
                for step in self.steps:
                    step.nn.linear.weight[:latent_dim] = self.head.weight[:latent_dim]
                    step.nn.linear.bias[:latent_dim] = self.head.bias[:latent_dim]

    def point_parameters(self, x: Tensor) -> Tensor:
        """The base Gaussian's parameters (loc, raw scale) and the steps' context, per point."""
        features = self.encoder(x)
        return torch.cat([self.head(features), features], dim=-1)

    def family(self, params: Tensor) -> Distribution:
        """The flow of base parameters and context ``params`` (see :meth:`point_parameters`):
        freed from each other, they reach every q that the steps' weights allow, the amortized
        one (context = the features the base came from) included."""
        base, context = params[..., : 2 * self.latent_dim], params[..., 2 * self.latent_dim :]
        steps = [step.condition(context) for step in self.steps]
        return dist.TransformedDistribution(self.head.family(base), steps)

    def distribution(self, x: Tensor) -> Distribution:
        return self.family(self.point_parameters(x))


class ZukoGuide(AmortizedGuide):
    r"""q(z|x): a `zuko <https://zuko.readthedocs.io>`_ flow with the encoder's features as
    context, wrapped for Pyro by :class:`pyro.contrib.zuko.ZukoToPyro`.

    Needs the optional ``zuko`` package (``pip install "ppl_vae[zuko]"``).

    Arguments:
        encoder: Maps ``x`` to features.
        latent_dim: Dimension of ``z``.
        flow: A class name in ``zuko.flows``, e.g. ``NSF`` or ``MAF``.
        flow_length: Number of transforms.
        passes: Autoregressive passes of each transform; the default 2 makes them coupling
            layers, so that drawing from the guide is parallel (``None``: fully autoregressive,
            one pass per latent dimension when sampling).
    """

    def __init__(
        self,
        encoder: nn.Module,
        latent_dim: int,
        flow: str = "NSF",
        flow_length: int = 4,
        passes: int | None = 2,
    ):
        super().__init__(encoder, latent_dim)
        try:
            import zuko
        except ImportError:
            raise InputError(
                "zuko guides need the optional zuko package; pip install 'ppl_vae[zuko]'"
            ) from None
        self.flow = getattr(zuko.flows, flow)(
            features=latent_dim, context=encoder.feature_dim, transforms=flow_length, passes=passes
        )

    def point_parameters(self, x: Tensor) -> Tensor:
        """The flow's context per point (the encoder's features)."""
        return self.encoder(x)

    def family(self, params: Tensor) -> Distribution:
        """The flow conditioned on the context ``params``, its weights held fixed."""
        from pyro.contrib.zuko import ZukoToPyro

        return ZukoToPyro(self.flow(params))

    def distribution(self, x: Tensor) -> Distribution:
        return self.family(self.point_parameters(x))


GUIDES: Registry[AmortizedGuide] = Registry("guide")
GUIDES.register("gaussian", GaussianGuide, help="N(mu(x), diag sigma(x)^2)")
GUIDES.register(
    "lowrank", LowRankGaussianGuide, options=("rank",),
    help="N(mu(x), W(x) W(x)^T + diag d(x)), W with --rank columns (default 2)",
)  # fmt: skip
GUIDES.register("fullrank", FullRankGaussianGuide, help="N(mu(x), L(x) L(x)^T), L predicted")
for _flow in FLOWS:
    _options = (
        ("flow_length", "flow_hidden") if "hidden_dim" in FLOWS.options(_flow) else ("flow_length",)
    )
    GUIDES.register(
        _flow, partial(FlowGuide, flow=_flow), options=_options,
        help=f"the diagonal Gaussian through --flow-length (default 4) {FLOWS[_flow].help}",
    )  # fmt: skip
GUIDES.register(
    "zuko-nsf", partial(ZukoGuide, flow="NSF"), options=("flow_length",),
    help="a zuko neural spline flow (coupling layers; needs the zuko package)",
)  # fmt: skip
GUIDES.register(
    "zuko-maf", partial(ZukoGuide, flow="MAF"), options=("flow_length",),
    help="a zuko masked autoregressive flow (coupling layers; needs the zuko package)",
)  # fmt: skip


def make_guide(name: str, encoder: nn.Module, latent_dim: int, **options) -> AmortizedGuide:
    """The guide called ``name`` (a name in :data:`GUIDES`), built on ``encoder``.

    ``options`` are the ones that guide declares (``rank``, ``flow_length``, ``flow_hidden``);
    any other is an error that names it.
    """
    return GUIDES.build(name, encoder, latent_dim, **options)


class _Features(nn.Module):
    """A stand-in encoder with ``feature_dim`` features, for counting a guide's own size."""

    def __init__(self, feature_dim: int):
        super().__init__()
        self.feature_dim = feature_dim


def guide_size(name: str, feature_dim: int, latent_dim: int, **options) -> int | None:
    """Parameters and buffers (elements) of the guide ``name`` on an encoder of
    ``feature_dim`` features, the encoder not counted; ``None`` where it cannot be counted.

    Nothing is allocated: a flow guide is its head and ``flow_length`` times
    :func:`~ppl_vae.flows.step_size`; another guide is built on the ``meta`` device, with at
    most two transforms, and its length extrapolated.

    Example:
        >>> guide_size("gaussian", feature_dim=200, latent_dim=50)  # (200 + 1) * 2 * 50
        20100
        >>> guide_size("planar", 200, 50, flow_length=1_000_000_000) > 10**13
        True
    """
    if name in FLOWS:
        head = (feature_dim + 1) * 2 * latent_dim
        step = step_size(name, latent_dim, feature_dim, options.get("flow_hidden"))
        return head + options.get("flow_length", 4) * step

    def count(**changed) -> int:
        with torch.device("meta"):
            guide = GUIDES.build(name, _Features(feature_dim), latent_dim, **options, **changed)
        return sum(t.numel() for t in (*guide.parameters(), *guide.buffers()))

    try:
        length = options.pop("flow_length", 4) if "flow_length" in GUIDES.options(name) else None
        if length is None:
            return count()
        one, two = count(flow_length=1), count(flow_length=2)
        return one + (length - 1) * (two - one)
    except InputError:
        raise
    except Exception:  # a guide that cannot be built on the meta device
        return None
