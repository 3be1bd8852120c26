r"""Choosing epochs by their held-out ELBO: the best one (``best.pt``) and early stopping.

The ELBO watched is the validation ELBO when the run holds out a validation set
(``--validation N``), else the test ELBO. Both are functions of the finished epochs' metrics
alone, which a checkpoint holds, so a resumed run stops where the uninterrupted one would.

Example:
    >>> metrics = [{"epoch": e, "test_elbo": v} for e, v in enumerate([-99, -97, -98, -98], 1)]
    >>> best_epoch(metrics), epochs_since_best(metrics), stops(metrics, patience=2)
    (2, 2, True)
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["best_epoch", "epochs_since_best", "stops", "watched"]


def watched(metrics: Sequence[dict]) -> str:
    """The metric that chooses epochs: ``validation_elbo`` where the run records one, else
    ``test_elbo``."""
    return "validation_elbo" if metrics and "validation_elbo" in metrics[-1] else "test_elbo"


def best_epoch(metrics: Sequence[dict]) -> int | None:
    """The epoch with the highest watched ELBO (the first of equals); ``None`` before any."""
    if not metrics:
        return None
    key = watched(metrics)
    return max(metrics, key=lambda m: (m[key], -m["epoch"]))["epoch"]


def epochs_since_best(metrics: Sequence[dict]) -> int:
    """Finished epochs after the best one (0 when the last epoch is the best)."""
    best = best_epoch(metrics)
    return 0 if best is None else metrics[-1]["epoch"] - best


def stops(metrics: Sequence[dict], patience: int | None) -> bool:
    """Whether training stops early: the watched ELBO has not improved for ``patience``
    epochs (never with ``patience=None``)."""
    return patience is not None and epochs_since_best(metrics) >= patience
