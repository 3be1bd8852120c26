r"""Amortized guides q(z|x) as Pyro programs, looked up by name."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
from torch import Tensor, nn
from torch.distributions import Distribution

from ppl_vae.model import LATENT, data_plate

__all__ = ["GUIDES", "AmortizedGuide", "GaussianGuide", "make_guide"]


class AmortizedGuide(nn.Module):
    r"""Base class of amortized guides: an encoder and a head mapping features to q(z|x).

    A subclass implements :meth:`distribution`, which maps a batch ``x`` to a distribution over
    ``z`` with batch shape ``x.shape[:1]`` and event shape ``(latent_dim,)``. Calling the guide
    runs it as the Pyro guide matching :class:`~ppl_vae.model.VAEModel`.

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
        pyro.module("guide", self)
        with data_plate(x, num_data):
            return pyro.sample(LATENT, self.distribution(x))


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
        self.head = nn.Linear(encoder.feature_dim, 2 * latent_dim)

    def distribution(self, x: Tensor) -> Distribution:
        loc, raw_scale = self.head(self.encoder(x)).chunk(2, dim=-1)
        scale = nn.functional.softplus(raw_scale) + 1e-6
        return dist.Normal(loc, scale).to_event(1)


GUIDES: dict[str, type[AmortizedGuide]] = {
    "gaussian": GaussianGuide,
}


def make_guide(name: str, encoder: nn.Module, latent_dim: int, **options) -> AmortizedGuide:
    """The guide called ``name``, built on ``encoder``."""
    if name not in GUIDES:
        raise ValueError(f"unknown guide {name!r}; choose one of {', '.join(GUIDES)}")
    return GUIDES[name](encoder, latent_dim, **options)
