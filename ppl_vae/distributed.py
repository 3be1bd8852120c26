r"""Several processes under ``torchrun``: the process group and what training and evaluation share.

``torchrun --nproc_per_node N -m ppl_vae ...`` starts N processes with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; :func:`init` joins them into one
``torch.distributed`` group (gloo on CPU, NCCL on CUDA, one GPU per process). Without those
variables, or with one process, every function here is the one-process identity, so the code
that calls them runs unchanged in a single process.

Collectives must be called by every rank in the same order: an error that only one rank sees
would leave the others waiting, so :func:`on_rank0_for_all` turns rank 0's outcome into every
rank's.

A rank that dies (killed, out of memory) breaks the collectives of the others: each function
here then raises :class:`RankStopped`, naming the ranks on this machine whose process is gone
(each rank records its host and process id in the group's store when it joins).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from ppl_vae.errors import InputError

__all__ = [
    "RankStopped",
    "SharedSum",
    "World",
    "gather_round_robin",
    "on_rank0_for_all",
    "round_robin",
    "all_gather_objects",
    "all_reduce_sum",
    "barrier",
    "batch_shard",
    "destroy",
    "init",
    "launched",
    "reduce_gradients",
    "stopped_ranks",
    "world",
]

T = TypeVar("T")
TIMEOUT = datetime.timedelta(minutes=30)
SHM = "/dev/shm"  # where SharedSum maps its file (Linux)
PROCESSES = "ppl_vae/process/"  # the store's keys "ppl_vae/process/RANK": "MACHINE PID"


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
    store = _processes()
    if store is not None:  # for stopped_ranks
        store.set(str(dist.get_rank()), f"{_machine()} {os.getpid()}")
    return device


class RankStopped(RuntimeError):
    """A collective failed: another rank stopped (its process died) or lost its connection.

    ``ranks`` are the ones found gone (:func:`stopped_ranks`; empty when none was, as for a
    rank on another machine); ``reason`` is the backend's own first line.
    """

    def __init__(self, ranks: Sequence[int], reason: str):
        self.ranks, self.reason = list(ranks), reason
        if len(self.ranks) == 1:
            message = f"rank {self.ranks[0]} stopped (its process ended)"
        elif self.ranks:
            message = f"ranks {', '.join(map(str, self.ranks))} stopped (their processes ended)"
        else:
            message = f"another rank stopped or lost its connection ({reason})"
        super().__init__(message)

    def told_by(self, w: World) -> bool:
        """Whether rank ``w.rank`` is the one to say so: the first rank still running (rank 0,
        unless it is the one that stopped)."""
        return w.rank == min(set(range(w.size)) - set(self.ranks))


def stopped_ranks(wait: float = 0.2) -> list[int]:
    """The other ranks on this machine whose process is gone, as recorded when they joined.

    A process dies a moment after its connections close, so an answer of none is given only
    after ``wait`` seconds. Ranks on other machines are not seen (they are never listed).
    """
    w, store, here = world(), _processes(), _machine()
    pids = {}
    for rank in range(w.size):
        key = str(rank)
        with contextlib.suppress(RuntimeError):  # the store's server may be gone too
            if rank != w.rank and store is not None and store.check([key]):
                where, pid = store.get(key).decode().split()
                if where == here:
                    pids[rank] = int(pid)
    deadline = time.monotonic() + wait
    while True:
        gone = [rank for rank, pid in pids.items() if not _running(pid)]
        if gone or not pids or time.monotonic() > deadline:
            return gone
        time.sleep(0.01)


def barrier() -> None:
    """Waits until every rank gets here (nothing in one process)."""
    if world().distributed:
        with _collective():
            dist.barrier()


def destroy() -> None:
    """Leaves the process group, if this process joined one."""
    SharedSum._made.clear()  # their memory is unmapped with them
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
        with _collective():
            dist.all_reduce(t, dist.ReduceOp.SUM)
    return t


def reduce_gradients(params: Sequence[Tensor], weight: float, shared: bool | None = None) -> None:
    """Replaces every gradient by the sum over ranks of ``weight`` times it.

    With ``weight`` the rank's share of the global batch, this is the gradient of the loss of
    the whole batch. The gradients travel in one flat buffer, one sum per step: the step
    :func:`ppl_vae.svi.train` runs is a recorded replay (:mod:`ppl_vae.capture`) that never
    calls a module's ``forward``, which ``DistributedDataParallel`` needs to arm its hooks.
    A parameter without a gradient on this rank (an empty shard) contributes zeros.

    ``shared``: sum through shared memory where every rank is a CPU process on this machine
    (:class:`SharedSum`), or by the backend's all-reduce (``False``); ``None``: shared unless
    the environment variable ``PPL_VAE_SHARED_SUM`` is ``0``.
    """
    if not world().distributed:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    parts = [g.reshape(-1) for g in grads]
    if shared is None:
        shared = os.environ.get("PPL_VAE_SHARED_SUM", "1") != "0"
    summer = SharedSum.of(sum(g.numel() for g in parts), parts[0]) if shared else None
    if summer is not None:
        flat = summer(parts, weight)
    else:
        flat = torch.cat(parts).mul_(weight)
        with _collective():
            dist.all_reduce(flat, dist.ReduceOp.SUM)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p)
        offset += n


class SharedSum:
    """Sums a flat CPU buffer over the ranks of one machine through shared memory.

    On a small machine gloo's all-reduce is the cost of a step under ``torchrun``: 3.4 ms for
    the reference VAE's 1.7 MB of gradients on this project's 2-core test machine, where the
    two ranks' halves of a batch of 500 take 15 ms, and its threads compete with the ranks for
    the cores (docs/BENCHMARKS.md, ddp). Here each rank copies its buffer into its slot of a
    file in ``/dev/shm`` mapped by every rank, raises its flag to the call's number, waits
    until every flag has, and adds the slots in rank order: every rank gets the same sum to
    the bit, for two ranks the one gloo gives. Calls alternate between two sets of slots, so a
    rank that runs ahead never overwrites a slot another still reads (it cannot pass the next
    call's wait before that rank has finished reading).

    The file is unlinked as soon as every rank has mapped it, so nothing is left behind. A
    rank that waits checks every half second whether another rank's process is gone (by the
    process ids the ranks exchanged when the file was made, so rank 0's death is seen too,
    though the group's store dies with it), and raises :class:`RankStopped` naming it, as the
    backend's collectives do. Used on Linux on x86-64 (whose stores become visible in order;
    the flag is written after the copy's kernel has returned), when every rank is on this
    machine and gloo is the backend; elsewhere :meth:`of` gives ``None`` and the backend sums.
    """

    POLL = 0.5  # seconds between checks for a stopped rank while waiting
    _made: dict[tuple, SharedSum | None] = {}  # per process group, size and dtype

    def __init__(self, numel: int, dtype: torch.dtype, path: str, pids: Sequence[int]):
        w = world()
        self.rank, self.calls = w.rank, 0
        self.peers = {rank: pid for rank, pid in enumerate(pids) if rank != w.rank}
        item = torch.empty((), dtype=dtype).element_size()
        data_bytes = -(-2 * w.size * numel * item // 8) * 8  # the flags start 8-aligned
        raw = torch.from_file(path, shared=True, size=data_bytes + 8 * w.size, dtype=torch.uint8)
        slots = raw[: 2 * w.size * numel * item].view(dtype)
        self.slots = slots.view(2, w.size, numel)
        self.flags = raw[data_bytes:].view(torch.int64).numpy()  # the numpy view reads cheaply

    @classmethod
    def of(cls, numel: int, like: Tensor) -> SharedSum | None:
        """The summer for ``numel`` values of ``like``'s dtype in the current group, made on
        the first call (a collective: every rank must call it, in the same order); ``None``
        where shared memory does not apply (``like`` not on a CPU, another backend or
        platform, ranks on several machines)."""
        key = (id(dist.group.WORLD), world().size, numel, like.dtype)
        if key not in cls._made:
            cls._made[key] = cls._make(numel, like)
        return cls._made[key]

    @classmethod
    def _make(cls, numel: int, like: Tensor) -> SharedSum | None:
        usable = (
            like.device.type == "cpu"
            and dist.get_backend() == "gloo"
            and platform.system() == "Linux"
            and platform.machine() in ("x86_64", "AMD64")
            and os.path.isdir(SHM)
            and os.access(SHM, os.W_OK)
        )
        places = all_gather_objects((_machine(), usable, os.getpid()))
        if not all(ok and where == places[0][0] for where, ok, _ in places):
            return None
        path = None
        if world().main:
            path = os.path.join(SHM, f"ppl_vae-sum-{os.getpid()}-{uuid.uuid4().hex}")
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600))
        (path,) = {p for p in all_gather_objects(path) if p is not None}
        try:
            summer = cls(numel, like.dtype, path, [pid for _, _, pid in places])
            barrier()  # every rank has mapped the file
        finally:
            if world().main:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        return summer

    def __call__(self, parts: Sequence[Tensor], weight: float = 1.0) -> Tensor:
        """The sum over the ranks of ``weight`` times the concatenated ``parts`` (flat tensors
        of ``numel`` values in all), as a new tensor. The parts are written straight into
        this rank's slot."""
        self.calls += 1
        slots = self.slots[self.calls % 2]
        mine = torch.cat(parts, out=slots[self.rank])
        if weight != 1.0:
            mine.mul_(weight)
        self.flags[self.rank] = self.calls
        self._wait(self.calls)
        return slots.sum(dim=0)

    def _wait(self, call: int) -> None:
        """Until every rank has raised its flag to ``call``: a spin that yields the core to
        the other processes (``sched_yield``), with a check for a stopped rank every
        :attr:`POLL` seconds."""
        flags, spins, start = self.flags, 0, time.monotonic()
        check = start + self.POLL
        while flags.min() < call:
            os.sched_yield()
            spins += 1
            if spins % 1024 == 0 and time.monotonic() > check:
                gone = [rank for rank, pid in self.peers.items() if not _running(pid)]
                if gone or time.monotonic() - start > TIMEOUT.total_seconds():
                    raise RankStopped(gone, f"no sum from every rank in {TIMEOUT}")
                check = time.monotonic() + self.POLL


def all_gather_objects(value: T) -> list[T]:
    """Every rank's ``value``, in rank order (``[value]`` in one process); pickled, so only for
    what the ranks of one run send each other."""
    w = world()
    if not w.distributed:
        return [value]
    out: list = [None] * w.size
    with _collective():
        dist.all_gather_object(out, value)
    return out


def round_robin(count: int) -> range:
    """The batches (of ``count``, by index) this rank takes: every size-th from its rank."""
    w = world()
    return range(w.rank, count, w.size)


def gather_round_robin(results: list[T], count: int) -> list[T]:
    """Every rank's ``results`` of its :func:`round_robin` batches, on every rank, back in the
    order of the ``count`` batches (pickled: send CPU tensors)."""
    w = world()
    if not w.distributed:
        return results
    ranks = all_gather_objects(results)
    return [ranks[b % w.size][b // w.size] for b in range(count)]


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
    with _collective():
        dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise InputError(box[0])
    return result


@contextlib.contextmanager
def _collective() -> Iterator[None]:
    """Turns the backend's error when a rank is gone (a gloo read error, an NCCL abort: a
    ``RuntimeError``, its traceback dozens of lines) into :class:`RankStopped`. Any other
    error (a bug: tensors that differ between ranks) stays as it is, unless a rank is gone."""
    try:
        yield
    except RuntimeError as e:
        text = str(e).strip()
        ranks = stopped_ranks()
        if not ranks and not (isinstance(e, dist.DistBackendError) or "gloo/transport" in text):
            raise
        reason = re.sub(r"^\[[^\]]*\] ", "", text).split(". ")[0].splitlines()[0]
        raise RankStopped(ranks, reason) from e


def _processes() -> dist.Store | None:
    """The group's store, under the keys of :data:`PROCESSES` (None if torch keeps it elsewhere)."""
    default = getattr(dist.distributed_c10d, "_get_default_store", None)  # torch private
    return dist.PrefixStore(PROCESSES, default()) if default is not None else None


def _machine() -> str:
    """Where this process's id means something: the host and, on Linux, the process id
    namespace (two containers may share a host name, never a namespace)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return f"{socket.gethostname()}/{namespace}".replace(" ", "_")


def _running(pid: int) -> bool:
    """Whether process ``pid`` runs: not a zombie (dead, not yet reaped by its launcher)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except OSError:
        if Path("/proc/self/stat").exists():  # Linux: no such process
            return False
    try:  # no /proc (macOS): a zombie counts as running until it is reaped
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True
