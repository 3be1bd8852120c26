r"""Encoder and decoder networks: an MLP and the standard MNIST convolutional pair."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = [
    "ACTIVATIONS",
    "NETWORKS",
    "ConvDecoder",
    "ConvEncoder",
    "MLP",
    "MLPDecoder",
    "MLPEncoder",
    "NetworkConfig",
    "build_networks",
]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
}


def activation(name: str) -> nn.Module:
    """The activation module called ``name``."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class MLP(nn.Sequential):
    r"""A multi-layer perceptron ``sizes[0] -> ... -> sizes[-1]``.

    Arguments:
        sizes: Layer widths, input first.
        act: Activation name, applied after every layer except the last (unless
            ``final_activation``).
        final_activation: Also apply the activation after the last layer.
    """

    def __init__(self, sizes: Sequence[int], act: str = "tanh", final_activation: bool = False):
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2 or final_activation:
                layers.append(activation(act))
        super().__init__(*layers)


class MLPEncoder(nn.Module):
    """Flattens ``x`` and maps it to ``hidden[-1]`` features."""

    def __init__(self, event_shape: Sequence[int], hidden: Sequence[int], act: str):
        super().__init__()
        self.event_dim = len(event_shape)
        self.in_dim = int(torch.Size(event_shape).numel())
        self.net = MLP([self.in_dim, *hidden], act, final_activation=True)
        self.feature_dim = hidden[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.reshape(*x.shape[: x.dim() - self.event_dim], self.in_dim))


class MLPDecoder(nn.Module):
    """Maps ``z`` through ``hidden`` to a tensor of ``event_shape`` (logits or means)."""

    def __init__(
        self, latent_dim: int, event_shape: Sequence[int], hidden: Sequence[int], act: str
    ):
        super().__init__()
        self.event_shape = torch.Size(event_shape)
        self.net = MLP([latent_dim, *hidden, self.event_shape.numel()], act)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z).reshape(*z.shape[:-1], *self.event_shape)


class ConvEncoder(nn.Module):
    """Two stride-2 3x3 convolutions (32 and 64 channels) over 1x28x28 images, flattened."""

    def __init__(self, act: str = "relu"):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, stride=2, padding=1),
            activation(act),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            activation(act),
            nn.Flatten(),
        )
        self.feature_dim = 64 * 7 * 7

    def forward(self, x: Tensor) -> Tensor:
        batch = x.shape[:-3]
        return self.net(x.reshape(-1, 1, 28, 28)).reshape(*batch, self.feature_dim)


class ConvDecoder(nn.Module):
    """Dense to 7x7x32, two stride-2 transposed convolutions (64, 32), then a 1-channel conv."""

    def __init__(self, latent_dim: int, act: str = "relu"):
        super().__init__()
        self.dense = nn.Sequential(nn.Linear(latent_dim, 32 * 7 * 7), activation(act))
        self.net = nn.Sequential(
            nn.ConvTranspose2d(32, 64, 3, stride=2, padding=1, output_padding=1),
            activation(act),
            nn.ConvTranspose2d(64, 32, 3, stride=2, padding=1, output_padding=1),
            activation(act),
            nn.Conv2d(32, 1, 3, padding=1),
        )

    def forward(self, z: Tensor) -> Tensor:
        batch = z.shape[:-1]
        h = self.dense(z).reshape(-1, 32, 7, 7)
        return self.net(h).reshape(*batch, 1, 28, 28)


NETWORKS: tuple[str, ...] = ("mlp", "conv")


@dataclass(frozen=True)
class NetworkConfig:
    """The encoder/decoder architecture."""

    kind: str = "mlp"  # "mlp" or "conv" (the conv pair needs 1x28x28 images)
    hidden: tuple[int, ...] = field(default=(200, 200))  # MLP widths; the decoder mirrors them
    activation: str = "tanh"  # nonlinearity between layers


def build_networks(
    config: NetworkConfig, event_shape: Sequence[int], latent_dim: int
) -> tuple[nn.Module, nn.Module]:
    """Builds ``(encoder, decoder)``; the encoder exposes ``feature_dim``."""
    event_shape = torch.Size(event_shape)
    activation(config.activation)  # validates the name before any layer is built
    if latent_dim < 1:
        raise ValueError(f"latent dimension must be positive, got {latent_dim}")
    if config.kind == "mlp":
        if not config.hidden or min(config.hidden) < 1:
            raise ValueError(f"hidden sizes must be positive integers, got {config.hidden}")
        encoder = MLPEncoder(event_shape, config.hidden, config.activation)
        decoder = MLPDecoder(latent_dim, event_shape, config.hidden[::-1], config.activation)
        return encoder, decoder
    if config.kind == "conv":
        if event_shape != torch.Size([1, 28, 28]):
            raise ValueError(
                f"the conv network needs 1x28x28 images, but the data have shape "
                f"{tuple(event_shape)}; use --network mlp"
            )
        return ConvEncoder(config.activation), ConvDecoder(latent_dim, config.activation)
    raise ValueError(f"unknown network {config.kind!r}; choose one of {', '.join(NETWORKS)}")
