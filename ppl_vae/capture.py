r"""An SVI loss traced once into a graph of tensor operations, then replayed each step.

Evaluating a Pyro ELBO runs a good deal of Python around a few dozen tensor operations: the
guide is traced, the model replayed against it, and every ``pyro.sample`` and ``pyro.param``
statement passes through the stack of handlers (plates, scales, trace, replay). At batch 100
on a CPU that Python costs about a sixth of a training step. :class:`CapturedLoss` runs the
loss once under ``torch.fx``'s ``make_fx``, which records the tensor operations the Pyro
program performs, parameters as inputs; every later step replays that record. The Pyro
program is still what defines the loss: the record is its ELBO's arithmetic, random draws
included (they are operations too, so each replay draws afresh from the global RNG, the same
numbers the program would draw).

A record is only valid for a program that performs the same operations each call, given the
shapes. That holds for the library's models and guides and for any program without Python
branches on tensor values (a branch on a value reads the tensor, which stops the capture) or
Python state that changes between steps. So that nothing is taken on trust, each capture is
checked: the program and its record are run from the same RNG state and must give the same
loss and gradients. A program that cannot be captured, or whose record disagrees, runs eagerly,
with a warning. Capturing and checking leave the RNG streams as they were. A record does not
validate (Pyro's checks of supports and shapes read tensor values): validate the program by
running it once, as :func:`ppl_vae.train.train` does before its loop.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import pyro
import torch
from torch import Tensor, fx

__all__ = ["CapturedLoss"]


def _grads(loss: Tensor, params: Sequence[Tensor]) -> list[Tensor | None]:
    return list(torch.autograd.grad(loss, params, allow_unused=True))


def _agree(a: Tensor | None, b: Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    a, b = a.detach(), b.detach()
    magnitude = torch.where(torch.isfinite(a), a.abs(), 0.0).max().clamp(min=1.0)
    return a.shape == b.shape and torch.allclose(
        a, b, rtol=1e-5, atol=1e-5 * float(magnitude), equal_nan=True
    )


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
    next use and made afresh if they disagree; :func:`~ppl_vae.train.train` calls it at the
    start of every epoch, so a program changed between epochs (an annealed temperature set by
    a callback, say) is followed.
    """

    def __init__(self, loss: Callable[..., Tensor], params: Sequence[Tensor]):
        self.loss = loss
        self.params = list(params)
        self.records: dict[tuple, Callable[..., Tensor]] = {}
        self.stale: set[tuple] = set()

    def __call__(self, *args) -> Tensor:
        key = tuple(
            (a.shape, a.dtype, a.device) if torch.is_tensor(a) else ("const", a) for a in args
        )
        record = self.records.get(key)
        if key in self.stale:
            self.stale.discard(key)
            if isinstance(record, fx.GraphModule) and not self._agrees(record, args):
                record = None
        if record is None:
            record = self.records[key] = self._capture(args)
        return record(self.params, *args)

    def recheck(self) -> None:
        """Has every record checked against the program at its next use."""
        self.stale = set(self.records)

    def _eager(self, params, *args) -> Tensor:
        return self.loss(*args)

    def _devices(self, args: tuple) -> list[int]:
        tensors = (*self.params, *args)
        return sorted({t.device.index or 0 for t in tensors if torch.is_tensor(t) and t.is_cuda})

    def _capture(self, args: tuple) -> Callable[..., Tensor]:
        try:
            from torch.fx.experimental.proxy_tensor import make_fx

            with torch.random.fork_rng(self._devices(args)), pyro.validation_enabled(False):
                record = make_fx(self._eager)(self.params, *args)
            record.graph.eliminate_dead_code()
            record.recompile()
        except Exception as e:  # any failure to trace means: run the program itself
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return self._fall_back(f"it could not be traced ({reason})")
        if not self._agrees(record, args):
            return self._fall_back("its record gave a different loss or gradient")
        return record

    def _agrees(self, record: Callable[..., Tensor], args: tuple) -> bool:
        """Whether ``record`` gives the program's loss and gradients from the same RNG state."""
        results = []
        for fn in (self._eager, record):
            with torch.random.fork_rng(self._devices(args)), pyro.validation_enabled(False):
                loss = fn(self.params, *args)
                results.append((loss, _grads(loss, self.params)))
        (want, want_grads), (got, got_grads) = results
        return _agree(want, got) and all(map(_agree, want_grads, got_grads))

    def _fall_back(self, why: str) -> Callable[..., Tensor]:
        warnings.warn(
            f"the SVI step runs eagerly: {why}; pass capture=False (--no-capture) to silence this",
            RuntimeWarning,
            stacklevel=3,
        )
        return self._eager
