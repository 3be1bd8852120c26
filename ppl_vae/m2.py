r"""The semi-supervised M2 model of Kingma et al. (2014) as Pyro programs, and its loss.

A label ``y`` (one of ``num_classes``) and a style ``z`` generate each point ``x``; the label is
observed for a few points and latent for the rest.

.. math::
    p(x, y, z) = p(y)\, p(z)\, p(x|y, z), \qquad q(y, z|x) = q(y|x)\, q(z|x, y)

with :math:`p(y)` uniform, :math:`p(z) = N(0, I)`, :math:`p(x|y, z)` a Bernoulli per pixel from
an MLP of (one-hot y, z), :math:`q(y|x)` a classifier MLP and :math:`q(z|x, y)` a diagonal
Gaussian from an MLP of (x, one-hot y). The defaults are those of the authors' code for M2
(``run_2layer_ssl.py`` in github.com/dpkingma/nips14-ssl: 50 latent dimensions, one hidden
layer of 500 units, softplus) and of Pyro's ``examples/vae/ss_vae_M2.py`` (the same three).
Two differences from the paper, both as in Pyro's example: the scale of q(z|x, y) depends on
y as well as x (the paper's eq. 4 has :math:`\sigma_\phi(x)`), and the model is fitted to
binary pixels directly (the authors' code fits M2 to the features of a trained M1, with a
Gaussian p(x|y, z)).

The objective (the paper's section 3.1.2) sums the negative ELBO of every labelled point
:math:`\mathcal{L}(x, y)`, that of every unlabelled point with the label summed out exactly,
:math:`\mathcal{U}(x) = \sum_y q(y|x) (\mathcal{L}(x, y) - \log q(y|x))` (as ELBOs, so the
loss is their negative), and the classification loss of the labelled points
:math:`\alpha \cdot \mathbb{E}_{\tilde p_l}[-\log q(y|x)]` with :math:`\alpha = 0.1 N`
(:func:`paper_alpha`). :func:`m2_loss` is its estimate on one batch, labelled or not.

References:
    Semi-Supervised Learning with Deep Generative Models (Kingma et al., 2014),
    https://arxiv.org/abs/1406.5298
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from ppl_vae.distributions import Bernoulli, StandardNormal
from ppl_vae.errors import InputError
from ppl_vae.guides import DiagonalNormalHead
from ppl_vae.importance import log_likelihood
from ppl_vae.networks import MLP, check_hidden
from ppl_vae.sites import (
    LATENT,
    OBSERVED,
    check_batch,
    data_plate,
    log_weights_of_traces,
    trace_guide_and_model,
)

__all__ = [
    "LABEL",
    "M2Guide",
    "M2Loss",
    "M2Model",
    "balanced_labelled",
    "check_labels",
    "m2_accuracy",
    "m2_log_likelihood",
    "m2_loss",
    "paper_alpha",
]

LABEL = "y"  # the label's site: observed for labelled points, enumerated for the others
IMAGE_SHAPE = (1, 28, 28)  # the library's MNIST images
ENUMERATE = {"enumerate": "parallel"}  # TraceEnum_ELBO sums the label out where this is set


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return value


def _one_hot(y: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """``y`` one-hot in a last dimension, by comparison (no read of the values: recordable)."""
    return (y.unsqueeze(-1) == torch.arange(num_classes, device=y.device)).to(dtype)


def _check_pair(x, y, event_shape: torch.Size, who: str) -> None:
    check_batch(x, event_shape, who)
    if y is None:
        return
    if not torch.is_tensor(y) or y.shape != x.shape[:1] or y.is_floating_point() or y.is_complex():
        shape = tuple(y.shape) if torch.is_tensor(y) else type(y).__name__
        raise InputError(
            f"{who} takes y as integer labels, one per point (shape ({len(x)},)), got {shape}"
            f"{'' if not torch.is_tensor(y) else f' of dtype {y.dtype}'}; pass labels.long()"
        )


class _Shaped(nn.Module):
    """Holds the shape of one point, the number of classes and of latent dimensions."""

    def __init__(self, event_shape, num_classes, latent_dim, hidden):
        super().__init__()
        self.event_shape = torch.Size(event_shape)  # the shape of one point
        self.in_dim = self.event_shape.numel()
        self.num_classes = _positive_int(num_classes, "num_classes")
        if self.num_classes < 2:
            raise InputError(f"num_classes must be at least 2, got {num_classes}")
        self.latent_dim = _positive_int(latent_dim, "latent_dim")
        self.hidden = check_hidden(hidden)

    def flat(self, x: Tensor) -> Tensor:
        return x.reshape(*x.shape[: x.dim() - len(self.event_shape)], self.in_dim)

    def one_hot(self, y: Tensor, dtype: torch.dtype) -> Tensor:
        return _one_hot(y, self.num_classes, dtype)


class M2Model(_Shaped):
    r"""The generative model :math:`p(y)\, p(z)\, p(x|y, z)`, called as ``model(x, y=None)``.

    The sites ``"y"`` (observed when ``y`` is given, else latent and marked for parallel
    enumeration), ``"z"`` and ``"x"`` (observed) lie in the ``"data"`` plate.

    Arguments:
        event_shape: The shape of one point (default 1x28x28, the library's MNIST).
        num_classes: The number of labels (default 10).
        latent_dim: Dimension of ``z`` (default 50, the paper's).
        hidden: Widths of the decoder's hidden layers (default 500, the authors' code's).
        activation: Their nonlinearity (default softplus, the authors' code's).

    Example:
        >>> model = M2Model((4,), num_classes=3, latent_dim=2, hidden=(8,))
        >>> trace = pyro.poutine.trace(model).get_trace(torch.ones(5, 4), torch.arange(5) % 3)
        >>> trace.nodes["y"]["is_observed"], trace.nodes["z"]["value"].shape
        (True, torch.Size([5, 2]))
    """

    def __init__(
        self,
        event_shape: Sequence[int] = IMAGE_SHAPE,
        num_classes: int = 10,
        latent_dim: int = 50,
        hidden: Sequence[int] = (500,),
        activation: str = "softplus",
    ):
        super().__init__(event_shape, num_classes, latent_dim, hidden)
        self.decoder = MLP([num_classes + latent_dim, *self.hidden, self.in_dim], activation)
        self.register_buffer("_zero", torch.zeros(()), persistent=False)  # dtype and device

    def label_prior(self, n: int) -> Distribution:
        """p(y), uniform over the classes, with batch shape ``(n,)``."""
        return dist.Categorical(logits=self._zero.expand(n, self.num_classes))

    def prior(self, n: int) -> Distribution:
        """p(z) = N(0, I) with batch shape ``(n,)``."""
        shape = (n, self.latent_dim)
        return StandardNormal(shape, self._zero.dtype, self._zero.device).to_event(1)

    def logits(self, y: Tensor, z: Tensor) -> Tensor:
        """The decoder's logits, shape ``(*batch, *event_shape)`` for y and z's batch shapes
        broadcast (an enumerated y of shape ``(K, 1)`` against z of shape ``(K, N, D)``)."""
        batch = torch.broadcast_shapes(y.shape, z.shape[:-1])
        labels = self.one_hot(y, z.dtype).expand(*batch, self.num_classes)
        out = self.decoder(torch.cat([labels, z.expand(*batch, self.latent_dim)], -1))
        return out.reshape(*batch, *self.event_shape)

    def observation(self, y: Tensor, z: Tensor) -> Distribution:
        """p(x|y, z), a Bernoulli per coordinate, event shape ``event_shape``."""
        return Bernoulli(logits=self.logits(y, z)).to_event(len(self.event_shape))

    def forward(self, x: Tensor, y: Tensor | None = None, *, num_data: int | None = None):
        _check_pair(x, y, self.event_shape, "the M2 model")
        pyro.module("model", self)
        with data_plate(x, num_data):
            infer = ENUMERATE if y is None else {}
            y = pyro.sample(LABEL, self.label_prior(len(x)), obs=y, infer=infer)
            z = pyro.sample(LATENT, self.prior(len(x)))
            pyro.sample(OBSERVED, self.observation(y, z), obs=x)
        return y, z

    @torch.no_grad()
    def sample(self, y: Tensor, mean: bool = True) -> Tensor:
        """One point per label in ``y``, at z drawn from p(z); with ``mean``, E[x|y, z]."""
        px = self.observation(y, self.prior(len(y)).sample())
        return px.mean if mean else px.sample()


class M2Guide(_Shaped):
    r"""The guide :math:`q(y|x)\, q(z|x, y)`, called as ``guide(x, y=None)``.

    With ``y`` given, only ``"z"`` is drawn, from q(z|x, y); without it, ``"y"`` is drawn from
    the classifier q(y|x) first, marked for parallel enumeration (so ``TraceEnum_ELBO`` sums it
    out; :func:`m2_loss` sums it out itself).

    Arguments:
        event_shape, num_classes, latent_dim, hidden, activation: As for :class:`M2Model`
            (same defaults); the classifier and the encoder each have the hidden layers.
    """

    def __init__(
        self,
        event_shape: Sequence[int] = IMAGE_SHAPE,
        num_classes: int = 10,
        latent_dim: int = 50,
        hidden: Sequence[int] = (500,),
        activation: str = "softplus",
    ):
        super().__init__(event_shape, num_classes, latent_dim, hidden)
        self.classifier_net = MLP([self.in_dim, *self.hidden, num_classes], activation)
        sizes = [self.in_dim + num_classes, *self.hidden]
        self.encoder_net = MLP(sizes, activation, final_activation=True)
        self.encoder_head = DiagonalNormalHead(self.hidden[-1], latent_dim)

    def classifier(self, x: Tensor) -> Tensor:
        """The logits of q(y|x), shape ``(N, num_classes)``."""
        return self.classifier_net(self.flat(x))

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """The most probable label under q(y|x) of each point, shape ``(N,)``."""
        check_batch(x, self.event_shape, "predict")
        return self.classifier(x).argmax(-1)

    def distribution(self, x: Tensor, y: Tensor) -> Distribution:
        """q(z|x, y), a diagonal Gaussian over x's and y's batch shapes broadcast."""
        features = self.flat(x)
        batch = torch.broadcast_shapes(y.shape, features.shape[:-1])
        labels = self.one_hot(y, features.dtype).expand(*batch, self.num_classes)
        inputs = torch.cat([features.expand(*batch, self.in_dim), labels], -1)
        return self.encoder_head.condition(self.encoder_net(inputs))

    def forward(self, x: Tensor, y: Tensor | None = None, *, num_data: int | None = None):
        _check_pair(x, y, self.event_shape, "the M2 guide")
        pyro.module("guide", self)
        with data_plate(x, num_data):
            if y is None:
                y = pyro.sample(LABEL, dist.Categorical(logits=self.classifier(x)), infer=ENUMERATE)
            return pyro.sample(LATENT, self.distribution(x, y))


def paper_alpha(num_data: int, num_labelled: int, ratio: float = 0.1) -> float:
    r"""The weight of each labelled point's :math:`-\log q(y|x)` in Kingma et al.'s objective:
    :math:`\alpha\, \mathbb{E}_{\tilde p_l}[-\log q(y|x)]` with :math:`\alpha` = ``ratio`` · N
    (0.1 N in the paper, N = ``num_data`` points in all) is ``ratio * num_data /
    num_labelled`` per labelled point (the authors' code: ``alpha * n_tot / n_labeled``)."""
    _positive_int(num_data, "num_data")
    _positive_int(num_labelled, "num_labelled")
    if num_labelled > num_data:
        raise InputError(f"num_labelled ({num_labelled}) exceeds num_data ({num_data})")
    return ratio * num_data / num_labelled


def _check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
        raise InputError(f"alpha must be a number >= 0, got {alpha!r}; e.g. paper_alpha(N, N_l)")
    if not math.isfinite(alpha):
        raise InputError(f"alpha must be finite, got {alpha}")
    return float(alpha)


def _elbo_per_point(model: Callable, guide: Callable, x: Tensor, y: Tensor) -> Tensor:
    """log p(x, y, z) - log q(z|x, y) at one draw per point, shape ``(N,)``, unscaled."""
    model_tr, guide_tr = trace_guide_and_model(model, guide, (x, y), {})
    return log_weights_of_traces(model_tr, guide_tr, keep_dims={-1}, scaled=False)


def _every_label(x: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """``x`` repeated once per class (class-major, shape ``(K N, ...)``) and the labels."""
    labels = torch.arange(num_classes, device=x.device).repeat_interleave(len(x))
    return x.repeat(num_classes, *(1,) * (x.dim() - 1)), labels


def _num_classes(model, guide) -> int:
    k = getattr(guide, "num_classes", None)
    if k is None or getattr(model, "num_classes", k) != k:
        raise InputError(
            f"the model has {getattr(model, 'num_classes', None)} classes, the guide {k}; build "
            f"both with the same num_classes"
        )
    return k


class M2Loss:
    r"""The M2 objective's negative, estimated on one batch: labelled when ``y`` is given.

    A labelled batch costs :math:`\sum_i -\mathcal{L}(x_i, y_i) + \alpha (-\log q(y_i|x_i))`,
    the ELBO of ``model(x, y)`` and ``guide(x, y)`` at one draw of z per point; an unlabelled
    one :math:`\sum_i -\mathcal{U}(x_i)` with the label summed out exactly: the labelled
    programs run on every point once per class (one draw of z per point and class, as Pyro's
    ``TraceEnum_ELBO(max_plate_nesting=1)`` draws them for the guide's enumerated ``"y"``;
    ``tests/test_m2.py`` checks the two agree in value and gradients). With ``num_data``,
    either is scaled by ``num_data / len(x)``: pass the size of the labelled set for a
    labelled batch, that of the unlabelled set for an unlabelled one. Each batch's loss is
    then an unbiased estimate of its part of the whole objective, and a step may add the
    losses of one labelled and one unlabelled batch (or alternate them, as Pyro's example).

    Arguments:
        alpha: The weight of each labelled point's classification loss (:func:`paper_alpha`
            gives the paper's, 0.1 N / N_labelled; Pyro's example's ``aux_loss_multiplier``
            weights it alike).
    """

    def __init__(self, alpha: float):
        self.alpha = _check_alpha(alpha)

    def differentiable_loss(
        self,
        model: Callable,
        guide: M2Guide,
        x: Tensor,
        y: Tensor | None = None,
        num_data: int | None = None,
    ) -> Tensor:
        _check_pair(x, y, guide.event_shape, "the M2 loss")
        scale = 1.0 if num_data is None else _positive_int(num_data, "num_data") / len(x)
        log_q = torch.log_softmax(guide.classifier(x), -1)  # (N, K)
        if y is not None:
            elbo = _elbo_per_point(model, guide, x, y)
            log_qy = log_q.gather(-1, y.unsqueeze(-1)).squeeze(-1)
            return -scale * (elbo + self.alpha * log_qy).sum()
        k = _num_classes(model, guide)
        elbo = _elbo_per_point(model, guide, *_every_label(x, k)).reshape(k, len(x))
        log_q = log_q.T  # (K, N), as elbo
        return -scale * (log_q.exp() * (elbo - log_q)).sum()


def m2_loss(
    model: Callable,
    guide: M2Guide,
    x: Tensor,
    y: Tensor | None = None,
    *,
    alpha: float,
    num_data: int | None = None,
) -> Tensor:
    """:class:`M2Loss` ``(alpha).differentiable_loss(model, guide, x, y, num_data)``."""
    return M2Loss(alpha).differentiable_loss(model, guide, x, y, num_data)


def check_labels(labels, num_classes: int, n: int | None = None, who: str = "labels") -> Tensor:
    """``labels`` checked: a 1-D integer tensor (of ``n`` entries where given) in
    ``[0, num_classes)``."""
    if not torch.is_tensor(labels) or labels.dim() != 1 or labels.is_floating_point():
        shape = tuple(labels.shape) if torch.is_tensor(labels) else type(labels).__name__
        raise InputError(f"{who} must be a 1-D tensor of integer labels, got {shape}")
    if labels.dtype == torch.bool or labels.is_complex():
        raise InputError(f"{who} must be integer labels, got dtype {labels.dtype}")
    if n is not None and len(labels) != n:
        raise InputError(f"{who} has {len(labels)} entries for {n} points; pass one per point")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise InputError(
            f"{who} must lie in [0, {num_classes}), got values from {labels.min().item()} to "
            f"{labels.max().item()}"
        )
    return labels


def m2_log_likelihood(
    model: Callable,
    guide: M2Guide,
    x: Tensor,
    *,
    num_samples: int = 5000,
    chunk_size: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Tensor:
    r""":math:`\log p(x_i)` per point with the label summed out exactly.

    .. math::
        \log p(x_i) = \log \sum_y p(x_i, y), \qquad p(x_i, y) \approx \frac{p(y)}{K}
            \sum_{k=1}^K \frac{p(z_k)\, p(x_i|y, z_k)}{q(z_k|x_i, y)},
            \quad z_k \sim q(z|x_i, y)

    Each :math:`\log p(x_i, y)` is :func:`ppl_vae.importance.log_likelihood` of the programs
    run as ``model(x, y)`` and ``guide(x, y)``, on every point once per class (one call, so
    ``num_samples`` draws per point and class, and ``chunk_size`` and ``progress`` as there).
    The guide states the classes and the shape of a point (an :class:`M2Guide`); the model
    takes ``(x, y)`` with ``y`` observed.

    Returns:
        A float64 tensor of shape ``(N,)``.
    """
    k = _num_classes(model, guide)
    check_batch(x, guide.event_shape, "m2_log_likelihood")
    log_joint = log_likelihood(
        model, guide, *_every_label(x, k), num_samples=num_samples, chunk_size=chunk_size,
        progress=progress,
    )  # fmt: skip
    return torch.logsumexp(log_joint.reshape(k, len(x)), 0)


@torch.no_grad()
def m2_accuracy(guide: M2Guide, x: Tensor, labels: Tensor) -> float:
    """The fraction of points whose label is the classifier's most probable one."""
    check_batch(x, guide.event_shape, "m2_accuracy")
    labels = check_labels(labels, guide.num_classes, len(x))
    return (guide.predict(x) == labels.to(x.device)).double().mean().item()


def balanced_labelled(labels: Tensor, n: int, num_classes: int, seed: int) -> Tensor:
    """The indices of ``n`` points, ``n / num_classes`` of each class drawn at random (seeded),
    in increasing order: the labelled set of a semi-supervised run.

    Example:
        >>> balanced_labelled(torch.tensor([0, 1, 0, 1, 1, 0]), 4, 2, seed=0).shape
        torch.Size([4])
    """
    _positive_int(num_classes, "num_classes")
    _positive_int(n, "n")
    labels = check_labels(labels, num_classes).cpu()
    if n % num_classes:
        raise InputError(f"n ({n}) must be a multiple of num_classes ({num_classes})")
    if n > len(labels):
        raise InputError(f"n ({n}) exceeds the {len(labels)} points given")
    per_class = n // num_classes
    counts = torch.bincount(labels, minlength=num_classes)
    if (counts < per_class).any():
        short = int(torch.argmin(counts))
        raise InputError(
            f"class {short} has {int(counts[short])} points, fewer than the {per_class} per class "
            f"that n={n} needs; pass a smaller n"
        )
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in range(num_classes):
        members = torch.nonzero(labels == c).squeeze(1)
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return torch.cat(chosen).sort().values
