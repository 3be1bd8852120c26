r"""Two stochastic layers (Burda et al., 2015): p(z₂) p(z₁|z₂) p(x|z₁), guide q(z₁|x) q(z₂|z₁).

Both are Pyro programs with the latent sites ``"z"`` (z₁, the layer next to x, so that the
pictures, the collapse diagnostics and ``model.observation`` read it as they read a one-layer
VAE's z) and ``"z2"``, in the ``"data"`` plate. Burda et al.'s sizes are the defaults: x →
100 → 100 → z₁ (100) → 50 → 50 → z₂ (50), tanh, and the mirror image for the model.

The guide draws z₂ given z₁, so the KL of z₁ has no closed form under that draw: train with
``--loss elbo`` or ``iwae`` (the ``meanfield`` loss is refused for this model).
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from ppl_vae.distributions import StandardNormal
from ppl_vae.guides import AmortizedGuide, DiagonalNormalHead
from ppl_vae.networks import MLP, MLPDecoder, MLPEncoder
from ppl_vae.sites import LATENT, OBSERVED, check_batch, data_plate

__all__ = ["TOP", "TwoLayerGuide", "TwoLayerModel", "two_layer_pair"]

TOP = "z2"  # the upper latent site; the lower one is LATENT ("z")
SIZES = {"z1": 100, "z2": 50, "hidden1": (100, 100), "hidden2": (50, 50)}  # Burda et al.


class TwoLayerModel(nn.Module):
    r""":math:`p(z_2)\, p(z_1 | z_2)\, p(x | z_1)`: z₂ ~ N(0, I), z₁ | z₂ a diagonal Gaussian
    from an MLP of z₂, x | z₁ from an MLP decoder and ``likelihood``.

    Arguments:
        likelihood: Maps the decoder's output to a distribution per coordinate
            (:data:`ppl_vae.model.LIKELIHOODS`).
        event_shape: Shape of one data point.
        latent_dims: (z₁, z₂) dimensions.
        hidden: Hidden widths of (x | z₁, z₁ | z₂), each read from the top down.
        act: Activation name.
    """

    latent_sites = frozenset({LATENT, TOP})  # what a KL warm-up scales

    def __init__(
        self,
        likelihood: nn.Module,
        event_shape: Sequence[int],
        latent_dims: tuple[int, int] = (SIZES["z1"], SIZES["z2"]),
        hidden: tuple[Sequence[int], Sequence[int]] = (SIZES["hidden1"], SIZES["hidden2"]),
        act: str = "tanh",
    ):
        super().__init__()
        self.likelihood = likelihood
        self.event_shape = torch.Size(event_shape)
        self.latent_dim, self.top_dim = latent_dims
        lower, upper = hidden
        outputs = getattr(likelihood, "decoder_outputs", 1)
        self.decoder = MLPDecoder(
            self.latent_dim, event_shape, tuple(reversed(lower)), act, outputs
        )
        self.middle = nn.Sequential(
            MLP([self.top_dim, *upper], act, final_activation=True),
            DiagonalNormalHead(upper[-1], self.latent_dim),
        )
        self.register_buffer("_zero", torch.zeros(()), persistent=False)  # dtype and device

    def top_prior(self, batch_shape: Sequence[int] = ()) -> Distribution:
        """p(z₂) = N(0, I)."""
        shape = (*batch_shape, self.top_dim)
        return StandardNormal(shape, self._zero.dtype, self._zero.device).to_event(1)

    def conditional(self, z2: Tensor) -> Distribution:
        """p(z₁ | z₂)."""
        return self.middle[1].family(self.middle(z2))

    def observation(self, z: Tensor) -> Distribution:
        """p(x | z₁) with event shape ``event_shape``."""
        return self.likelihood(self.decoder(z)).to_event(len(self.event_shape))

    def forward(self, x: Tensor, num_data: int | None = None) -> Tensor:
        check_batch(x, self.event_shape, "the model")
        pyro.module("model", self)
        with data_plate(x, num_data):
            z2 = pyro.sample(TOP, self.top_prior(x.shape[:1]))
            z = pyro.sample(LATENT, self.conditional(z2))
            pyro.sample(OBSERVED, self.observation(z), obs=x)
        return z

    @torch.no_grad()
    def sample(self, n: int, mean: bool = True) -> Tensor:
        """Draws ``n`` points, z₂ → z₁ → x; with ``mean``, E[x | z₁] instead of x."""
        z = self.conditional(self.top_prior((n,)).sample()).sample()
        px = self.observation(z)
        return px.mean if mean else px.sample()


class TwoLayerGuide(AmortizedGuide):
    r""":math:`q(z_1 | x)\, q(z_2 | z_1)`, both diagonal Gaussians; ``distribution(x)`` is
    q(z₁ | x), the layer the pictures and the collapse diagnostics read.

    Arguments:
        encoder: Maps ``x`` to features (x → 100 → 100 by default).
        latent_dims: (z₁, z₂) dimensions.
        hidden: Hidden widths of q(z₂ | z₁).
        act: Activation name.
    """

    def __init__(
        self,
        encoder: nn.Module,
        latent_dims: tuple[int, int] = (SIZES["z1"], SIZES["z2"]),
        hidden: Sequence[int] = SIZES["hidden2"],
        act: str = "tanh",
    ):
        super().__init__(encoder, latent_dims[0])
        self.top_dim = latent_dims[1]
        self.head = DiagonalNormalHead(encoder.feature_dim, self.latent_dim)
        self.upper = nn.Sequential(
            MLP([self.latent_dim, *hidden], act, final_activation=True),
            DiagonalNormalHead(hidden[-1], self.top_dim),
        )

    def distribution(self, x: Tensor) -> Distribution:
        return self.head.condition(self.encoder(x))

    def top(self, z: Tensor) -> Distribution:
        """q(z₂ | z₁)."""
        return self.upper[1].family(self.upper(z))

    def forward(self, x: Tensor, num_data: int | None = None) -> Tensor:
        check_batch(x, self.encoder.event_shape, "the guide")
        pyro.module("guide", self)
        with data_plate(x, num_data):
            z = pyro.sample(LATENT, self.distribution(x))
            pyro.sample(TOP, self.top(z))
        return z


def two_layer_pair(
    likelihood: nn.Module,
    event_shape: Sequence[int],
    latent_dims: tuple[int, int] = (SIZES["z1"], SIZES["z2"]),
    hidden: tuple[Sequence[int], Sequence[int]] = (SIZES["hidden1"], SIZES["hidden2"]),
    act: str = "tanh",
) -> tuple[TwoLayerModel, TwoLayerGuide]:
    """The model and its guide with mirrored sizes (Burda et al.'s by default)."""
    model = TwoLayerModel(likelihood, event_shape, latent_dims, hidden, act)
    guide = TwoLayerGuide(MLPEncoder(event_shape, hidden[0], act), latent_dims, hidden[1], act)
    return model, guide
