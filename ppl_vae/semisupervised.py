r"""M2 (:mod:`ppl_vae.m2`) in the generic training loop: a few labelled points, the rest not.

:class:`SemiSupervised` is the loop's objective for ``--model m2``. The loop's data are the
unlabelled points (an epoch is one pass over them); each step adds to the loss of their batch
the loss of one batch of the labelled set, which is cycled: its points are shuffled once per
pass over them (from the run's seed and the pass), so that a step's labelled batch is a function
of the seed and the step's number alone and a resumed run takes the same ones. Each batch's loss
is scaled by the size of its own set (:class:`~ppl_vae.m2.M2Loss`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ppl_vae.data import Data
from ppl_vae.errors import InputError
from ppl_vae.m2 import M2Guide, M2Loss, M2Model, balanced_labelled, m2_accuracy
from ppl_vae.rng import derived_seed

__all__ = [
    "SemiSupervised",
    "analogies",
    "classifier_accuracy",
    "labelled_split",
    "count_classes",
    "seeded_test_points",
]


def count_classes(data: Data) -> int:
    """The number of classes of ``data``'s labels (the largest label + 1); an error naming the
    data set if it lacks the training or the test labels."""
    if data.train_labels is None or data.test_labels is None:
        raise InputError(
            f"--model m2 needs the labels of the training and test points; {data.name} does "
            f"not have both: choose a labelled image --dataset (digits, mnist, fashion-mnist, "
            f"kmnist)"
        )
    return int(max(data.train_labels.max(), data.test_labels.max())) + 1


def labelled_split(data: Data, num_labelled: int, num_classes: int, seed: int) -> Tensor:
    """The indices of the labelled training points (:func:`~ppl_vae.m2.balanced_labelled` of
    the training labels, from ``seed``), errors naming ``--labeled`` and the data set."""
    if data.train_labels is None:
        raise InputError(
            f"--model m2 needs the labels of the training points; {data.name} has none"
        )
    try:
        return balanced_labelled(data.train_labels, num_labelled, num_classes, seed)
    except InputError as e:
        raise InputError(f"--labeled {num_labelled} on {data.name}: {e}") from None


def seeded_test_points(data: Data, seed: int) -> Tensor:
    """The test points as a classifier sees them: a binarization drawn from ``seed`` where the
    encoding is dynamic (a fixed draw, so that the accuracy is a function of the parameters)."""
    return data.encode(data.test, generator=torch.Generator(data.device).manual_seed(seed))


def classifier_accuracy(guide: M2Guide, data: Data, seed: int) -> float:
    """:func:`~ppl_vae.m2.m2_accuracy` of ``guide``'s classifier on :func:`seeded_test_points`."""
    return m2_accuracy(guide, seeded_test_points(data, seed), data.test_labels)


class SemiSupervised:
    """The M2 objective of one step: an unlabelled batch's loss plus a labelled batch's.

    Arguments:
        data: The whole training set, labels included (the labelled points are taken from it).
        labelled: The indices of the labelled points (:func:`labelled_split`).
        alpha: The weight of the classification loss (:func:`~ppl_vae.m2.paper_alpha`).
        batch_size: The labelled batch's size (at most the number of labelled points).
        seed: The run's seed: the labelled set's shuffles and the test points' binarization.
        balanced: Scale each labelled batch's loss by the number of unlabelled points instead of
            the labelled ones (per point of the batch), so that it weighs as much as the
            unlabelled batch: the objective with the labelled set repeated to the unlabelled
            set's size. Without it, the paper's objective, each labelled point counted once.

    Example:
        >>> data = Data(torch.rand(12, 3), torch.rand(4, 3), "dynamic",
        ...             test_labels=torch.arange(4) % 2, train_labels=torch.arange(12) % 2)
        >>> objective = SemiSupervised(data, torch.tensor([0, 1, 2, 3]), alpha=1.0,
        ...                            batch_size=3, seed=0)
        >>> [len(objective.step_args(step, None)[0]) for step in range(4)]  # 3, 1, 3, 1, ...
        [3, 1, 3, 1]
        >>> objective.step_args(0, None)[2]  # the labelled set's size, its batches' scale
        4
    """

    def __init__(
        self,
        data: Data,
        labelled: Tensor,
        *,
        alpha: float,
        batch_size: int,
        seed: int,
        balanced: bool = False,
    ):
        self.labelled = labelled.cpu()  # the indices of the labelled points in data.train
        # the labelled batches' scale: their set's size, or the unlabelled set's where balanced
        self.labelled_scale = data.train.shape[0] - len(labelled) if balanced else len(labelled)
        self.x = data.train[labelled.to(data.device)]
        self.y = data.train_labels[labelled.cpu()].to(data.device)
        self.encode: Callable[..., Tensor] = data.encode
        self.loss = M2Loss(alpha)
        self.batch_size = min(batch_size, len(self.x))
        self.seed = seed

    @property
    def num_labelled(self) -> int:
        return len(self.x)

    def program_args(self, x: Tensor, num_data: int | None) -> tuple[tuple, dict]:
        """How the M2 programs are called on an unlabelled batch: ``(x,), {num_data}``."""
        return (x,), {"num_data": num_data}

    def step_args(self, step: int, generator: torch.Generator | None) -> tuple:
        """The labelled batch of the run's ``step``-th step (0-based, counted over epochs):
        ``(x, y, scale)``, its points encoded with ``generator``; ``scale`` is the number of
        labelled points (of unlabelled ones where balanced), the ``num_data`` of its loss."""
        per_pass = math.ceil(self.num_labelled / self.batch_size)
        pass_seed = derived_seed(self.seed, "labelled", step // per_pass)
        shuffle = torch.Generator().manual_seed(pass_seed)
        order = torch.randperm(self.num_labelled, generator=shuffle).to(self.x.device)
        start = (step % per_pass) * self.batch_size
        index = order[start : start + self.batch_size]
        return self.encode(self.x[index], generator), self.y[index], self.labelled_scale

    def differentiable_loss(
        self,
        model: Callable,
        guide: M2Guide,
        x: Tensor,
        num_data: int | None = None,
        x_labelled: Tensor | None = None,
        y_labelled: Tensor | None = None,
        num_labelled: int | None = None,
        shares: tuple[float, float] | None = None,
    ) -> Tensor:
        """The unlabelled batch's loss (the label summed out), plus the labelled batch's where
        given; without one, the negative of the unlabelled bound (what the test ELBO reports).

        Under ``torchrun`` (:func:`~ppl_vae.svi.semi_supervised_shard_step`) ``x`` and
        ``x_labelled`` are this rank's parts of the step's two batches and ``shares`` their
        shares of them: each part's loss is weighted by its share, and a part with share 0 (no
        rows) is left out."""
        share, share_l = shares or (1.0, 1.0)
        parts = []
        if share:
            loss = self.loss.differentiable_loss(model, guide, x, None, num_data)
            parts.append(loss if share == 1.0 else share * loss)
        if x_labelled is not None and share_l:
            loss = self.loss.differentiable_loss(model, guide, x_labelled, y_labelled, num_labelled)
            parts.append(loss if share_l == 1.0 else share_l * loss)
        return sum(parts[1:], parts[0])

    def metrics(self, guide: M2Guide, data: Data) -> dict:
        """``test_accuracy``: the classifier's, on :func:`seeded_test_points`."""
        return {"test_accuracy": classifier_accuracy(guide, data, self.seed)}


@torch.no_grad()
def analogies(model: M2Model, guide: M2Guide, x: Tensor, y: Tensor) -> Tensor:
    r"""Kingma et al.'s Figure 1: the style of each point held fixed, the label varied.

    ``z`` is the mean of q(z|x, y) at each point's true label; the result holds the means of
    p(x|y', z) for every class y', shape ``(N, num_classes, *event_shape)``.
    """
    z = guide.distribution(x, y).mean  # (N, D)
    labels = torch.arange(model.num_classes, device=x.device).unsqueeze(-1)  # (K, 1)
    means = torch.sigmoid(model.logits(labels, z.unsqueeze(0)))  # (K, N, ...)
    return means.transpose(0, 1)
