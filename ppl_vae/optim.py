r"""The optimizer of training: Adam over every parameter, fused where torch has the kernel.

``torch.optim.Adam(fused=True)`` updates all parameters in one kernel per step; torch has it on
CUDA since 2.0 and on the CPU since 2.4 (the project allows torch 2.1). Where it is missing,
the multi-tensor (``foreach``) implementation is used instead. The two compute the same update
up to float rounding (``tests/test_optim.py``).

A checkpoint's optimizer state records the implementation it was saved with in its parameter
groups (``fused``, ``foreach``), and ``load_state_dict`` would restore those options; so
:func:`load_adam_state` lays the implementation of the optimizer it loads into over them: a run
saved with the default (unfused) Adam resumes fused, and the other way round.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["IMPLEMENTATION_KEYS", "adam", "is_fused", "load_adam_state"]

# the param-group options that choose Adam's implementation, not its numbers
IMPLEMENTATION_KEYS = ("fused", "foreach")


def adam(params: Iterable[Tensor], *, lr: float, eps: float = 1e-8) -> torch.optim.Adam:
    """Adam over ``params``: fused where torch supports it for their device and dtype, else
    ``foreach``.

    Whether a fused kernel exists is torch's own check, made when the optimizer is built (it
    raises ``RuntimeError`` naming the supported devices); nothing else is caught.

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(3))
        >>> opt = adam([p], lr=1e-3)
        >>> is_fused(opt) == (torch.__version__ >= (2, 4))  # a CPU parameter
        True
    """
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, eps=eps, fused=True)
    except RuntimeError:  # torch < 2.4 on a CPU, or a device without the kernel
        return torch.optim.Adam(params, lr=lr, eps=eps, foreach=True)


def is_fused(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every parameter group of ``optimizer`` steps with the fused kernel."""
    return all(bool(group.get("fused")) for group in optimizer.param_groups)


def load_adam_state(optimizer: torch.optim.Adam, state: dict) -> None:
    """``optimizer.load_state_dict`` of a copy of ``state``, keeping ``optimizer``'s own
    implementation (fused or not) whatever ``state`` was saved with.

    The options are laid over the saved groups before loading, so that torch places each
    tensor as the implementation needs it (the fused kernel keeps the step count as a float32
    tensor on the parameter's device; the others on the CPU). ``state`` is left unchanged, and
    the optimizer shares no tensor with it (Adam updates its state in place).
    """
    own = [{k: group.get(k) for k in IMPLEMENTATION_KEYS} for group in optimizer.param_groups]
    state = copy.deepcopy(state)
    if len(state.get("param_groups", ())) == len(own):  # else torch's own error, below
        for group, options in zip(state["param_groups"], own, strict=True):
            group.update(options)
    optimizer.load_state_dict(state)
