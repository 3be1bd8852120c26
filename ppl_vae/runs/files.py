r"""Files on disk: atomic writes under unique temporary names, output folders, the device."""

from __future__ import annotations

import fcntl
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ppl_vae.distributed import init, launched
from ppl_vae.errors import InputError, WriteError
from ppl_vae.plots import close_figure

__all__ = [
    "folder_lock",
    "make_output_dir",
    "remove_stale_temporaries",
    "resolve_device",
    "save_figure",
    "save_torch",
    "write_json",
    "write_text",
]


def _replace_atomic(path: Path, write: Callable[[object], None], mode: str) -> None:
    """Writes through ``write(file)`` to a new temporary file beside ``path``, then renames it.

    The temporary name is unique (``tempfile.mkstemp``), so two writers never share one; it is
    removed if anything fails (a signal included), and the result gets the usual permissions
    (umask). A full or read-only disk is a one-line :class:`WriteError` naming the file; the
    previous file is then intact.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise _write_error(path, e) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_error(path: Path, e: OSError) -> WriteError:
    kept = f"the previous {path.name} is intact" if path.exists() else "nothing was written"
    return WriteError(f"cannot write {path}: {e.strerror or e}; {kept}")


def remove_stale_temporaries(folder: Path, names: tuple[str, ...]) -> None:
    """Removes temporary files of ``names`` left by writers that died (kill -9, power loss).

    Call it only while holding the folder's lock, when no other writer of those names lives.
    """
    for name in names:
        for tmp in folder.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """An advisory ``fcntl`` lock on ``folder/.lock``: one writer at a time.

    The operating system releases it when the holder exits, however it dies. A second writer
    gets a one-line error naming the holder's pid.
    """
    path = folder / ".lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise InputError(
                f"another ppl-vae process (pid {holder}) is writing to {folder}; wait for it to "
                f"finish or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def save_torch(obj: object, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename over it.

    The bytes are made in memory first, so that a full disk is an ``OSError`` of the write
    (torch's own writer reports it as a bare ``RuntimeError``).
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    _replace_atomic(Path(path), lambda f: f.write(buffer.getbuffer()), "wb")


def write_text(text: str, path: str | os.PathLike) -> None:
    """Writes ``text`` to a temporary file beside ``path``, then renames it over ``path``."""
    _replace_atomic(Path(path), lambda f: f.write(text), "w")


def write_json(record: object, path: str | os.PathLike, indent: int | None = None) -> None:
    """Writes ``record`` as one JSON document (and a newline), atomically."""
    write_text(json.dumps(record, indent=indent) + "\n", path)


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Saves a matplotlib figure as PNG, atomically, and closes it."""
    path = Path(path)
    try:
        _replace_atomic(
            path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"), "wb"
        )
    finally:
        close_figure(fig)
    return path


def check_output_dir(out_dir: str | os.PathLike) -> None:
    """An InputError now if ``out_dir`` could not be created or written later; creates nothing.

    A command checks its output folder before long work, so that a mistyped ``--out`` fails
    at once rather than after the work.
    """
    out = Path(out_dir)
    existing = next(p for p in (out, *out.parents) if p.exists() or p == Path(p.anchor))
    if not existing.is_dir():
        raise InputError(f"cannot create output directory {out}: {existing} is not a directory")
    if not os.access(existing, os.W_OK):
        what = "output directory" if existing == out else "folder"
        raise InputError(f"{what} {existing} is not writable; choose another --out")


def make_output_dir(out_dir: str | os.PathLike) -> Path:
    """Creates ``out_dir`` (and parents); a clear error if it cannot be created or written."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create output directory {out}: {e.strerror}") from None
    if not os.access(out, os.W_OK):
        raise InputError(f"output directory {out} is not writable; choose another --out")
    return out


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` picks CUDA when a GPU is visible; ``"cuda"`` without one is an error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"unknown device {device!r}; use auto, cpu or cuda") from None
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"device {device!r} is not supported; use auto, cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but no CUDA GPU is visible; use cpu or auto")
    return dev


def join_processes(device: str) -> None:
    """Under ``torchrun``: joins the process group on ``device`` (gloo on CPU, NCCL on CUDA);
    nothing in one process."""
    if launched():
        init(resolve_device(device))
