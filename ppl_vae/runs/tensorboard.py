r"""A training run's TensorBoard log (``ppl-vae train --tensorboard DIR``).

Steps are epochs. Per epoch, every number of the epoch's metrics (those of ``metrics.jsonl``):
the ELBOs as ``elbo/train``, ``elbo/validation`` and ``elbo/test``, and ``kl_weight``, ``lr``,
``grad_norm``, ``clipped`` and ``seconds`` under their own names. The run's pictures as images
named as their files (``samples``, ``curves``, ...), and at the end the configuration as
hparams (``data.dataset``, ``vae.guide``, ``train.lr``, ...) with the metrics
``hparams/test_elbo`` (the last epoch's) and, with ``--validation``,
``hparams/best_validation_elbo``.

The log is the user's folder, never part of a run: a folder inside the run's is refused, as is
one that holds a run or em's results. It needs the optional ``tensorboard`` package; without
it the flag is an :class:`~ppl_vae.errors.InputError` before anything is trained.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ppl_vae.errors import InputError
from ppl_vae.runs.checkpoint import RunConfig, held_by
from ppl_vae.runs.files import check_output_dir, make_output_dir

__all__ = ["Board", "check_board", "figure_image", "hparams_of", "tag"]

INSTALL = "pip install 'ppl_vae[tensorboard]'"


def _tensorboard():
    """``torch.utils.tensorboard``; an InputError naming the extra when tensorboard is missing."""
    try:
        return importlib.import_module("torch.utils.tensorboard")
    except ImportError:
        raise InputError(
            f"--tensorboard needs the optional tensorboard package; {INSTALL}"
        ) from None


def check_board(log_dir: str | os.PathLike, run_dir: str | os.PathLike) -> None:
    """Refuses ``log_dir`` before training: tensorboard missing, a folder inside the run's
    ``run_dir`` (whose files are all ppl_vae's), one holding a run or em's results, or one
    that cannot be created."""
    _tensorboard()
    log, run = Path(log_dir).resolve(), Path(run_dir).resolve()
    if log == run or run in log.parents:
        raise InputError(
            f"--tensorboard {log_dir} is inside the run folder {run_dir}, which holds the run's "
            f"files only; choose a folder outside it (e.g. {run.parent / 'tensorboard' / run.name})"
        )
    owner = held_by(log)
    if owner is not None:
        what = "a ppl_vae run" if owner == "run" else "the results of ppl-vae em"
        raise InputError(
            f"--tensorboard {log_dir} holds {what}; choose a folder of its own for the log"
        )
    check_output_dir(log)


def tag(key: str) -> str:
    """The scalar's name of a metrics key: ``test_elbo`` is ``elbo/test``, others keep theirs."""
    return f"elbo/{key.removesuffix('_elbo')}" if key.endswith("_elbo") else key


def figure_image(fig: Figure) -> np.ndarray:
    """The figure rendered (Agg, at its own dpi) as an ``(H, W, 3)`` uint8 array."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.array(canvas.buffer_rgba())[..., :3]


def hparams_of(config: RunConfig) -> dict[str, bool | int | float | str]:
    """The configuration flattened to ``section.field`` names and the values TensorBoard
    shows: numbers, strings and booleans as they are, anything else as JSON (``[16, 16]``)."""
    out = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, (bool, int, float, str)):
            out[prefix] = value
        else:
            out[prefix] = json.dumps(value)

    walk("", config.to_dict())
    return out


class Board:
    """One run's writer into ``log_dir``, opened on rank 0 once the run's inputs are checked.

    ``first_epoch`` is the first epoch this command trains: what was logged in ``log_dir``
    from that epoch on (by an earlier attempt, or another run) is hidden (TensorBoard's
    ``purge_step``), so that a resumed run follows on from its checkpoint. Closed by
    :meth:`close` or as a context manager, also when training fails.
    """

    def __init__(self, log_dir: str | os.PathLike, first_epoch: int):
        make_output_dir(log_dir)
        self.writer = _tensorboard().SummaryWriter(log_dir=str(log_dir), purge_step=first_epoch)

    def __enter__(self) -> Board:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def epoch(self, metrics: dict) -> None:
        """Every number of one epoch's metrics as a scalar at step ``metrics["epoch"]``."""
        step = metrics["epoch"]
        for key, value in metrics.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(tag(key), value, step)
        self.writer.flush()  # watchable while the next epoch trains

    def picture(self, name: str, fig: Figure, step: int) -> None:
        """A picture as the image ``name`` at ``step``."""
        self.writer.add_image(name, figure_image(fig), step, dataformats="HWC")

    def hparams(self, config: RunConfig, metrics: list[dict]) -> None:
        """The configuration with the last test ELBO (and the best validation ELBO), at the
        last epoch's step."""
        if not metrics:
            return
        step = metrics[-1]["epoch"]
        results = {"hparams/test_elbo": metrics[-1]["test_elbo"]}
        held = [m["validation_elbo"] for m in metrics if "validation_elbo" in m]
        if held:
            results["hparams/best_validation_elbo"] = max(held)
        for event in _tensorboard().summary.hparams(hparams_of(config), results):
            self.writer.file_writer.add_summary(event, step)
        for name, value in results.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
