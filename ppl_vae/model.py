r"""The generative model p(z) p(x|z) as a Pyro program, and its observation likelihoods.

Every likelihood is built as ``LIKELIHOODS.build(name, event_shape, **options)``.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from ppl_vae.distributions import Bernoulli, StandardNormal
from ppl_vae.errors import InputError
from ppl_vae.registry import Registry
from ppl_vae.sites import LATENT, OBSERVED, check_batch, data_plate

__all__ = [
    "check_sigma",
    "check_sigma_floor",
    "LIKELIHOODS",
    "BernoulliLikelihood",
    "FixedGaussianLikelihood",
    "HeteroscedasticGaussianLikelihood",
    "LearnedGaussianLikelihood",
    "VAEModel",
    "data_plate",
]


class BernoulliLikelihood(nn.Module):
    r"""p(x|z) = Bernoulli(sigmoid(decoder(z))), for binary data.

    A likelihood declares ``requires_binary`` and ``decoder_outputs``: the decoder emits that
    many values per data coordinate, shaped ``(..., decoder_outputs, *event_shape)`` when more
    than one, else ``(..., *event_shape)``.
    """

    requires_binary = True
    decoder_outputs = 1

    def __init__(self, event_shape: torch.Size | tuple = ()):
        super().__init__()

    def forward(self, out: Tensor) -> Distribution:
        return Bernoulli(logits=out)  # Pyro's, with a faster log-probability without gradients


def check_sigma(sigma: float) -> float:
    """``sigma`` as a float; an error unless it is a positive, finite number."""
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
        raise InputError(f"sigma must be positive, got {sigma}")
    if not math.isfinite(sigma):
        raise InputError(
            f"sigma must be finite, got {sigma}; pass --sigma on the data's scale, e.g. 0.1 to 1 "
            f"for standardized data"
        )
    return float(sigma)


class FixedGaussianLikelihood(nn.Module):
    r"""p(x|z) = N(decoder(z), sigma^2 I) with a fixed ``sigma``."""

    requires_binary = False
    decoder_outputs = 1

    def __init__(self, event_shape: torch.Size, sigma: float = 0.1):
        super().__init__()
        self.sigma = check_sigma(sigma)

    def forward(self, out: Tensor) -> Distribution:
        return dist.Normal(out, self.sigma)


class LearnedGaussianLikelihood(nn.Module):
    r"""p(x|z) = N(decoder(z), diag(sigma^2)) with one learned sigma per dimension.

    .. math:: \sigma = \sigma_{min} + \operatorname{softplus}(\rho)

    The floor :math:`\sigma_{min}` keeps the density bounded on constant dimensions.
    """

    requires_binary = False
    decoder_outputs = 1

    def __init__(self, event_shape: torch.Size, sigma: float = 1.0, min_sigma: float = 1e-3):
        super().__init__()
        sigma = check_sigma(sigma)
        if not sigma > min_sigma:
            raise InputError(f"initial sigma must exceed {min_sigma}, got {sigma}")
        excess = sigma - min_sigma  # rho = softplus^-1(excess), written stably for large excess
        rho = (
            math.log(math.expm1(excess)) if excess < 20 else excess + math.log1p(-math.exp(-excess))
        )
        self.rho = nn.Parameter(torch.full(tuple(event_shape), rho))
        self.min_sigma = min_sigma

    @property
    def sigma(self) -> Tensor:
        return self.min_sigma + nn.functional.softplus(self.rho)

    def forward(self, out: Tensor) -> Distribution:
        return dist.Normal(out, self.sigma)


def check_sigma_floor(floor: float) -> float:
    """``floor`` as a float; an error unless it is a positive, finite number."""
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not floor > 0:
        raise InputError(f"sigma_floor must be positive, got {floor!r}; e.g. --sigma-floor 1e-3")
    if not math.isfinite(floor):
        raise InputError(f"sigma_floor must be finite, got {floor}; e.g. --sigma-floor 1e-3")
    return float(floor)


class HeteroscedasticGaussianLikelihood(nn.Module):
    r"""p(x|z) = N(mu(z), diag(sigma(z)^2)): the decoder emits a mean and a scale per coordinate.

    .. math:: \sigma(z) = \sigma_{floor} + \operatorname{softplus}(\rho(z))

    where ``(mu, rho)`` are the decoder's two outputs (``decoder_outputs = 2``). The floor, in
    the data's units, keeps the density bounded when the decoder would shrink σ onto a point.

    Example:
        >>> lik = HeteroscedasticGaussianLikelihood([3], sigma_floor=0.5)
        >>> lik(torch.zeros(2, 3) - 100).scale.min().item() >= 0.5
        True
    """

    requires_binary = False
    decoder_outputs = 2

    def __init__(self, event_shape: torch.Size | tuple = (), sigma_floor: float = 1e-3):
        super().__init__()
        self.event_dim = len(event_shape)
        self.sigma_floor = check_sigma_floor(sigma_floor)

    def parameters_of(self, out: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean, sigma)`` from the decoder output ``(..., 2, *event_shape)``."""
        mean, rho = out.unbind(out.dim() - self.event_dim - 1)
        return mean, self.sigma_floor + nn.functional.softplus(rho)

    def forward(self, out: Tensor) -> Distribution:
        return dist.Normal(*self.parameters_of(out))


LIKELIHOODS: Registry[nn.Module] = Registry("likelihood")
LIKELIHOODS.register(
    "bernoulli", BernoulliLikelihood, help="Bernoulli(sigmoid(decoder(z))), binary data"
)
LIKELIHOODS.register(
    "gaussian",
    LearnedGaussianLikelihood,
    options=("sigma",),
    help="N(decoder(z), diag sigma^2), sigma learned per dimension (--sigma: initial, default 1)",
)
LIKELIHOODS.register(
    "gaussian-fixed",
    FixedGaussianLikelihood,
    options=("sigma",),
    help="N(decoder(z), sigma^2 I), sigma fixed (--sigma, default 0.1)",
)
LIKELIHOODS.register(
    "gaussian-hetero",
    HeteroscedasticGaussianLikelihood,
    options=("sigma_floor",),
    help="N(mu(z), diag sigma(z)^2), mean and sigma from the decoder (sigma >= --sigma-floor)",
)


class VAEModel(nn.Module):
    r"""The generative model :math:`p(z) p(x|z)` with :math:`p(z) = N(0, I)` or a learned prior.

    Calling it runs the Pyro model: one latent ``"z"`` and one observation ``"x"`` per row of
    ``x``, inside the ``"data"`` plate.

    Arguments:
        decoder: Maps ``z`` of shape ``(..., latent_dim)`` to parameters of ``event_shape``.
        likelihood: Maps the decoder output to a torch distribution over one pixel/coordinate.
        latent_dim: Dimension of ``z``.
        event_shape: Shape of one data point.
        prior: A learned prior (:mod:`ppl_vae.priors`, ``forward(batch_shape)`` a distribution
            over z); None for N(0, I).

    Example:
        >>> from ppl_vae.networks import MLPDecoder
        >>> model = VAEModel(MLPDecoder(2, [4], [8], "tanh"), BernoulliLikelihood([4]), 2, [4])
        >>> trace = pyro.poutine.trace(model).get_trace(torch.ones(3, 4))
        >>> trace.nodes["z"]["value"].shape, trace.nodes["x"]["fn"].event_shape
        (torch.Size([3, 2]), torch.Size([4]))
    """

    def __init__(
        self,
        decoder: nn.Module,
        likelihood: nn.Module,
        latent_dim: int,
        event_shape,
        prior: nn.Module | None = None,
    ):
        super().__init__()
        self.decoder, self.likelihood = decoder, likelihood
        self.latent_dim = latent_dim
        self.event_shape = torch.Size(event_shape)
        self.register_buffer("_zero", torch.zeros(()), persistent=False)  # dtype and device
        if prior is not None:  # a learned prior (ppl_vae.priors); None: N(0, I)
            self.learned_prior = prior

    def prior(self, batch_shape: torch.Size | tuple = ()) -> Distribution:
        """p(z) with the given batch shape: N(0, I), or the learned prior given at
        construction (:mod:`ppl_vae.priors`)."""
        if hasattr(self, "learned_prior"):
            return self.learned_prior(tuple(batch_shape))
        shape = (*batch_shape, self.latent_dim)
        return StandardNormal(shape, self._zero.dtype, self._zero.device).to_event(1)

    def observation(self, z: Tensor) -> Distribution:
        """p(x|z) with event shape ``event_shape``."""
        return self.likelihood(self.decoder(z)).to_event(len(self.event_shape))

    def forward(self, x: Tensor, num_data: int | None = None) -> Tensor:
        check_batch(x, self.event_shape, "the model")
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
