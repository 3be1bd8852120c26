r"""The generative model p(z) p(x|z) as a Pyro program, and its observation likelihoods."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import Tensor, nn
from torch.distributions import Distribution, constraints, register_kl

__all__ = [
    "LATENT",
    "LIKELIHOODS",
    "PLATE",
    "BernoulliLikelihood",
    "FixedGaussianLikelihood",
    "LearnedGaussianLikelihood",
    "StandardNormal",
    "VAEModel",
    "data_plate",
    "make_likelihood",
]

LATENT = "z"  # the latent site shared by the model and every guide
PLATE = "data"  # the plate over the leading dimension of x
OBSERVED = "x"  # the observation site
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class StandardNormal(dist.TorchDistribution):
    r"""N(0, 1) with a batch shape: ``dist.Normal(0., 1.).expand(batch_shape)`` without parameters.

    .. math:: \log p(z) = -\tfrac12 z^2 - \tfrac12 \log 2\pi

    is three tensor operations where ``Normal`` takes nine (it also differentiates in its
    location and scale), which matters in a training step where every operation is recorded
    for the backward pass. The KL divergence from ``Normal`` to it is registered, so
    ``TraceMeanField_ELBO`` uses the closed form.
    """

    arg_constraints: dict = {}
    support = constraints.real
    has_rsample = True

    def __init__(self, batch_shape=(), dtype=torch.float32, device=None, validate_args=None):
        self.dtype, self.device = dtype, device
        super().__init__(torch.Size(batch_shape), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(StandardNormal, _instance)
        new.dtype, new.device = self.dtype, self.device
        super(StandardNormal, new).__init__(torch.Size(batch_shape), validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def mean(self) -> Tensor:
        return torch.zeros(self.batch_shape, dtype=self.dtype, device=self.device)

    @property
    def variance(self) -> Tensor:
        return torch.ones(self.batch_shape, dtype=self.dtype, device=self.device)

    def rsample(self, sample_shape=()) -> Tensor:
        shape = self._extended_shape(sample_shape)
        return torch.randn(shape, dtype=self.dtype, device=self.device)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        log_p = value.square().mul(-0.5).sub(HALF_LOG_2PI)
        shape = torch.broadcast_shapes(value.shape, self.batch_shape + self.event_shape)
        return log_p if log_p.shape == shape else log_p.expand(shape)

    def entropy(self) -> Tensor:
        entropy = 0.5 + HALF_LOG_2PI
        return torch.full(self.batch_shape, entropy, dtype=self.dtype, device=self.device)


@register_kl(torch.distributions.Normal, StandardNormal)
def _kl_normal_standard_normal(q: torch.distributions.Normal, p: StandardNormal) -> Tensor:
    return 0.5 * (q.loc.square() + q.scale.square() - 1) - q.scale.log()


class data_plate:
    r"""The ``"data"`` plate over the leading dimension of ``x``, as a context manager.

    With ``num_data``, every site inside is also scaled by ``num_data / len(x)`` so that a
    mini-batch loss estimates the loss on the whole data set.
    """

    def __init__(self, x: Tensor, num_data: int | None = None):
        self.plate = pyro.plate(PLATE, x.shape[0], dim=-1)
        scaled = num_data is not None and num_data != x.shape[0]
        self.scale = poutine.scale(scale=num_data / x.shape[0]) if scaled else None

    def __enter__(self):
        self.plate.__enter__()
        if self.scale is not None:
            self.scale.__enter__()

    def __exit__(self, *exc):
        if self.scale is not None:
            self.scale.__exit__(*exc)
        return self.plate.__exit__(*exc)


class BernoulliLikelihood(nn.Module):
    r"""p(x|z) = Bernoulli(sigmoid(decoder(z))), for binary data."""

    requires_binary = True

    def forward(self, out: Tensor) -> Distribution:
        return dist.Bernoulli(logits=out)


class FixedGaussianLikelihood(nn.Module):
    r"""p(x|z) = N(decoder(z), sigma^2 I) with a fixed ``sigma``."""

    requires_binary = False

    def __init__(self, event_shape: torch.Size, sigma: float = 0.1):
        super().__init__()
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        self.sigma = float(sigma)

    def forward(self, out: Tensor) -> Distribution:
        return dist.Normal(out, self.sigma)


class LearnedGaussianLikelihood(nn.Module):
    r"""p(x|z) = N(decoder(z), diag(sigma^2)) with one learned sigma per dimension.

    .. math:: \sigma = \sigma_{min} + \operatorname{softplus}(\rho)

    The floor :math:`\sigma_{min}` keeps the density bounded on constant dimensions.
    """

    requires_binary = False

    def __init__(self, event_shape: torch.Size, sigma: float = 1.0, min_sigma: float = 1e-3):
        super().__init__()
        if not sigma > min_sigma:
            raise ValueError(f"initial sigma must exceed {min_sigma}, got {sigma}")
        rho = math.log(math.expm1(sigma - min_sigma))
        self.rho = nn.Parameter(torch.full(tuple(event_shape), rho))
        self.min_sigma = min_sigma

    @property
    def sigma(self) -> Tensor:
        return self.min_sigma + nn.functional.softplus(self.rho)

    def forward(self, out: Tensor) -> Distribution:
        return dist.Normal(out, self.sigma)


LIKELIHOODS: dict[str, type[nn.Module]] = {
    "bernoulli": BernoulliLikelihood,
    "gaussian": LearnedGaussianLikelihood,
    "gaussian-fixed": FixedGaussianLikelihood,
}


def make_likelihood(name: str, event_shape: torch.Size, sigma: float | None = None) -> nn.Module:
    """The likelihood called ``name`` (``sigma``: fixed value or initial value)."""
    if name not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {name!r}; choose one of {', '.join(LIKELIHOODS)}")
    if name == "bernoulli":
        return BernoulliLikelihood()
    kwargs = {} if sigma is None else {"sigma": sigma}
    return LIKELIHOODS[name](event_shape, **kwargs)


class VAEModel(nn.Module):
    r"""The generative model :math:`p(z) p(x|z)` with :math:`p(z) = N(0, I)`.

    Calling it runs the Pyro model: one latent ``"z"`` and one observation ``"x"`` per row of
    ``x``, inside the ``"data"`` plate.

    Arguments:
        decoder: Maps ``z`` of shape ``(..., latent_dim)`` to parameters of ``event_shape``.
        likelihood: Maps the decoder output to a torch distribution over one pixel/coordinate.
        latent_dim: Dimension of ``z``.
        event_shape: Shape of one data point.

    Example:
        >>> from ppl_vae.networks import MLPDecoder
        >>> model = VAEModel(MLPDecoder(2, [4], [8], "tanh"), BernoulliLikelihood(), 2, [4])
        >>> trace = pyro.poutine.trace(model).get_trace(torch.ones(3, 4))
        >>> trace.nodes["z"]["value"].shape, trace.nodes["x"]["fn"].event_shape
        (torch.Size([3, 2]), torch.Size([4]))
    """

    def __init__(self, decoder: nn.Module, likelihood: nn.Module, latent_dim: int, event_shape):
        super().__init__()
        self.decoder, self.likelihood = decoder, likelihood
        self.latent_dim = latent_dim
        self.event_shape = torch.Size(event_shape)
        self.register_buffer("_zero", torch.zeros(()), persistent=False)  # dtype and device

    def check(self, x: Tensor) -> None:
        """Raises ``ValueError`` when ``x`` does not have the shape the networks take."""
        if x.shape[1:] != self.event_shape:
            raise ValueError(
                f"data of shape {tuple(x.shape)} do not fit the model, which expects "
                f"(N, {', '.join(map(str, self.event_shape))})"
            )

    def prior(self, batch_shape: torch.Size | tuple = ()) -> Distribution:
        """p(z) = N(0, I) with the given batch shape."""
        shape = (*batch_shape, self.latent_dim)
        return StandardNormal(shape, self._zero.dtype, self._zero.device).to_event(1)

    def observation(self, z: Tensor) -> Distribution:
        """p(x|z) with event shape ``event_shape``."""
        return self.likelihood(self.decoder(z)).to_event(len(self.event_shape))

    def forward(self, x: Tensor, num_data: int | None = None) -> Tensor:
        pyro.module("model", self)
        with data_plate(x, num_data):
            z = pyro.sample(LATENT, self.prior(x.shape[:1]))
            pyro.sample(OBSERVED, self.observation(z), obs=x)
        return z

    @torch.no_grad()
    def sample(self, n: int, mean: bool = True) -> Tensor:
        """Draws ``n`` points from the model; with ``mean``, returns E[x|z] instead of x."""
        z = self.prior((n,)).sample()
        px = self.observation(z)
        return px.mean if mean else px.sample()
