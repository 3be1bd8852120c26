r"""The recorded SVI step as a CUDA graph: forward, backward, gradient clip and fused Adam
replayed by one launch.

On a GPU a step of the reference VAE at batch 100 is a few hundred small kernels, and the GPU
waits on Python launching them one by one. A CUDA graph holds a fixed sequence of kernels on
fixed memory and replays it with one call. A whole step fits that mould when the loss is the
record of :class:`~ppl_vae.capture.CapturedLoss` (a Pyro program is not: its Python runs every
step) and the update runs without the host, as fused Adam does (its step count is a device
tensor; ``capturable`` is set on its groups while a graph is captured and reset after).

:class:`GraphedSteps` takes :func:`~ppl_vae.svi.svi_step`'s place. For each combination of
argument shapes (the record's key) it

- runs the step eagerly while the loss has no checked record for those arguments (its first
  call, the check of the record that :meth:`~ppl_vae.capture.CapturedLoss.recheck` asks for, a
  program that cannot be recorded);
- runs :data:`WARMUP` steps eagerly on a side stream, so that what torch sets up lazily (cuBLAS
  handles, autograd's streams) exists before a capture;
- then captures one step, its tensor arguments copied into tensors of the graph's own, and
  replays it; later steps copy their arguments in and replay.

A graph is captured again when something it holds as a constant changes: the record (made
afresh), the optimizer's options (the learning rate of a schedule) or the ``before_update``
callable (:func:`~ppl_vae.svi.train` makes one per epoch). Random draws advance per replay:
a graph's random kernels read the default CUDA generator's seed and offset from device
memory that each replay sets from the generator and then advances past the graph's draws, so
a replay draws the numbers an eager step would draw from the same state.

A capture that fails (a host synchronisation in the step, an operation CUDA graphs do not
allow) turns graphs off for the rest of the run, with one warning naming the reason; that step
and every later one run eagerly, drawing what they would have drawn (the default generator's
state from before the capture is put back: a failed capture leaves it unusable).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ppl_vae.capture import CapturedLoss

__all__ = ["WARMUP", "GraphedSteps", "graphs_off_reason"]

WARMUP = 2
"""Eager steps on a side stream for each argument shape before its first capture."""


def graphs_off_reason(optimizer: torch.optim.Optimizer, device: torch.device) -> str | None:
    """Why the steps of ``optimizer`` on ``device`` cannot be CUDA graphs, or None."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"they need a CUDA device, and the step runs on {device.type}"
    if not hasattr(torch.Generator, "graphsafe_set_state"):  # torch < 2.4
        return f"torch {torch.__version__} cannot restore its generator after a failed capture"
    if not all(group.get("fused") for group in optimizer.param_groups):
        return "they need fused Adam, which torch does not have for these parameters"
    return None


@dataclass
class _Graph:
    """One captured step and what it holds fixed."""

    graph: torch.cuda.CUDAGraph
    fixed: tuple  # the record, the optimizer's options, before_update: recapture if changed
    inputs: tuple  # the graph's own copies of the tensor arguments (other arguments: None)
    loss: Tensor  # the loss the last replay computed
    grads: list  # the gradients' memory, written by every replay (``p.grad`` is reset)


class GraphedSteps:
    """:func:`~ppl_vae.svi.svi_step` with the recorded steps replayed as CUDA graphs.

    Arguments:
        eager: The step it stands for, run where no graph is: ``eager(loss, optimizer, *args,
            before_update=..., **kwargs)`` (:func:`~ppl_vae.svi.svi_step`).

    Call it as ``eager``; it returns the step's loss, detached. Gradients are ``None`` between
    steps, as after ``eager``. :attr:`off` is the reason graphs were turned off, or None.
    """

    def __init__(self, eager: Callable[..., Tensor]):
        self.eager = eager
        self.graphs: dict[tuple, _Graph] = {}
        self.warm: dict[tuple, int] = {}  # eager side-stream steps taken, by argument key
        self.off: str | None = None

    def __call__(
        self,
        loss: Callable[..., Tensor],
        optimizer: torch.optim.Optimizer,
        *args,
        before_update: Callable[[], None] | None = None,
        **kwargs,
    ) -> Tensor:
        found = loss.ready(*args, **kwargs) if isinstance(loss, CapturedLoss) else None
        if self.off is not None or found is None:
            return self.eager(loss, optimizer, *args, before_update=before_update, **kwargs)
        key, record = found
        if self.warm.get(key, 0) < WARMUP:
            self.warm[key] = self.warm.get(key, 0) + 1
            return self._on_side_stream(loss, optimizer, args, kwargs, before_update)
        fixed = (record, _options(optimizer), before_update)
        graph = self.graphs.get(key)
        if graph is None or not _same(graph.fixed, fixed):
            self.graphs.pop(key, None)  # its memory goes back before the next capture
            main = torch.cuda.current_stream()
            generator = torch.cuda.default_generators[main.device.index or 0]
            before = generator.clone_state()  # the same seed and offset, not capturing
            try:
                graph = self.graphs[key] = _capture(record, loss.params, optimizer, args, fixed)
            except Exception as e:  # the capture's reason, then the step as it runs eagerly
                # a failed capture leaves its stream current and the generator in capture
                # mode (every later draw would fail): both are put back as they were
                torch.cuda.set_stream(main)
                generator.graphsafe_set_state(before)
                self._turn_off(loss.params, e)
                return self.eager(loss, optimizer, *args, before_update=before_update, **kwargs)
        for mine, arg in zip(graph.inputs, args, strict=True):
            if mine is not None:
                mine.copy_(arg)
        graph.graph.replay()
        for p in loss.params:
            p.grad = None
        return graph.loss.clone()

    def _on_side_stream(self, loss, optimizer, args, kwargs, before_update) -> Tensor:
        main = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            value = self.eager(loss, optimizer, *args, before_update=before_update, **kwargs)
        main.wait_stream(side)
        value.record_stream(main)
        return value

    def _turn_off(self, params: list[Tensor], error: Exception) -> None:
        for p in params:
            p.grad = None  # a failed capture leaves gradients of memory never written
        self.graphs.clear()
        torch.cuda.synchronize()
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        self.off = reason
        warnings.warn(
            f"the SVI step runs without CUDA graphs: its capture failed ({reason}); pass "
            f"--no-cuda-graphs to silence this",
            RuntimeWarning,
            stacklevel=3,
        )


def _options(optimizer: torch.optim.Optimizer) -> tuple:
    """The optimizer's options, group by group (numbers a captured update holds fixed)."""
    return tuple(
        tuple((k, v) for k, v in sorted(group.items()) if k != "params")
        for group in optimizer.param_groups
    )


def _same(a: tuple, b: tuple) -> bool:
    """Whether two ``fixed`` tuples hold the same objects and options."""
    record_a, options_a, update_a = a
    record_b, options_b, update_b = b
    return record_a is record_b and update_a is update_b and options_a == options_b


def _capture(
    record: Callable[..., Tensor],
    params: list[Tensor],
    optimizer: torch.optim.Optimizer,
    args: tuple,
    fixed: tuple,
) -> _Graph:
    """Captures one step of ``record`` on copies of ``args`` (the step is not taken)."""
    _, _, before_update = fixed
    inputs = tuple(a.clone() if torch.is_tensor(a) else None for a in args)
    call_args = tuple(a if mine is None else mine for a, mine in zip(args, inputs, strict=True))
    graph = torch.cuda.CUDAGraph()
    groups = optimizer.param_groups
    for group in groups:
        group["capturable"] = True  # fused Adam computes the same either way
    try:
        with torch.cuda.graph(graph):
            loss = record(params, *call_args)
            loss.backward()
            if before_update is not None:
                before_update()
            optimizer.step()
    finally:
        for group in groups:
            group["capturable"] = False
    grads = [p.grad for p in params]
    return _Graph(graph, fixed, inputs, loss.detach(), grads)
