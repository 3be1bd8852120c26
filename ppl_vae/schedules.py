r"""Learning-rate schedules: the rate of every epoch as a function of the epoch alone.

A schedule is a :class:`Schedule` built from :data:`SCHEDULES` by name, with its own options
(an option of another schedule is an error). Its rate depends on the epoch, the base rate and
the finished epochs' metrics only (``plateau`` reads their validation ELBO), all of which a
checkpoint holds, so a resumed run continues it exactly; it may also set Adam's
:math:`\epsilon`.

Example:
    >>> burda = SCHEDULES.build("burda", 3280)
    >>> [round(burda.rate(e, 1e-3) * 1e3, 4) for e in (1, 2, 4, 5, 3280)]
    [1.0, 0.7197, 0.7197, 0.5179, 0.1]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ppl_vae.config import check_number
from ppl_vae.errors import InputError
from ppl_vae.registry import Registry

__all__ = ["BURDA_STAGES", "SCHEDULES", "Schedule", "burda_stage", "plateau_rate"]

BURDA_STAGES = 8  # Burda et al. (2015): 3^i epochs at 10^(-i/7) times the base rate, i = 0..7


@dataclass(frozen=True)
class Schedule:
    """``rate(epoch, base, history)``: the learning rate of epoch 1, 2, ..., given the base
    rate and the metrics of the epochs before it; ``adam_eps``: Adam's :math:`\\epsilon` for
    the run; ``monitors``: the metric the rate watches, if any."""

    by_epoch: Callable[[int, float, Sequence[dict]], float]
    adam_eps: float = 1e-8  # torch's default
    monitors: str | None = None

    def rate(self, epoch: int, base: float, history: Sequence[dict] = ()) -> float:
        """The rate of 1-based ``epoch``; ``history`` holds the finished epochs' metrics."""
        return self.by_epoch(epoch, base, history)


def burda_stage(epoch: int) -> int:
    """The stage i of ``epoch`` (1-based) in Burda et al.'s schedule: epochs 1, 2-4, 5-13, ...
    (3^i epochs each); the last stage goes on past epoch 3280."""
    done = 0
    for i in range(BURDA_STAGES):
        done += 3**i
        if epoch <= done:
            return i
    return BURDA_STAGES - 1


SCHEDULES: Registry[Schedule] = Registry("learning-rate schedule")


@SCHEDULES.register("constant", help="the rate --lr every epoch")
def _constant(epochs: int) -> Schedule:
    return Schedule(lambda epoch, base, history: base)


@SCHEDULES.register(
    "burda",
    help="Burda et al. (2015): 3^i epochs at --lr * 10^(-i/7), i = 0..7 (3280 epochs), Adam "
    "epsilon 1e-4",
)
def _burda(epochs: int) -> Schedule:
    return Schedule(
        lambda epoch, base, history: base * 10 ** (-burda_stage(epoch) / 7), adam_eps=1e-4
    )


@SCHEDULES.register(
    "cosine",
    options=("lr_warmup", "lr_floor"),
    help="a linear warm-up over --lr-warmup epochs, then a cosine from --lr down to --lr-floor "
    "at --epochs",
)
def _cosine(epochs: int, lr_warmup: int = 0, lr_floor: float = 0.0) -> Schedule:
    def rate(epoch: int, base: float, history: Sequence[dict]) -> float:
        if epoch <= lr_warmup:
            return base * epoch / (lr_warmup + 1)
        span = max(epochs - lr_warmup, 1)
        progress = min((epoch - lr_warmup - 1) / max(span - 1, 1), 1.0)
        return lr_floor + (base - lr_floor) * 0.5 * (1 + math.cos(math.pi * progress))

    check_number("lr_floor", lr_floor, allow_low=True, hint="pass --lr-floor 0 or a small rate")
    return Schedule(rate)


MONITORED = "validation_elbo"  # the metric that plateau watches (needs --validation)


def plateau_rate(
    values: Sequence[float], base: float, *, factor: float, patience: int, floor: float
) -> float:
    """The rate after the validation ELBOs ``values`` (one per finished epoch): ``base``, times
    ``factor`` each time ``patience`` epochs in a row have not improved on the best so far
    (the count starts again after each cut), never below ``floor``.

    Example:
        >>> plateau_rate([-100, -99, -99.5, -99.2, -98], 1.0, factor=0.5, patience=2, floor=0)
        0.5
    """
    rate, best, waited = base, -math.inf, 0
    for value in values:
        if value > best:
            best, waited = value, 0
        else:
            waited += 1
            if waited >= patience:
                rate, waited = max(rate * factor, floor), 0
    return rate


@SCHEDULES.register(
    "plateau",
    options=("lr_factor", "lr_patience", "lr_floor"),
    help="--lr, multiplied by --lr-factor each time the validation ELBO has not improved for "
    "--lr-patience epochs, down to --lr-floor (needs --validation)",
)
def _plateau(
    epochs: int, lr_factor: float = 0.5, lr_patience: int = 10, lr_floor: float = 0.0
) -> Schedule:
    check_number("lr_factor", lr_factor, hint="pass --lr-factor between 0 and 1, e.g. 0.5")
    if not lr_factor < 1:
        raise InputError(f"lr_factor must lie in (0, 1), got {lr_factor!r}; e.g. --lr-factor 0.5")
    if isinstance(lr_patience, bool) or not isinstance(lr_patience, int) or lr_patience < 1:
        raise InputError(f"lr_patience must be a whole number of epochs >= 1, got {lr_patience!r}")
    check_number("lr_floor", lr_floor, allow_low=True, hint="pass --lr-floor 0 or a small rate")

    def rate(epoch: int, base: float, history: Sequence[dict]) -> float:
        values = [m[MONITORED] for m in history[: epoch - 1]]
        return plateau_rate(values, base, factor=lr_factor, patience=lr_patience, floor=lr_floor)

    return Schedule(rate, monitors=MONITORED)
