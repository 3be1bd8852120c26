r"""The generative model p(z) p(x|z) as a Pyro program, and its observation likelihoods."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import Tensor, nn
from torch.distributions import Distribution

__all__ = [
    "LATENT",
    "LIKELIHOODS",
    "PLATE",
    "BernoulliLikelihood",
    "FixedGaussianLikelihood",
    "LearnedGaussianLikelihood",
    "VAEModel",
    "data_plate",
    "make_likelihood",
]

LATENT = "z"  # the latent site shared by the model and every guide
PLATE = "data"  # the plate over the leading dimension of x
OBSERVED = "x"  # the observation site


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
        self.register_buffer("_zero", torch.zeros(()), persistent=False)
        self.register_buffer("_one", torch.ones(()), persistent=False)

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
        return dist.Normal(self._zero.expand(shape), self._one.expand(shape)).to_event(1)

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
