r"""A command's JSON record of a run (``evaluate.json``, ``gaps.json``): where it goes, the
folder checked and locked before the work, and the record written with its line in
``written.json``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from ppl_vae.distributed import on_rank0_for_all
from ppl_vae.errors import InputError, WriteError
from ppl_vae.runs.checkpoint import RunDir, held_by
from ppl_vae.runs.files import RESERVED, check_output_dir, make_output_dir, staged
from ppl_vae.runs.pictures import warn_stale
from ppl_vae.runs.run import Run

__all__ = ["guarded", "record_target", "write_record"]


def record_target(run: Run, out: str | os.PathLike | None, name: str, what: str) -> Path:
    """Where the record ``name`` goes: ``out`` (a file, or a folder for ``name``), else the
    run's folder; a folder that holds another run or em's results is refused. ``what`` names
    the record in messages ("the estimate")."""
    if out is None:
        if run.directory is None:
            raise InputError("this run has no folder; pass out=FILE, or write=False")
        return run.directory / name
    path = Path(out)
    if path.is_dir() or str(out).endswith(os.sep):
        path = path / name
    if path.suffix != ".json" or path.name in RESERVED:
        raise InputError(
            f"--out {out}: {what} is a JSON file; name a .json file other than "
            f"{', '.join(RESERVED[1:4])}, or a folder"
        )
    owner = held_by(path.parent, own_run=run.directory)
    if owner == "em":
        raise InputError(
            f"{path.parent} holds the results of ppl-vae em; write {what} into its run, "
            f"or a folder of its own"
        )
    if owner == "run":
        raise InputError(
            f"{path.parent} holds another ppl_vae run, whose {what} --out would replace; "
            f"write {what} into its own run, or elsewhere"
        )
    return path


@contextlib.contextmanager
def guarded(run: Run, target: Path | None, stamp: tuple[int, ...] | None) -> Iterator[None]:
    """Checks ``target``'s folder on rank 0 (every rank learns of a refusal) before the work
    inside; writing into the run's own folder holds its lock for readers throughout and refuses
    a checkpoint replaced since ``stamp``, so a record never lands in a run that another process
    is training or replacing. Afterwards, warns of the run's outputs from another checkpoint."""
    into_run = (
        target is not None
        and run.directory is not None
        and target.parent.resolve() == run.directory.resolve()
    )
    with contextlib.ExitStack() as stack:

        def check() -> None:
            if target is None:
                return
            check_output_dir(target.parent)
            RunDir(target.parent).outputs.check_replaceable([target.name])
            if into_run:
                stack.enter_context(RunDir(run.directory).writing(shared=True))
                if stamp is not None:
                    RunDir(run.directory).check_unchanged(stamp)

        on_rank0_for_all(check)
        yield
    if into_run:
        warn_stale(RunDir(run.directory), run.checkpoint)


def write_record(record: dict, target: Path, run: Run, *, reported: bool, what: str) -> None:
    """``record`` to ``target`` with its line in the folder's ``written.json``, both or none;
    when the record was ``reported`` (printed), a failed write says so."""
    try:
        make_output_dir(target.parent)
        with staged() as files:
            files.write_json(record, target)
            shows = {"run": str(run.directory.resolve()), **(run.checkpoint or {})}
            RunDir(target.parent).outputs.stage(files, {target.name: shows})
    except WriteError as e:
        if not reported:
            raise
        raise WriteError(
            f"{e}; {what} is printed above: save it with --out FILE elsewhere"
        ) from None
