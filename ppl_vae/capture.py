r"""An SVI loss traced once into a graph of tensor operations, then replayed each step.

Evaluating a Pyro ELBO runs a good deal of Python around a few dozen tensor operations: the
guide is traced, the model replayed against it, and every ``pyro.sample`` and ``pyro.param``
statement passes through the stack of handlers (plates, scales, trace, replay); at small
batches on a CPU that Python is a sizeable part of a step (docs/BENCHMARKS.md, section
svi_step). :class:`CapturedLoss` runs the
loss once under ``torch.fx``'s ``make_fx``, which records the tensor operations the Pyro
program performs, parameters as inputs; every later step replays that record. The Pyro
program is still what defines the loss: the record is its ELBO's arithmetic, random draws
included (they are operations too, so each replay draws afresh from the global RNG, the same
numbers the program would draw).

A record is only valid for a program that performs the same operations each call, given the
shapes. That holds for the library's models and guides (the ``spline`` guide's identity tails
are chosen by ``torch.where``, :mod:`ppl_vae.splines`), and for any program without Python
branches on tensor values (a branch reads the tensor, which stops the capture) or Python state
that changes between steps. So that nothing is taken on trust:

- the first call for a shape runs the program itself, so one-time work (lazy initialisation,
  Pyro's guess of ``max_plate_nesting``) stays out of the record and draws from the RNG as the
  program would; the record is made then, and capturing and checking leave the RNG streams as
  they were;
- a record is refused when the program uses a custom ``autograd.Function`` (replaying the
  forward operations would differentiate them with torch's own formulas) or an operation whose
  output shape depends on values (``x[mask]``, ``nonzero``; Pyro's own spline transforms
  select the points outside their interval this way);
- each record is checked: the program and the record run from the same RNG state must give the
  same loss and gradients, element by element, and :meth:`CapturedLoss.recheck` repeats the
  check (``train`` calls it every epoch).

A program that cannot be recorded runs itself every step, with a warning. A record does not
validate (Pyro's checks of supports and shapes read tensor values): validate the program by
running it once, as :func:`ppl_vae.svi.train` does before its loop.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial

import pyro
import torch
from torch import Tensor, fx
from torch.fx.experimental.proxy_tensor import make_fx

__all__ = ["CapturedLoss"]


def _grads(loss: Tensor, params: Sequence[Tensor]) -> list[Tensor | None]:
    return list(torch.autograd.grad(loss, params, allow_unused=True))


def _agree(a: Tensor | None, b: Tensor | None, *, compiled: bool = False) -> bool:
    """Equal up to float rounding, element by element (a record repeats the same operations).

    Each element may differ by 1e-6 of itself plus 1e-9 of the tensor's largest finite
    element, so a change to small entries next to large ones still shows. A ``compiled``
    record fuses and reorders the sums, so float32 rounding differs by more: 1e-5 of the
    element plus 1e-5 of the largest (measured: up to 3e-7 of the largest on a small VAE).
    """
    if a is None or b is None:
        return a is None and b is None
    a, b = a.detach(), b.detach()
    if a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    magnitude = torch.where(torch.isfinite(a), a.abs(), 0.0).max().clamp(min=1.0)
    rtol, atol = (1e-5, 1e-5) if compiled else (1e-6, 1e-9)
    return torch.allclose(a, b, rtol=rtol, atol=atol * float(magnitude), equal_nan=True)


def _custom_backward(loss: Tensor) -> str | None:
    """The name of a custom ``autograd.Function`` in ``loss``'s graph, if there is one.

    A record holds the forward operations, and replaying them differentiates them with torch's
    own formulas: a custom backward would be lost.
    """
    seen, todo = set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            return type(node).__name__
        todo.extend(next_node for next_node, _ in node.next_functions)
    return None


@contextmanager
def _no_cuda_home_notice() -> Iterator[None]:
    """Silences the one line torch logs when inductor first imports ``torch.utils.cpp_extension``
    on a machine without a CUDA runtime but with a CUDA_HOME ("No CUDA runtime is found, using
    CUDA_HOME=..."): noise in a CPU run's progress output. Its other warnings are kept."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


_ATEN = torch.ops.aten
_VALUE_SHAPED = {  # operations whose output shape depends on the values of their inputs
    getattr(_ATEN, name).default
    for name in ("nonzero", "masked_select", "_unique", "_unique2", "unique_consecutive",
                 "unique_dim", "argwhere", "nonzero_numpy")
    if hasattr(_ATEN, name) and hasattr(getattr(_ATEN, name), "default")
} | {_ATEN.repeat_interleave.Tensor}  # fmt: skip
_INDEXING = {_ATEN.index.Tensor, _ATEN.index_put.default, _ATEN.index_put_.default}


def _value_shaped(graph: fx.Graph) -> str | None:
    """The first operation in ``graph`` whose output shape depends on tensor values.

    A record keeps the shapes it saw (``x[mask]`` with the mask of the capture); another
    mask would break it, or change a size read as a Python number without notice.
    """
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _VALUE_SHAPED:
            return str(node.target)
        if node.target in _INDEXING:
            for index in node.args[1]:
                value = getattr(index, "meta", {}).get("val")
                if value is not None and value.dtype in (torch.bool, torch.uint8):
                    return f"{node.target} with a boolean mask"
    return None


_ALIASES = {_ATEN.expand.default, _ATEN.view.default, _ATEN.alias.default}


def _drop_aliases(graph: fx.Graph) -> None:
    """Removes views that change nothing (``expand`` or ``view`` to the same shape, ``alias``).

    Pyro expands every distribution to its plate's shape, mostly to the shape it has; each such
    view is a node in the backward pass of every step.
    """
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _ALIASES:
            continue
        source = node.args[0]
        before, after = getattr(source, "meta", {}).get("val"), node.meta.get("val")
        if (
            isinstance(before, Tensor)
            and isinstance(after, Tensor)
            and before.shape == after.shape
            and before.stride() == after.stride()
        ):
            node.replace_all_uses_with(source)
            graph.erase_node(node)


def _key(value) -> tuple:
    if torch.is_tensor(value):
        return ("tensor", value.shape, value.stride(), value.dtype, value.device)
    return ("const", type(value), value)


def _call_key(args: tuple, kwargs: dict) -> tuple:
    """The key of a call's record: each argument's shape, strides, dtype and device (tensors)
    or type and value (the rest)."""
    return tuple(map(_key, args)) + tuple((k, *_key(v)) for k, v in sorted(kwargs.items()))


class CapturedLoss:
    r"""``loss(*args)`` of fixed parameters, captured per input shape and replayed.

    Arguments:
        loss: Returns a differentiable scalar loss for tensors ``args`` (e.g. ``x``) and
            Python constants (e.g. ``num_data``); typically
            ``functools.partial(elbo.differentiable_loss, model, guide)``.
        params: Every tensor the loss is differentiated in; they become the record's inputs,
            so the optimizer's in-place updates reach it.

    Calling it returns the loss for ``args``. A record is made for each distinct combination of
    tensor shapes, dtypes, devices and non-tensor arguments, so the short last batch of an epoch
    gets its own. :meth:`recheck` has every record checked against the program again at its
    next use and made afresh if they disagree; :func:`~ppl_vae.svi.train` calls it at the
    start of every epoch, so a program changed between epochs (an annealed temperature set by
    a callback, say) is followed.
    """

    def __init__(
        self, loss: Callable[..., Tensor], params: Sequence[Tensor], *, compile: bool = False
    ):
        self.loss = loss
        self.params = list(params)
        self.compile = compile
        self.records: dict[tuple, Callable[..., Tensor]] = {}
        self.stale: set[tuple] = set()
        self.compile_seconds = 0.0  # spent compiling records so far (with ``compile``)

    def __call__(self, *args, **kwargs) -> Tensor:
        if any(torch.is_tensor(v) for v in kwargs.values()):
            raise TypeError("CapturedLoss takes tensor arguments by position only")
        found = self._lookup(args, kwargs)
        if found is None:  # an argument that cannot be a key: run the program
            return self.loss(*args, **kwargs)
        key, record = found
        if record is None:
            # The first call runs the program itself, so that one-time work (lazy
            # initialisation, Pyro's guess of max_plate_nesting) happens outside the record and
            # draws from the RNG as the program would; the record is made for later calls.
            loss = self.loss(*args, **kwargs)
            self.records[key] = self._capture(args, kwargs, _custom_backward(loss))
            return loss
        if key in self.stale:
            self.stale.discard(key)
            if isinstance(record, torch.nn.Module) and not self._agrees(record, args, kwargs):
                record = self.records[key] = self._capture(args, kwargs)
        return record(self.params, *args)

    def ready(self, *args, **kwargs) -> tuple[tuple, torch.nn.Module] | None:
        """``(key, record)``: the checked record that a call with these arguments would replay
        (called as ``record(self.params, *args)``) and the key it is kept under; None where
        the call would run the program (no record yet, a check due, a program that cannot be
        recorded, an argument that cannot be a key)."""
        if any(torch.is_tensor(v) for v in kwargs.values()):
            return None
        key, record = self._lookup(args, kwargs) or (None, None)
        if not isinstance(record, torch.nn.Module) or key in self.stale:
            return None
        return key, record

    def _lookup(self, args: tuple, kwargs: dict) -> tuple[tuple, Callable | None] | None:
        """``(key, record or None)`` for a call's arguments; None where one cannot be a key."""
        key = _call_key(args, kwargs)
        try:
            return key, self.records.get(key)
        except TypeError:  # unhashable
            return None

    def recheck(self) -> None:
        """Has every record checked against the program at its next use."""
        self.stale = set(self.records)

    def _devices(self, args: tuple) -> list[int]:
        tensors = (*self.params, *args)
        return sorted({t.device.index or 0 for t in tensors if torch.is_tensor(t) and t.is_cuda})

    def _program(self, kwargs: dict) -> Callable[..., Tensor]:
        def program(params, *args):
            return self.loss(*args, **kwargs)

        return program

    def _capture(
        self, args: tuple, kwargs: dict, custom: str | None = None
    ) -> Callable[..., Tensor]:
        program = self._program(kwargs)
        if custom is not None:
            return self._fall_back(program, f"it uses the custom autograd.Function {custom}")
        try:
            with torch.random.fork_rng(self._devices(args)), pyro.validation_enabled(False):
                record = make_fx(program)(self.params, *args)
        except Exception as e:  # any failure to trace means: run the program itself
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return self._fall_back(program, f"it could not be traced ({reason})")
        op = _value_shaped(record.graph)  # before dead code goes: a size may be all that is used
        if op is not None:
            return self._fall_back(program, f"its shapes depend on values ({op})")
        _drop_aliases(record.graph)
        record.graph.eliminate_dead_code()
        record.recompile()
        if not self._agrees(record, args, kwargs):
            return self._fall_back(program, "its record gave a different loss or gradient")
        return self._compiled(record, args, kwargs) if self.compile else record

    def _compiled(self, record: fx.GraphModule, args: tuple, kwargs: dict) -> torch.nn.Module:
        """``record`` through ``torch.compile`` (inductor, shapes fixed: a record is made per
        shape anyway), its random draws taken from torch's generators as the record takes them
        (inductor's ``fallback_random``), so that it gives the program's numbers; compiled on
        its first call, here, by the check against the program. A record that cannot be
        compiled, or whose compiled form disagrees, is replayed as it is, with a warning."""
        t0 = time.perf_counter()
        try:
            compiled = torch.compile(record, dynamic=False, options={"fallback_random": True})
            with _no_cuda_home_notice():
                agrees = self._agrees(compiled, args, kwargs)
        except Exception as e:  # a backend's failure (no compiler, an unsupported operation)
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return self._not_compiled(record, f"it could not be compiled ({reason})")
        finally:
            self.compile_seconds += time.perf_counter() - t0
        if not agrees:
            return self._not_compiled(record, "its compiled form gave a different loss or gradient")
        return compiled

    def _not_compiled(self, record: fx.GraphModule, why: str) -> fx.GraphModule:
        warnings.warn(
            f"the recorded SVI step runs uncompiled: {why}; pass --no-compile to silence this",
            RuntimeWarning,
            stacklevel=5,
        )
        return record

    def _agrees(self, record: Callable[..., Tensor], args: tuple, kwargs: dict) -> bool:
        """Whether ``record`` gives the program's loss and gradients from the same RNG state."""
        results = []
        for fn in (self._program(kwargs), record):
            with torch.random.fork_rng(self._devices(args)), pyro.validation_enabled(False):
                loss = fn(self.params, *args)
                results.append((loss, _grads(loss, self.params)))
        (want, want_grads), (got, got_grads) = results
        agree = partial(_agree, compiled=not isinstance(record, fx.GraphModule))
        return agree(want, got) and all(map(agree, want_grads, got_grads))

    def _fall_back(self, program: Callable[..., Tensor], why: str) -> Callable[..., Tensor]:
        warnings.warn(
            f"the SVI step runs eagerly: {why}; pass capture=False (--no-capture) to silence this",
            RuntimeWarning,
            stacklevel=4,
        )
        return program
