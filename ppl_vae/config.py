r"""Configuration dataclasses: fields with their help in one place, and plain-data round trips.

Every component's settings are a frozen dataclass whose fields are declared with
:func:`option`: the default, a one-line help text and, where the values are names, the
:class:`~ppl_vae.registry.Registry` (or tuple) they come from. The command line builds its flags
from these fields, and checkpoints store configurations as plain JSON data
(:func:`to_dict`, :func:`from_dict`), so defaults and help are written once.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Example:
    ...     width: int = option(3, "how wide")
    ...     sizes: tuple[int, ...] = option((1, 2), "layer sizes")
    >>> to_dict(Example())
    {'width': 3, 'sizes': [1, 2]}
    >>> from_dict(Example, {"width": 4, "sizes": [5]})
    Example(width=4, sizes=(5,))
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from ppl_vae.errors import InputError

__all__ = [
    "MAX_SEED",
    "check_memory",
    "check_number",
    "check_positive",
    "check_positive_value",
    "check_seed",
    "device_memory",
    "format_bytes",
    "field_types",
    "from_dict",
    "option",
    "to_dict",
]

C = TypeVar("C")


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    flags: Sequence[str] | None = None,
    choices: Any = None,
    parse: Callable[[str], Any] | None = None,
    metavar: str | None = None,
    default_factory: Callable[[], Any] | None = None,
) -> Any:
    """A dataclass field with the metadata the command line reads.

    Arguments:
        default: The default value.
        help: One line saying what the field is for.
        flags: Command-line flags (default: ``--field-name``).
        choices: The allowed names: a :class:`~ppl_vae.registry.Registry` or a tuple.
        parse: Turns the command-line text into a value (default: from the field's type).
        metavar: The value's name in ``--help``.
        default_factory: For mutable or dataclass defaults.
    """
    metadata = {
        "help": help,
        "flags": flags,
        "choices": choices,
        "parse": parse,
        "metavar": metavar,
    }
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def field_types(cls: type) -> dict[str, Any]:
    """The resolved type of every field of the dataclass ``cls``."""
    return typing.get_type_hints(cls)


def strip_optional(tp: Any) -> tuple[Any, bool]:
    """``(T, True)`` for ``T | None``, else ``(tp, False)``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def to_dict(config: Any) -> dict:
    """The configuration as plain JSON-able data (nested dataclasses as dicts, tuples as lists)."""

    def plain(value):
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return value

    return plain(config)


def from_dict(cls: type[C], data: dict) -> C:
    """Rebuilds ``cls`` from :func:`to_dict`'s data; unknown keys are an error.

    Lists become tuples where the field is a tuple, nested dataclasses are rebuilt, and the
    configuration validates itself as when it was first built.
    """
    if not isinstance(data, dict):
        raise InputError(f"a {cls.__name__} must be stored as a mapping, got {type(data).__name__}")
    hints = field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InputError(f"unknown {cls.__name__} settings {unknown}; known: {sorted(names)}")
    values = {}
    for name, value in data.items():
        tp, _ = strip_optional(hints[name])
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            value = from_dict(tp, value)
        elif typing.get_origin(tp) is tuple and isinstance(value, list):
            value = tuple(value)
        values[name] = value
    return cls(**values)


def check_positive(config: Any, *names: str) -> None:
    """An error naming the first of ``names`` (fields of ``config``) that is set and is not a
    positive integer."""
    for name in names:
        check_positive_value(name, getattr(config, name))


def check_positive_value(name: str, value: Any) -> None:
    """An error naming ``name`` unless ``value`` is ``None`` or a positive integer."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise InputError(f"{name} must be a positive integer, got {value!r}")


MAX_SEED = 2**63  # seeds lie in [0, 2**63): torch.Generator.manual_seed takes no more


def check_seed(name: str, value: Any, *, allow_none: bool = False) -> int | None:
    """``value`` as an int if it is an integer seed in [0, 2**63) (NumPy integers too), or
    ``None`` where ``allow_none``; an error naming ``name`` otherwise.

    Example:
        >>> check_seed("seed", 7)
        7
    """
    if value is None and allow_none:
        return None
    integer = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not integer or not 0 <= value < MAX_SEED:
        what = "None or an integer" if allow_none else "an integer"
        raise InputError(
            f"{name} must be {what} in [0, 2**63), got {value!r}; pass --seed 0 or another "
            f"non-negative integer"
        )
    return int(value)


def check_number(
    name: str,
    value: Any,
    *,
    low: float = 0.0,
    high: float = math.inf,
    allow_low: bool = False,
    hint: str = "",
) -> float:
    """``value`` as a float if it is a finite number in ``(low, high]`` (``[low, high]`` with
    ``allow_low``); an error naming ``name`` and the range otherwise (``hint``: the fix)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = number and math.isfinite(value) and value <= high
    ok = ok and (value >= low if allow_low else value > low)
    if not ok:
        bound = f">= {low:g}" if allow_low else f"> {low:g}"
        within = f"{bound} and <= {high:g}" if math.isfinite(high) else bound
        raise InputError(
            f"{name} must be a finite number {within}, got {value!r}"
            + (f"; {hint}" if hint else "")
        )
    return float(value)


UNKNOWN_MEMORY = 16 * 2**30  # the bound where a machine's memory cannot be read


def device_memory(device: torch.device | str = "cpu") -> int:
    """Bytes of memory on ``device``: a GPU's total, else the machine's physical memory (16 GiB
    where neither can be read)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return UNKNOWN_MEMORY


def format_bytes(n: float) -> str:
    """``n`` bytes in GB (MB below one GB), e.g. ``'12.3 GB'``, ``'9,634 GB'``."""
    if n < 1e9:
        return f"{n / 1e6:.3g} MB"
    return f"{n / 1e9:.3g} GB" if n < 1e12 else f"{n / 1e9:,.0f} GB"


def check_memory(need: float, what: str, *, device: torch.device | str, fix: str) -> None:
    """An error saying that ``what`` needs about ``need`` bytes when that is more than
    ``device`` has (:func:`device_memory`); ``fix`` says what to change."""
    have = device_memory(device)
    if need > have:
        raise InputError(
            f"{what} needs about {format_bytes(need)} of memory, more than the "
            f"{format_bytes(have)} of this {torch.device(device).type}; {fix}"
        )
