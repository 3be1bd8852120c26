r"""Files on disk: atomic writes under unique temporary names, output folders, the device."""

from __future__ import annotations

import fcntl
import glob
import hashlib
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
    "RECORD",
    "RESERVED",
    "Outputs",
    "folder_lock",
    "make_output_dir",
    "remove_stale_temporaries",
    "resolve_device",
    "save_figure",
    "save_torch",
    "staged",
    "Staged",
    "write_json",
    "write_text",
]


def _write_temporary(path: Path, write: Callable[[object], None], mode: str) -> Path:
    """Writes through ``write(file)`` to a new temporary file beside ``path``; returns its name.

    The temporary name is unique (``tempfile.mkstemp``), so two writers never share one; it is
    removed if anything fails (a signal included), and gets the usual permissions (umask).
    """
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
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise _write_error(path, e) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _replace_atomic(path: Path, write: Callable[[object], None], mode: str) -> None:
    """Writes through ``write(file)`` to a temporary file beside ``path``, then renames it over
    ``path``. A full or read-only disk is a one-line :class:`WriteError` naming the file; the
    previous file is then intact."""
    path = Path(path)
    tmp = _write_temporary(path, write, mode)
    try:
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _write_error(path, e) from None
        raise


class Staged:
    """Files written to temporaries first and renamed over their targets together by
    :meth:`commit`: a failure or an interruption before it leaves every target as it was.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> with staged() as files:
        ...     _ = files.write_text("a", folder / "a.txt")
        ...     _ = files.write_text("b", folder / "b.txt")
        ...     sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
        []
        >>> sorted(p.name for p in folder.iterdir())
        ['a.txt', 'b.txt']
    """

    def __init__(self):
        self._pending: list[tuple[Path, Path]] = []  # (temporary, target)

    @property
    def names(self) -> list[str]:
        """The names of the files staged so far."""
        return [target.name for _, target in self._pending]

    def write(self, path: str | os.PathLike, write: Callable[[object], None], mode: str) -> Path:
        path = Path(path)
        self._pending.append((_write_temporary(path, write, mode), path))
        return path

    def write_text(self, text: str, path: str | os.PathLike) -> Path:
        return self.write(path, lambda f: f.write(text), "w")

    def write_json(self, record: object, path: str | os.PathLike, indent: int | None = None):
        return self.write_text(json.dumps(record, indent=indent) + "\n", path)

    def save_figure(self, fig, path: str | os.PathLike, description: str = "") -> Path:
        """Stages a matplotlib figure as PNG (``description`` goes into its metadata)."""
        meta = {"Description": description} if description else None
        try:
            return self.write(path, lambda f: _savefig(fig, f, meta), "wb")
        finally:
            close_figure(fig)

    def commit(self) -> None:
        """Renames every staged file over its target, in the order they were staged."""
        pending, self._pending = self._pending, []
        for i, (tmp, path) in enumerate(pending):
            try:
                os.replace(tmp, path)
            except OSError as e:
                for later, _ in pending[i:]:
                    later.unlink(missing_ok=True)
                done = ", ".join(p.name for _, p in pending[:i]) or "nothing"
                raise WriteError(f"cannot write {path}: {e.strerror or e}; wrote {done}") from None

    def discard(self) -> None:
        """Removes the staged temporaries; no target is touched."""
        for tmp, _ in self._pending:
            tmp.unlink(missing_ok=True)
        self._pending = []


@contextmanager
def staged() -> Iterator[Staged]:
    """A :class:`Staged` set of writes, committed when the block ends without an exception
    and discarded otherwise (an interruption included)."""
    files = Staged()
    try:
        yield files
    except BaseException:
        files.discard()
        raise
    files.commit()


def _savefig(fig, f, metadata: dict | None = None) -> None:
    fig.savefig(f, format="png", dpi=120, bbox_inches="tight", metadata=metadata)


def _write_error(path: Path, e: OSError) -> WriteError:
    kept = f"the previous {path.name} is intact" if path.exists() else "nothing was written"
    return WriteError(f"cannot write {path}: {e.strerror or e}; {kept}")


def remove_stale_temporaries(folder: Path, names: tuple[str, ...] | list[str]) -> None:
    """Removes temporary files of ``names`` left by writers that died (kill -9, power loss).

    Call it only while holding the folder's lock, when no other writer of those names lives.
    """
    for name in names:
        for tmp in folder.glob(f".{glob.escape(name)}.*.tmp"):
            tmp.unlink(missing_ok=True)


@contextmanager
def folder_lock(folder: Path, shared: bool = False) -> Iterator[None]:
    """An advisory ``fcntl`` lock on ``folder/.lock``: one writer at a time, or (``shared``)
    any number of readers that write into the folder, but no writer meanwhile.

    The operating system releases it when the holder exits, however it dies. A refused process
    gets a one-line error naming the writer's pid, or saying that readers hold the folder.
    """
    path = folder / ".lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _lock_error(fd, folder, shared) from None
        if not shared:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _lock_error(fd: int, folder: Path, shared: bool) -> InputError:
    """Why the lock on ``folder`` was refused: a writer holds it (its pid), or readers do."""
    if not shared:
        probe = os.open(folder / ".lock", os.O_RDONLY)
        try:  # only readers hold it when a shared lock is still granted
            fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return InputError(
                f"another ppl-vae process (evaluate or plot) is reading {folder}; wait for it to "
                f"finish or choose another --out"
            )
        except BlockingIOError:
            pass
        finally:
            os.close(probe)
    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    if shared:
        return InputError(
            f"another ppl-vae process (pid {holder}) is writing to {folder}; wait for it to "
            f"finish, or pass --out DIR to write elsewhere"
        )
    return InputError(
        f"another ppl-vae process (pid {holder}) is writing to {folder}; wait for it to "
        f"finish or choose another --out"
    )


RECORD = "written.json"  # in an output folder: the files ppl_vae wrote there, and what each shows
# names an output record never lists: the run's own files, the record itself, the lock
RESERVED = ("checkpoint.pt", "config.json", "metrics.jsonl", RECORD, ".lock")


def _listable(name: object) -> bool:
    """Whether ``name`` may be listed in a record: a plain file name, not a reserved one."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..", *RESERVED)
        and "/" not in name
        and os.sep not in name
        and "\0" not in name
    )


class Outputs:
    """The record of the files ppl_vae wrote into a folder (``written.json``), each with what it
    describes (``{"epoch": ..., "checkpoint": ...}`` for a run's pictures and estimate).

    The run layer replaces or removes only files named here; a file of the same name that it did
    not write is refused with a message. Folders written before the record existed count the
    ``legacy`` names that are present as written by ppl_vae.
    """

    def __init__(self, folder: str | os.PathLike, legacy: tuple[str, ...] = ()):
        self.folder, self.legacy = Path(folder), legacy

    @property
    def path(self) -> Path:
        return self.folder / RECORD

    def read(self) -> dict[str, dict]:
        """``{file name: what it describes}``; a clear error if the record is damaged."""
        if not self.path.is_file():
            return {name: {} for name in self.legacy if (self.folder / name).is_file()}
        try:
            record = json.loads(self.path.read_text())
        except (ValueError, UnicodeDecodeError):
            record = None
        ok = isinstance(record, dict) and all(
            _listable(k) and isinstance(v, dict) for k, v in record.items()
        )
        if not ok:
            raise InputError(
                f"{self.path} (the list of files ppl_vae wrote there) is damaged; delete it, and "
                f"the files it listed that you do not want kept"
            )
        return record

    def check_replaceable(self, names: list[str] | tuple[str, ...]) -> None:
        """An error naming the first of ``names`` present in the folder but not written by
        ppl_vae: it is the user's, and is never replaced."""
        written = self.read()
        for name in names:
            if (self.folder / name).exists() and name not in written:
                raise InputError(
                    f"{self.folder / name} was not written by ppl_vae and would be replaced; "
                    f"move it, or choose another --out"
                )

    def stage(self, files: Staged, entries: dict[str, dict]) -> None:
        """Stages the record with ``entries`` added (with ``files``' other writes)."""
        files.write_json({**self.read(), **entries}, self.path, indent=1)

    def remove_written(self) -> list[str]:
        """Removes every file of the record (never a reserved name: the record is checked),
        then the record; returns their names."""
        names = [name for name in self.read() if _listable(name)]
        for name in names:
            (self.folder / name).unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)
        return names


def save_torch(obj: object, path: str | os.PathLike) -> str:
    """``torch.save`` to a temporary file beside ``path``, then rename over it; returns the
    SHA-256 of the bytes written (hex).

    The bytes are made in memory first, so that a full disk is an ``OSError`` of the write
    (torch's own writer reports it as a bare ``RuntimeError``).
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    _replace_atomic(Path(path), lambda f: f.write(buffer.getbuffer()), "wb")
    return hashlib.sha256(buffer.getbuffer()).hexdigest()


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
        _replace_atomic(path, lambda f: _savefig(fig, f), "wb")
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
