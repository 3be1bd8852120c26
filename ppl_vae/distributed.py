r"""Several processes under ``torchrun``: the process group and what training and evaluation share.

``torchrun --nproc_per_node N -m ppl_vae ...`` starts N processes with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; :func:`init` joins them into one
``torch.distributed`` group (gloo on CPU, NCCL on CUDA, one GPU per process). Without those
variables, or with one process, every function here is the one-process identity, so the code
that calls them runs unchanged in a single process.

Collectives must be called by every rank in the same order: an error that only one rank sees
would leave the others waiting, so :func:`on_rank0_for_all` turns rank 0's outcome into every
rank's.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from ppl_vae.errors import InputError

__all__ = [
    "World",
    "on_rank0_for_all",
    "all_gather_objects",
    "all_reduce_sum",
    "barrier",
    "batch_shard",
    "destroy",
    "init",
    "launched",
    "reduce_gradients",
    "world",
]

T = TypeVar("T")
TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class World:
    """This process's rank among ``size`` processes (rank 0 of 1 without ``torchrun``)."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes files and prints results."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process (``torchrun`` with several): the collectives do work."""
        return self.size > 1


def world() -> World:
    """The current process group's rank and size, or rank 0 of 1 when there is none."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def launched() -> bool:
    """Whether ``torchrun`` (or another launcher) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> torch.device:
    """Joins the process group ``torchrun`` described; returns this rank's device.

    gloo for a CPU ``device``; NCCL for CUDA, each process on GPU ``LOCAL_RANK``. One process
    (no launcher) changes nothing and returns ``device``.
    """
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return device
    if not dist.is_available():
        raise InputError("this torch build has no torch.distributed; run one process")
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise InputError(
                f"process {local} on this machine has no GPU ({torch.cuda.device_count()} "
                f"visible); use --nproc_per_node {torch.cuda.device_count()} or --device cpu"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=TIMEOUT, device_id=device)
    elif device.type == "cpu":
        dist.init_process_group("gloo", timeout=TIMEOUT)
    else:
        raise InputError(f"torchrun runs on cpu or cuda devices, not {device.type}")
    return device


def barrier() -> None:
    """Waits until every rank gets here (nothing in one process)."""
    if world().distributed:
        dist.barrier()


def destroy() -> None:
    """Leaves the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def batch_shard(size: int, w: World) -> slice:
    """The rows of a batch of ``size`` that rank ``w.rank`` takes: contiguous, sizes differing
    by at most one, in rank order (so that the shards concatenate to the batch)."""
    base, extra = divmod(size, w.size)
    start = w.rank * base + min(w.rank, extra)
    return slice(start, start + base + (w.rank < extra))


def all_reduce_sum(t: Tensor) -> Tensor:
    """``t`` summed over the ranks, in place (and returned); ``t`` itself in one process."""
    if world().distributed:
        dist.all_reduce(t, dist.ReduceOp.SUM)
    return t


def reduce_gradients(params: Sequence[Tensor], weight: float) -> None:
    """Replaces every gradient by the sum over ranks of ``weight`` times it.

    With ``weight`` the rank's share of the global batch, this is the gradient of the loss of
    the whole batch. The gradients travel in one flat buffer, one all-reduce per step: the step
    :func:`ppl_vae.svi.train` runs is a recorded replay (:mod:`ppl_vae.capture`) that never
    calls a module's ``forward``, which ``DistributedDataParallel`` needs to arm its hooks.
    A parameter without a gradient on this rank (an empty shard) contributes zeros.
    """
    if not world().distributed:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    flat.mul_(weight)
    dist.all_reduce(flat, dist.ReduceOp.SUM)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p)
        offset += n


def all_gather_objects(value: T) -> list[T]:
    """Every rank's ``value``, in rank order (``[value]`` in one process); pickled, so only for
    what the ranks of one run send each other."""
    w = world()
    if not w.distributed:
        return [value]
    out: list = [None] * w.size
    dist.all_gather_object(out, value)
    return out


def on_rank0_for_all(fn: Callable[[], T]) -> T:
    """Runs ``fn`` on rank 0; an InputError there is raised on every rank, so that no rank is
    left waiting for one that stopped. Returns ``fn``'s result on rank 0, None elsewhere."""
    w = world()
    if not w.distributed:
        return fn()
    result, message = None, None
    if w.main:
        try:
            result = fn()
        except InputError as e:
            message = str(e)
    box = [message]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise InputError(box[0])
    return result
