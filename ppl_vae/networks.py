r"""Encoder and decoder networks: an MLP and the standard MNIST convolutional pair.

An encoder maps ``x`` to features and exposes their size as ``feature_dim``; a decoder maps
``z`` to a tensor of the data's event shape. ``NETWORKS.build(kind, event_shape, latent_dim,
**options)`` returns the pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ppl_vae.config import option
from ppl_vae.errors import InputError
from ppl_vae.registry import Registry

__all__ = [
    "check_hidden",
    "ACTIVATIONS",
    "NETWORKS",
    "ConvDecoder",
    "ConvEncoder",
    "MLP",
    "MLPDecoder",
    "MLPEncoder",
    "NetworkConfig",
    "conv_pair",
    "mlp_pair",
    "output_shape",
]

ACTIVATIONS: Registry[nn.Module] = Registry("activation")
for _name, _module in {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
}.items():
    ACTIVATIONS.register(_name, _module)


def activation(name: str) -> nn.Module:
    """The activation module called ``name``."""
    return ACTIVATIONS.build(name)


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
        self.event_shape = torch.Size(event_shape)  # the shape of one point
        self.event_dim = len(event_shape)
        self.in_dim = int(torch.Size(event_shape).numel())
        self.net = MLP([self.in_dim, *hidden], act, final_activation=True)
        self.feature_dim = hidden[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.reshape(*x.shape[: x.dim() - self.event_dim], self.in_dim))


def output_shape(event_shape: Sequence[int], outputs: int) -> torch.Size:
    """A decoder's output for one point: ``event_shape``, or ``(outputs, *event_shape)``."""
    event_shape = torch.Size(event_shape)
    return event_shape if outputs == 1 else torch.Size([outputs, *event_shape])


class MLPDecoder(nn.Module):
    """Maps ``z`` through ``hidden`` to a tensor of ``event_shape`` (logits or means), or of
    ``(outputs, *event_shape)`` for a likelihood with several parameters per coordinate."""

    def __init__(
        self,
        latent_dim: int,
        event_shape: Sequence[int],
        hidden: Sequence[int],
        act: str,
        outputs: int = 1,
    ):
        super().__init__()
        self.event_shape = output_shape(event_shape, outputs)
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
        self.event_shape = torch.Size([1, 28, 28])  # the shape of one point

    def forward(self, x: Tensor) -> Tensor:
        batch = x.shape[:-3]
        return self.net(x.reshape(-1, 1, 28, 28)).reshape(*batch, self.feature_dim)


class ConvDecoder(nn.Module):
    """Dense to 7x7x32, two stride-2 transposed convolutions (64, 32), then a conv to one
    channel per output (``outputs`` values per pixel)."""

    def __init__(self, latent_dim: int, act: str = "relu", outputs: int = 1):
        super().__init__()
        self.out_shape = output_shape((1, 28, 28), outputs)
        self.dense = nn.Sequential(nn.Linear(latent_dim, 32 * 7 * 7), activation(act))
        self.net = nn.Sequential(
            nn.ConvTranspose2d(32, 64, 3, stride=2, padding=1, output_padding=1),
            activation(act),
            nn.ConvTranspose2d(64, 32, 3, stride=2, padding=1, output_padding=1),
            activation(act),
            nn.Conv2d(32, outputs, 3, padding=1),
        )

    def forward(self, z: Tensor) -> Tensor:
        batch = z.shape[:-1]
        h = self.dense(z).reshape(-1, 32, 7, 7)
        return self.net(h).reshape(*batch, *self.out_shape)


def check_hidden(hidden: Sequence[int]) -> tuple[int, ...]:
    """``hidden`` as a tuple of widths; an error unless they are one or more positive ints."""
    widths = tuple(hidden)
    if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
        raise InputError(f"hidden sizes must be positive integers, got {widths}")
    return widths


NETWORKS: Registry[tuple[nn.Module, nn.Module]] = Registry("network")


@NETWORKS.register("mlp", options=("hidden", "activation"), help="MLP encoder, mirrored decoder")
def mlp_pair(
    event_shape: Sequence[int],
    latent_dim: int,
    hidden: Sequence[int] = (200, 200),
    activation: str = "tanh",
    *,
    outputs: int = 1,
) -> tuple[MLPEncoder, MLPDecoder]:
    """An MLP encoder through ``hidden`` and a decoder through the same widths reversed, with
    ``outputs`` values per data coordinate."""
    check_hidden(hidden)
    encoder = MLPEncoder(event_shape, hidden, activation)
    decoder = MLPDecoder(latent_dim, event_shape, tuple(hidden)[::-1], activation, outputs)
    return encoder, decoder


@NETWORKS.register("conv", options=("activation",), help="the MNIST conv pair (1x28x28 images)")
def conv_pair(
    event_shape: Sequence[int], latent_dim: int, activation: str = "relu", *, outputs: int = 1
) -> tuple[ConvEncoder, ConvDecoder]:
    """The convolutional encoder/decoder pair for 1x28x28 images."""
    if torch.Size(event_shape) != torch.Size([1, 28, 28]):
        raise InputError(
            f"the conv network needs 1x28x28 images, but the data have shape "
            f"{tuple(event_shape)}; use --network mlp"
        )
    return ConvEncoder(activation), ConvDecoder(latent_dim, activation, outputs)


def _hidden_sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise InputError(f"expected comma-separated integers like 200,200, got {text!r}") from None


@dataclass(frozen=True)
class NetworkConfig:
    """The encoder/decoder architecture."""

    architecture: str = option(
        "mlp", "encoder/decoder pair", flags=("--architecture", "--network"), choices=NETWORKS
    )
    hidden: tuple[int, ...] | None = option(
        None, "MLP hidden widths, comma-separated; the decoder mirrors them (default 200,200)",
        parse=_hidden_sizes, metavar="W1,W2,...",
    )  # fmt: skip
    activation: str = option("tanh", "nonlinearity between layers", choices=ACTIVATIONS)

    def __post_init__(self):
        NETWORKS.check(self.architecture)
        ACTIVATIONS.check(self.activation)
        if self.hidden is not None:
            object.__setattr__(self, "hidden", check_hidden(self.hidden))
        NETWORKS.check_options(self.architecture, self._options(), prefix="--")

    def _options(self) -> dict:
        return {"hidden": self.hidden} if self.hidden is not None else {}

    def build(
        self, event_shape: Sequence[int], latent_dim: int, outputs: int = 1
    ) -> tuple[nn.Module, nn.Module]:
        """Builds ``(encoder, decoder)``; the encoder exposes ``feature_dim``, the decoder emits
        ``outputs`` values per data coordinate (see :func:`output_shape`)."""
        entry = NETWORKS[self.architecture]  # outputs is the likelihood's, not a user option
        return entry.factory(
            torch.Size(event_shape), latent_dim, activation=self.activation, outputs=outputs,
            **self._options(),
        )  # fmt: skip
