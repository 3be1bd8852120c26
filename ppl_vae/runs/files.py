r"""Files on disk: atomic writes under unique temporary names, output folders, the device."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from ppl_vae.errors import InputError
from ppl_vae.plots import close_figure

__all__ = [
    "make_output_dir",
    "resolve_device",
    "save_figure",
    "save_torch",
    "write_json",
    "write_text",
]


def _replace_atomic(path: Path, write: Callable[[object], None], mode: str) -> None:
    """Writes through ``write(file)`` to a new temporary file beside ``path``, then renames it.

    The temporary name is unique (``tempfile.mkstemp``), so two writers never share one; it is
    removed if anything fails, and the result gets the usual permissions (umask).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_torch(obj: object, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename over it."""
    _replace_atomic(Path(path), lambda f: torch.save(obj, f), "wb")


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
