r"""A conditional VAE (Sohn et al., 2015) that completes images from some of their quadrants.

An image is split into the visible part ``x`` (the input) and the hidden rest ``y`` (to be
predicted), as in Pyro's ``examples/cvae``. Both keep the image's shape; a pixel that a tensor
does not hold is :data:`HIDDEN` (-1), as in Pyro's example: ``x`` is -1 on the hidden pixels and
``y`` on the visible ones, and the model reads which pixels to predict from ``x`` alone.

.. math::
    p(y|x) = \int p(z|x)\, p(y|x, z)\, dz, \qquad q(z|x, y) \approx p(z|x, y)

The model scores only the hidden pixels (a Bernoulli per pixel, masked with ``.mask``), so a
value of ``y`` on a visible pixel is ignored. Images must be binary (statically or dynamically
binarized), as for the library's Bernoulli likelihood; Pyro's example scores gray intensities
with validation off instead.

References:
    Learning Structured Output Representation using Deep Conditional Generative Models
    (Sohn et al., 2015), https://papers.nips.cc/paper/5775
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pyro
import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from ppl_vae.distributions import Bernoulli
from ppl_vae.errors import InputError
from ppl_vae.guides import DiagonalNormalHead
from ppl_vae.importance import log_likelihood
from ppl_vae.networks import MLP, check_hidden
from ppl_vae.sites import LATENT, check_batch, data_plate

__all__ = [
    "HIDDEN",
    "QUADRANTS",
    "TARGET",
    "VISIBLE_ORDER",
    "BaselineNet",
    "CVAEGuide",
    "CVAEModel",
    "baseline_log_likelihood",
    "check_visible",
    "conditional_log_likelihood",
    "cvae_pair",
    "hidden_pixels",
    "join",
    "quadrant_mask",
    "split_quadrants",
]

HIDDEN = -1.0  # marks a pixel a tensor does not hold (Pyro's example marks them with -1 too)
TARGET = "y"  # the observed site: the hidden pixels
QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")
VISIBLE_ORDER = ("bottom-left", "top-left", "top-right")  # visible=k shows the first k (Pyro's)
IMAGE_SHAPE = (1, 28, 28)  # the library's MNIST images, (channels, height, width)


def check_visible(visible: int) -> int:
    """``visible`` as an int; an error unless it is 1, 2 or 3 quadrants."""
    if isinstance(visible, bool) or not isinstance(visible, int) or visible not in (1, 2, 3):
        raise InputError(f"visible must be 1, 2 or 3 quadrants, got {visible!r}")
    return visible


def quadrant_mask(shape: Sequence[int] = (28, 28), visible: int = 1) -> Tensor:
    r"""The visible pixels of an image of ``shape`` (height, width), a bool tensor of that shape.

    The quadrants split the rows at ``height // 2`` and the columns at ``width // 2``;
    ``visible=1`` shows the bottom-left quadrant, 2 also the top-left one (the left half), 3
    also the top-right one: the bottom-right quadrant is always hidden (Pyro's example's sets).

    Example:
        >>> quadrant_mask((4, 4), visible=1).int()
        tensor([[0, 0, 0, 0],
                [0, 0, 0, 0],
                [1, 1, 0, 0],
                [1, 1, 0, 0]], dtype=torch.int32)
    """
    check_visible(visible)
    shape = tuple(shape)
    if len(shape) != 2 or any(isinstance(s, bool) or not isinstance(s, int) for s in shape):
        raise InputError(f"shape must be (height, width), two ints, got {shape!r}")
    if min(shape) < 2:
        raise InputError(f"an image of shape {shape} has an empty quadrant; each side needs 2+")
    h, w = shape[0] // 2, shape[1] // 2
    rows = {"top": slice(None, h), "bottom": slice(h, None)}
    cols = {"left": slice(None, w), "right": slice(w, None)}
    mask = torch.zeros(shape, dtype=torch.bool)
    for name in VISIBLE_ORDER[:visible]:
        row, col = name.split("-")
        mask[rows[row], cols[col]] = True
    return mask


def split_quadrants(images: Tensor, visible: int = 1) -> tuple[Tensor, Tensor]:
    """``(x, y)`` from a batch of images ``(N, ..., height, width)``: ``x`` the visible
    quadrants (:func:`quadrant_mask`) with :data:`HIDDEN` elsewhere, ``y`` the hidden pixels
    with :data:`HIDDEN` on the visible ones; both of the images' shape."""
    if not torch.is_tensor(images) or images.dim() < 3:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise InputError(f"images must be a tensor (N, ..., height, width), got {shape}")
    mask = quadrant_mask(tuple(images.shape[-2:]), visible).to(images.device)
    return images.masked_fill(~mask, HIDDEN), images.masked_fill(mask, HIDDEN)


def hidden_pixels(x: Tensor) -> Tensor:
    """The pixels of ``x`` to predict (those marked :data:`HIDDEN`), a bool tensor."""
    return x == HIDDEN


def join(x: Tensor, y: Tensor) -> Tensor:
    """The whole image: ``x`` on its visible pixels, ``y`` on the hidden ones."""
    return torch.where(hidden_pixels(x), y, x)


def _check_pair(x, y, event_shape: torch.Size, who: str) -> None:
    check_batch(x, event_shape, who)
    if y is not None and (not torch.is_tensor(y) or y.shape != x.shape):
        shape = tuple(y.shape) if torch.is_tensor(y) else type(y).__name__
        raise InputError(
            f"{who} takes y of x's shape {tuple(x.shape)}, got {shape}; split_quadrants "
            f"returns such a pair"
        )


def _bernoulli(logits: Tensor, x: Tensor, event_dim: int) -> Distribution:
    """Bernoulli(logits) over the hidden pixels of ``x`` only (the rest masked off)."""
    return Bernoulli(logits=logits).mask(hidden_pixels(x)).to_event(event_dim)


def _scored(x: Tensor, y: Tensor) -> Tensor:
    """``y`` with 0 on x's visible pixels: masked off, and in the Bernoulli's support."""
    return torch.where(hidden_pixels(x), y, torch.zeros_like(y))


class _Shaped(nn.Module):
    """Holds the shape of one image and flattens a batch of them."""

    def __init__(self, event_shape: Sequence[int], latent_dim: int | None = None):
        super().__init__()
        if latent_dim is not None and (
            isinstance(latent_dim, bool) or not isinstance(latent_dim, int) or latent_dim < 1
        ):
            raise InputError(f"latent_dim must be a positive integer, got {latent_dim!r}")
        self.event_shape = torch.Size(event_shape)  # the shape of one image
        self.in_dim = self.event_shape.numel()
        self.latent_dim = latent_dim

    def flat(self, x: Tensor) -> Tensor:
        return x.reshape(*x.shape[: x.dim() - len(self.event_shape)], self.in_dim)


class CVAEModel(_Shaped):
    r"""The generative model :math:`p(z|x)\, p(y|x, z)`, called as ``model(x, y=None)``.

    The prior network maps ``x`` to a diagonal Gaussian over ``z``; the generation network maps
    ``(x, z)`` to a Bernoulli logit per pixel, of which only the hidden pixels are scored. The
    latent site ``"z"`` and the observed site ``"y"`` lie in the ``"data"`` plate; with
    ``y=None``, ``"y"`` is drawn (at every pixel: :meth:`complete` keeps the hidden ones).

    Arguments:
        event_shape: The shape of one image (default 1x28x28, the library's MNIST).
        latent_dim: Dimension of ``z`` (default 200, as Pyro's example).
        hidden: Widths of the hidden layers of both networks (default 500, 500, as Pyro's).
        activation: Their nonlinearity (default relu, as Pyro's).

    Example:
        >>> model = CVAEModel((4, 4), latent_dim=2, hidden=(8,))
        >>> x, y = split_quadrants(torch.ones(3, 4, 4), visible=2)
        >>> trace = pyro.poutine.trace(model).get_trace(x, y)
        >>> trace.nodes["z"]["value"].shape, trace.nodes["y"]["fn"].event_shape
        (torch.Size([3, 2]), torch.Size([4, 4]))
    """

    def __init__(
        self,
        event_shape: Sequence[int] = IMAGE_SHAPE,
        latent_dim: int = 200,
        hidden: Sequence[int] = (500, 500),
        activation: str = "relu",
    ):
        super().__init__(event_shape, latent_dim)
        hidden = check_hidden(hidden)
        self.prior_net = MLP([self.in_dim, *hidden], activation, final_activation=True)
        self.prior_head = DiagonalNormalHead(hidden[-1], latent_dim)
        self.generation_net = MLP([self.in_dim + latent_dim, *hidden, self.in_dim], activation)

    def prior(self, x: Tensor) -> Distribution:
        """p(z|x), a diagonal Gaussian with batch shape ``x.shape[:1]``."""
        return self.prior_head.condition(self.prior_net(self.flat(x)))

    def logits(self, x: Tensor, z: Tensor) -> Tensor:
        """The generation network's logits, shape ``(*z.shape[:-1], *event_shape)``."""
        features = self.flat(x).expand(*z.shape[:-1], self.in_dim)
        out = self.generation_net(torch.cat([features, z], -1))
        return out.reshape(*z.shape[:-1], *self.event_shape)

    def observation(self, x: Tensor, z: Tensor) -> Distribution:
        """p(y|x, z) over the hidden pixels of ``x``, event shape ``event_shape``."""
        return _bernoulli(self.logits(x, z), x, len(self.event_shape))

    def forward(self, x: Tensor, y: Tensor | None = None, *, num_data: int | None = None):
        _check_pair(x, y, self.event_shape, "the CVAE model")
        pyro.module("model", self)
        with data_plate(x, num_data):
            z = pyro.sample(LATENT, self.prior(x))
            obs = None if y is None else _scored(x, y)
            return pyro.sample(TARGET, self.observation(x, z), obs=obs)

    @torch.no_grad()
    def complete(self, x: Tensor, mean: bool = True) -> Tensor:
        """Images completed from ``x``: its visible pixels, and on the hidden ones the pixel
        probabilities (``mean``) or a draw of ``y``, at ``z`` drawn from p(z|x)."""
        _check_pair(x, None, self.event_shape, "complete")
        probs = torch.sigmoid(self.logits(x, self.prior(x).sample()))
        return join(x, probs if mean else torch.bernoulli(probs))

    @torch.no_grad()
    def start_from(self, baseline: BaselineNet) -> None:
        """Sets the generation network to ``baseline``'s weights, with zero weights on ``z``,
        so that p(y|x, z) starts as the baseline's p(y|x) for every z (an option; Pyro's
        example feeds the baseline's prediction to its prior network instead)."""
        ours = [m for m in self.generation_net if isinstance(m, nn.Linear)]
        theirs = [m for m in baseline.net if isinstance(m, nn.Linear)]
        sizes = [m.out_features for m in ours]
        if sizes != [m.out_features for m in theirs] or baseline.event_shape != self.event_shape:
            raise InputError(
                f"the baseline's layers {[m.out_features for m in theirs]} and images "
                f"{tuple(baseline.event_shape)} differ from the model's {sizes} and "
                f"{tuple(self.event_shape)}; build it with the model's hidden and event_shape"
            )
        acts = [type(m) for m in self.generation_net if not isinstance(m, nn.Linear)]
        if acts != [type(m) for m in baseline.net if not isinstance(m, nn.Linear)]:
            raise InputError("the baseline's activation differs from the model's; use the same")
        for a, b in zip(ours, theirs, strict=True):
            a.weight.zero_()
            a.weight[:, : b.in_features].copy_(b.weight)
            a.bias.copy_(b.bias)


class CVAEGuide(_Shaped):
    r"""The guide :math:`q(z|x, y)`, called as ``guide(x, y=None)``.

    The recognition network maps ``x`` and the whole image (:func:`join`) to a diagonal
    Gaussian over ``z``. With ``y=None`` there is nothing to recognize: the guide draws ``z``
    from ``prior`` (the model's p(z|x)), so that ``Predictive(model, guide=guide)`` samples
    completions as in Pyro's example.

    Arguments:
        event_shape, latent_dim, hidden, activation: As for :class:`CVAEModel` (same defaults).
        prior: Maps ``x`` to p(z|x), the fallback for ``y=None``: ``model.prior``, a bound
            method and so not a submodule (the guide registers only its own parameters).
    """

    def __init__(
        self,
        event_shape: Sequence[int] = IMAGE_SHAPE,
        latent_dim: int = 200,
        hidden: Sequence[int] = (500, 500),
        activation: str = "relu",
        prior: Callable[[Tensor], Distribution] | None = None,
    ):
        super().__init__(event_shape, latent_dim)
        hidden = check_hidden(hidden)
        self.recognition_net = MLP([2 * self.in_dim, *hidden], activation, final_activation=True)
        self.recognition_head = DiagonalNormalHead(hidden[-1], latent_dim)
        self.prior = prior

    def distribution(self, x: Tensor, y: Tensor) -> Distribution:
        """q(z|x, y), a diagonal Gaussian with batch shape ``x.shape[:1]``."""
        features = torch.cat([self.flat(x), self.flat(join(x, y))], -1)
        return self.recognition_head.condition(self.recognition_net(features))

    def forward(self, x: Tensor, y: Tensor | None = None, *, num_data: int | None = None):
        _check_pair(x, y, self.event_shape, "the CVAE guide")
        if y is None and self.prior is None:
            raise InputError(
                "the guide needs y, or a prior to draw z from without it: "
                "CVAEGuide(..., prior=model.prior), as cvae_pair builds it"
            )
        pyro.module("guide", self)
        q = self.prior(x) if y is None else self.distribution(x, y)
        with data_plate(x, num_data):
            return pyro.sample(LATENT, q)


def cvae_pair(
    event_shape: Sequence[int] = IMAGE_SHAPE,
    latent_dim: int = 200,
    hidden: Sequence[int] = (500, 500),
    activation: str = "relu",
) -> tuple[CVAEModel, CVAEGuide]:
    """A :class:`CVAEModel` and the :class:`CVAEGuide` that falls back to its prior."""
    model = CVAEModel(event_shape, latent_dim, hidden, activation)
    return model, CVAEGuide(event_shape, latent_dim, hidden, activation, prior=model.prior)


class BaselineNet(_Shaped):
    r"""A deterministic :math:`p(y|x)`: an MLP of ``x`` to a Bernoulli logit per pixel.

    ``baseline(x)`` is the distribution over the hidden pixels of ``x``; training minimizes the
    masked binary cross-entropy ``-baseline.log_prob(x, y).mean()`` (summed over the hidden
    pixels, averaged over the points).

    Arguments:
        event_shape, hidden, activation: As for :class:`CVAEModel` (same defaults).
    """

    def __init__(
        self,
        event_shape: Sequence[int] = IMAGE_SHAPE,
        hidden: Sequence[int] = (500, 500),
        activation: str = "relu",
    ):
        super().__init__(event_shape)
        self.net = MLP([self.in_dim, *check_hidden(hidden), self.in_dim], activation)

    def logits(self, x: Tensor) -> Tensor:
        return self.net(self.flat(x)).reshape(x.shape)

    def forward(self, x: Tensor) -> Distribution:
        return _bernoulli(self.logits(x), x, len(self.event_shape))

    def log_prob(self, x: Tensor, y: Tensor) -> Tensor:
        """log p(y|x) per point, shape ``(N,)``: the Bernoulli log-likelihood of y's hidden
        pixels (differentiable: the negative training loss)."""
        _check_pair(x, y, self.event_shape, "the baseline")
        return self(x).log_prob(_scored(x, y))


@torch.no_grad()
def baseline_log_likelihood(baseline: BaselineNet, x: Tensor, y: Tensor) -> Tensor:
    """The baseline's exact log p(y|x) per point, a float64 tensor of shape ``(N,)``."""
    return baseline.log_prob(x, y).to(torch.float64)


def conditional_log_likelihood(
    model: Callable,
    guide: Callable,
    x: Tensor,
    y: Tensor,
    *,
    num_samples: int = 5000,
    chunk_size: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Tensor:
    r"""Importance-sampled :math:`\log p(y_i|x_i)` per point, with ``guide(x, y)`` as proposal.

    .. math::
        \log p(y_i|x_i) \approx \log \frac{1}{K} \sum_{k=1}^K
            \frac{p(z_k|x_i)\, p(y_i|x_i, z_k)}{q(z_k|x_i, y_i)}, \qquad z_k \sim q(z|x_i, y_i)

    It is :func:`ppl_vae.importance.log_likelihood` of the programs run as ``model(x, y)`` and
    ``guide(x, y)`` (every sample site in the ``"data"`` plate): any conditional model whose
    observed site is ``y``, not only :class:`CVAEModel`. Arguments are those of that function.

    Returns:
        A float64 tensor of shape ``(N,)``.
    """
    if not torch.is_tensor(y) or y.dim() == 0:
        raise InputError(f"y must be a tensor of targets, one row per point, got {y!r:.40}")
    if not torch.is_tensor(x) or x.dim() == 0 or len(x) != len(y):
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise InputError(
            f"x and y must hold the same points, got shapes {shape} and {tuple(y.shape)}"
        )
    return log_likelihood(
        model, guide, x, y, num_samples=num_samples, chunk_size=chunk_size, progress=progress
    )
