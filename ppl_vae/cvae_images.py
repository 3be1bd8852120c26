r"""The conditional VAE of :mod:`ppl_vae.cvae` as a pair of programs over whole images.

``model(images, num_data=None)`` and ``guide(images, num_data=None)`` take a batch of images,
as a VAE's programs do, and split them inside (:func:`~ppl_vae.cvae.split_quadrants`) into the
visible quadrants ``x`` and the hidden pixels ``y`` before running :class:`CVAEModel` and
:class:`CVAEGuide` on ``(x, y)``. The sites are those of the CVAE (``"z"`` and the observed
``"y"``, in the ``"data"`` plate), so the generic training loop, its checkpoints and captured
steps, and :func:`ppl_vae.importance.log_likelihood` run unchanged; the last then estimates
:math:`\log p(y|x)`, the only observed site being ``y``:

.. math::
    \log p(y_i|x_i) = \log \mathbb{E}_{q(z|x_i, y_i)}
        \left[\frac{p(z|x_i)\, p(y_i|x_i, z)}{q(z|x_i, y_i)}\right]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ppl_vae.cvae import (
    BaselineNet,
    CVAEGuide,
    CVAEModel,
    baseline_log_likelihood,
    check_visible,
    split_quadrants,
)
from ppl_vae.data import Data

__all__ = ["ImageCVAEGuide", "ImageCVAEModel", "fit_baseline", "image_cvae_pair"]


class ImageCVAEModel(CVAEModel):
    r""":class:`~ppl_vae.cvae.CVAEModel` called on whole images: ``model(images)`` splits them
    into ``visible`` quadrants and the hidden rest, then scores the hidden pixels under
    :math:`p(z|x)\, p(y|x, z)`.

    Arguments:
        visible: Quadrants shown to the model (1, 2 or 3; :func:`~ppl_vae.cvae.quadrant_mask`).
        event_shape, latent_dim, hidden, activation: As for :class:`~ppl_vae.cvae.CVAEModel`.
    """

    def __init__(self, visible: int = 1, *, baseline: bool = False, **sizes):
        super().__init__(**sizes)
        self.visible = check_visible(visible)
        # a submodule, so that its weights are saved with the model's; the model never calls it
        self.baseline = BaselineNet(self.event_shape, *self._sizes(sizes)) if baseline else None

    @staticmethod
    def _sizes(sizes: dict) -> tuple:
        return sizes.get("hidden", (500, 500)), sizes.get("activation", "relu")

    @torch.no_grad()
    def baseline_log_likelihood(self, images: Tensor) -> Tensor | None:
        """The baseline's exact log p(y|x) per image (float64), or ``None`` without one."""
        if self.baseline is None:
            return None
        return baseline_log_likelihood(self.baseline, *self.split(images))

    def split(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(x, y)`` of ``images``: the visible quadrants and the hidden pixels."""
        return split_quadrants(images, self.visible)

    def forward(self, images: Tensor, num_data: int | None = None) -> Tensor:
        x, y = self.split(images)
        return super().forward(x, y, num_data=num_data)

    @torch.no_grad()
    def completions(self, images: Tensor, n: int) -> Tensor:
        """``n`` completions of each image, shape ``(n, *images.shape)``: its visible pixels and,
        on the hidden ones, the Bernoulli means at ``z`` drawn from p(z|x)."""
        x, _ = self.split(images)
        return torch.stack([self.complete(x, mean=True) for _ in range(n)])


class ImageCVAEGuide(CVAEGuide):
    r""":class:`~ppl_vae.cvae.CVAEGuide` called on whole images: q(z|x, y) of their split.

    Arguments:
        visible: As for :class:`ImageCVAEModel` (the two must agree).
        event_shape, latent_dim, hidden, activation: As for :class:`~ppl_vae.cvae.CVAEGuide`.
    """

    def __init__(self, visible: int = 1, **sizes):
        super().__init__(**sizes)
        self.visible = check_visible(visible)

    def forward(self, images: Tensor, num_data: int | None = None) -> Tensor:
        x, y = split_quadrants(images, self.visible)
        return super().forward(x, y, num_data=num_data)


def image_cvae_pair(
    visible: int,
    event_shape: Sequence[int],
    latent_dim: int = 200,
    hidden: Sequence[int] = (500, 500),
    activation: str = "relu",
    *,
    baseline: bool = False,
) -> tuple[ImageCVAEModel, ImageCVAEGuide]:
    """The model and guide over whole images of ``event_shape``, ``visible`` quadrants shown.

    Example:
        >>> model, guide = image_cvae_pair(2, (1, 4, 4), latent_dim=2, hidden=(8,))
        >>> import pyro
        >>> trace = pyro.poutine.trace(model).get_trace(torch.ones(3, 1, 4, 4))
        >>> trace.nodes["y"]["fn"].event_shape
        torch.Size([1, 4, 4])
    """
    sizes = dict(
        event_shape=tuple(event_shape), latent_dim=latent_dim, hidden=hidden, activation=activation
    )
    model = ImageCVAEModel(visible, baseline=baseline, **sizes)
    return model, ImageCVAEGuide(visible, **sizes, prior=model.prior)


def fit_baseline(
    model: ImageCVAEModel,
    data: Data,
    epochs: int,
    *,
    batch_size: int = 100,
    lr: float = 1e-3,
    seed: int = 0,
) -> list[float]:
    """Trains ``model.baseline`` for ``epochs`` passes over ``data.train`` (Adam on its masked
    binary cross-entropy, batches shuffled and binarized from ``seed``), then starts the
    model's generation network from it (:meth:`~ppl_vae.cvae.CVAEModel.start_from`), as
    Pyro's example trains its baseline before the CVAE. Returns the mean training loss per
    epoch (nats per image, -log p(y|x))."""
    baseline = model.baseline
    assert baseline is not None, "built without a baseline"
    device = data.train.device
    g = torch.Generator(device=device).manual_seed(seed)
    optimizer = torch.optim.Adam(baseline.parameters(), lr=lr)
    losses, n = [], data.train.shape[0]
    for _ in range(epochs):
        total = torch.zeros((), dtype=torch.float64, device=device)
        for batch in torch.randperm(n, generator=g, device=device).split(batch_size):
            x, y = model.split(data.encode(data.train[batch], generator=g))
            loss = -baseline.log_prob(x, y).sum()
            (loss / len(batch)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            total += loss.detach()
        losses.append(total.item() / n)
    model.start_from(baseline)
    return losses
