r"""The mixtures' input checks: settings, points and starting parameters, each written once."""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from torch import Tensor

from ppl_vae import config
from ppl_vae.errors import InputError
from ppl_vae.points import value_range

__all__ = [
    "as_float",
    "check_bool",
    "check_finite",
    "check_integer",
    "check_means_init",
    "check_number",
    "check_seed",
    "check_verbose",
    "check_weights_init",
]


def as_float(x, name: str = "x") -> Tensor:
    """A float32 or float64 tensor from ``x``, with scikit-learn's choice of dtype.

    float32 and float64 tensors and arrays keep their dtype (a tensor also its device);
    integer and boolean input, Python lists and numbers become float64. Complex input is
    refused rather than losing its imaginary part, and other floating dtypes (float16,
    bfloat16) are a ``TypeError``. NumPy arrays with negative strides or read-only memory are
    copied, which torch needs.
    """
    if isinstance(x, Tensor):
        if x.is_complex():
            raise InputError(f"{name} is complex ({x.dtype}); pass real values, e.g. x.real")
        if not torch.is_floating_point(x):
            return x.to(torch.float64)
        if x.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{name} has dtype {x.dtype}; pass float32 or float64 (x.float())")
        return x
    try:
        a = np.asarray(x)
    except (TypeError, ValueError) as e:
        raise InputError(f"{name} is not an array of numbers ({e})") from None
    kind = a.dtype.kind
    if kind == "c":
        raise InputError(f"{name} is complex ({a.dtype}); pass real values, e.g. x.real")
    if kind in "biuO":
        try:
            a = a.astype(np.float64)
        except (TypeError, ValueError):
            raise InputError(f"{name} has entries that are not real numbers") from None
    elif kind != "f":
        raise InputError(f"{name} has dtype {a.dtype}; pass real numbers")
    elif a.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} has dtype {a.dtype}; pass float32 or float64")
    if any(step < 0 for step in a.strides) or not a.flags.writeable:
        a = a.copy()
    return torch.from_numpy(a)


# -- settings ------------------------------------------------------------------------------------


def _is_bool(value) -> bool:
    return isinstance(value, (bool, np.bool_))


def _is_integer(value, minimum: int) -> bool:
    """Python and NumPy integers (``np.int64(3)``) of at least ``minimum``; not bools or 2.0."""
    return not _is_bool(value) and isinstance(value, numbers.Integral) and value >= minimum


def check_integer(name: str, value, minimum: int) -> int:
    """``value`` as an int if it is an integer of at least ``minimum`` (0 or 1)."""
    if not _is_integer(value, minimum):
        kind = "a positive" if minimum >= 1 else "a non-negative"
        raise InputError(f"{name} must be {kind} integer, got {value!r}")
    return int(value)


def check_seed(value) -> int | None:
    """``value`` if it is None or an integer seed in [0, 2**63) (for ``torch.Generator``)."""
    return config.check_seed("seed", value, allow_none=True)


def check_bool(name: str, value) -> bool:
    if not _is_bool(value):
        raise InputError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_verbose(value) -> int:
    """``verbose``: a non-negative integer or a bool (True is 1), as scikit-learn takes it."""
    return int(value) if _is_bool(value) else check_integer("verbose", value, 0)


def check_number(name: str, value, positive: bool = False, why: str = "") -> float:
    """``value`` as a float if it is a real number (not a bool), > 0 or >= 0; NaN fails.

    Python and NumPy numbers pass. ``why`` is put after the requirement in the message,
    e.g. " (a pseudo-count ...)".
    """
    ok = isinstance(value, numbers.Real) and not _is_bool(value)
    if not ok or not (value > 0 if positive else value >= 0):
        kind = "a positive" if positive else "a non-negative"
        raise InputError(f"{name} must be {kind} number{why}, got {value!r}")
    return float(value)


# -- points and starting parameters --------------------------------------------------------------


def check_finite(x: Tensor, name: str, fix: str = "") -> Tensor:
    """``x`` if it has no NaN or infinite entries; ``fix`` ends the message ("; ...")."""
    if x.numel() and not all(map(math.isfinite, value_range(x))):
        raise InputError(f"{name} contains NaN or infinite values{fix}")
    return x


def check_weights_init(w: Tensor, k: int) -> Tensor:
    """Initial mixing weights: shape (k,), non-negative, summing to 1."""
    if w.shape != (k,):
        raise InputError(f"weights_init must have shape ({k},), got {tuple(w.shape)}")
    tol = 1e-6 if w.dtype == torch.float32 else 1e-8  # scikit-learn's tolerances
    if (w < 0).any() or abs(w.sum().item() - 1) > tol:
        raise InputError(
            f"weights_init must be non-negative and sum to 1, got sum {w.sum().item():g}; "
            f"divide by its sum"
        )
    return w


def check_means_init(m: Tensor, k: int, d: int, flatten: bool = False) -> Tensor:
    """Initial means of shape (k, d); with ``flatten``, any shape of k * d entries is reshaped."""
    if flatten and m.numel() == k * d:
        m = m.reshape(k, d)
    if m.shape != (k, d):
        raise InputError(f"means_init must have shape ({k}, {d}), got {tuple(m.shape)}")
    return m
