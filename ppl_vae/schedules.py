r"""Learning-rate schedules: the rate of every epoch as a function of the epoch alone.

A schedule is a :class:`Schedule` built from :data:`SCHEDULES` by name, with its own options
(an option of another schedule is an error). Its rate depends on the epoch and the base rate
only, so a resumed run continues it exactly; it may also set Adam's :math:`\epsilon`.

Example:
    >>> burda = SCHEDULES.build("burda", 3280)
    >>> [round(burda.rate(e, 1e-3) * 1e3, 4) for e in (1, 2, 4, 5, 3280)]
    [1.0, 0.7197, 0.7197, 0.5179, 0.1]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ppl_vae.config import check_number
from ppl_vae.registry import Registry

__all__ = ["BURDA_STAGES", "SCHEDULES", "Schedule", "burda_stage"]

BURDA_STAGES = 8  # Burda et al. (2015): 3^i epochs at 10^(-i/7) times the base rate, i = 0..7


@dataclass(frozen=True)
class Schedule:
    """``rate(epoch, base)``: the learning rate of epoch 1, 2, ...; ``adam_eps``: Adam's
    :math:`\\epsilon` for the run."""

    rate: Callable[[int, float], float]
    adam_eps: float = 1e-8  # torch's default


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
    return Schedule(lambda epoch, base: base)


@SCHEDULES.register(
    "burda",
    help="Burda et al. (2015): 3^i epochs at --lr * 10^(-i/7), i = 0..7 (3280 epochs), Adam "
    "epsilon 1e-4",
)
def _burda(epochs: int) -> Schedule:
    return Schedule(lambda epoch, base: base * 10 ** (-burda_stage(epoch) / 7), adam_eps=1e-4)


@SCHEDULES.register(
    "cosine",
    options=("lr_warmup", "lr_floor"),
    help="a linear warm-up over --lr-warmup epochs, then a cosine from --lr down to --lr-floor "
    "at --epochs",
)
def _cosine(epochs: int, lr_warmup: int = 0, lr_floor: float = 0.0) -> Schedule:
    def rate(epoch: int, base: float) -> float:
        if epoch <= lr_warmup:
            return base * epoch / (lr_warmup + 1)
        span = max(epochs - lr_warmup, 1)
        progress = min((epoch - lr_warmup - 1) / max(span - 1, 1), 1.0)
        return lr_floor + (base - lr_floor) * 0.5 * (1 + math.cos(math.pi * progress))

    check_number("lr_floor", lr_floor, allow_low=True, hint="pass --lr-floor 0 or a small rate")
    return Schedule(rate)
