r"""Tables of named choices: one idiom for guides, flows, likelihoods, networks, losses and data.

A :class:`Registry` maps a name to a factory and the keyword options that factory takes. Help
texts, command-line ``choices`` and error messages read the names from the table, so a new
guide (say) is one ``register`` call, and an option that a choice does not take is an error
that names it instead of being dropped.

Example:
    >>> shapes = Registry("shape")
    >>> @shapes.register("square", options=("side",))
    ... def square(side=1.0):
    ...     return side * side
    >>> shapes.build("square", side=3.0)
    9.0
    >>> shapes.build("circle")
    Traceback (most recent call last):
    ...
    ppl_vae.errors.InputError: unknown shape 'circle'; choose one of square
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ppl_vae.errors import InputError

__all__ = ["Entry", "Registry"]

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One named choice: its factory, the keyword options the factory takes, a help line."""

    name: str
    factory: Callable[..., T]
    options: tuple[str, ...] = ()
    help: str = ""


class Registry(Generic[T]):
    """Names mapped to factories with explicitly declared options.

    Arguments:
        kind: What the names name, for messages ("guide", "flow", ...).
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(
        self,
        name: str,
        factory: Callable[..., T] | None = None,
        *,
        options: tuple[str, ...] = (),
        help: str = "",
    ):
        """Adds ``name``; usable as ``register(name, factory)`` or as a decorator."""

        def add(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise KeyError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, fn, tuple(options), help)
            return fn

        return add if factory is None else add(factory)

    @property
    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, name: str) -> Entry[T]:
        self.check(name)
        return self._entries[name]

    def check(self, name: object) -> str:
        """Returns ``name`` if it is registered; otherwise an error listing the choices."""
        if name not in self._entries:
            raise InputError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self)}")
        return name  # type: ignore[return-value]

    def options(self, name: str) -> tuple[str, ...]:
        """The keyword options the factory of ``name`` takes."""
        return self[name].options

    def check_options(self, name: str, given: dict[str, Any], prefix: str = "") -> None:
        """An error naming the first option in ``given`` that ``name`` does not take.

        ``prefix`` is put before option names in the message (``"--"`` for flags).
        """
        accepted = self.options(name)
        for key in given:
            if key not in accepted:
                takes = ", ".join(prefix + o.replace("_", "-" if prefix else "_") for o in accepted)
                flag = prefix + key.replace("_", "-" if prefix else "_")
                raise InputError(
                    f"{flag} does not apply to the {self.kind} {name!r}, which takes "
                    f"{takes or 'no options'}; drop {flag}"
                )

    def build(self, name: str, *args, **options) -> T:
        """Calls the factory of ``name`` with ``args`` and the declared ``options``."""
        self.check_options(name, options)
        return self[name].factory(*args, **options)

    def help(self) -> str:
        """One line per name with its help text, for ``--help``."""
        return "; ".join(
            f"{e.name}: {e.help}" if e.help else e.name for e in self._entries.values()
        )
