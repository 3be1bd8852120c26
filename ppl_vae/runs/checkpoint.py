r"""A VAE run directory: its file names, the checkpoint format, ``config.json`` and metrics.

A run directory holds

- ``checkpoint.pt``: ``{"format": 1, "epoch", "params", "optimizer", "rng", "metrics",
  "config"}``, where ``config`` is ``{"data", "vae", "train"}`` as plain data
  (:func:`ppl_vae.config.to_dict`) and the random streams are tensors, written atomically
  after every epoch and read with ``torch.load(weights_only=True)``: a file that needs more
  (a pickle that would run code) is refused, never executed;
- ``best.pt``: the same record for the epoch with the best validation ELBO (the test ELBO
  without a validation set, :mod:`ppl_vae.selection`), replaced after ``checkpoint.pt`` when
  an epoch improves on it; it is used only while its metrics are the first epochs of
  ``checkpoint.pt``'s (a kill between the two writes of a replaced run cannot pair a run with
  another's best);
- ``config.json``: the same configurations, readable without torch;
- ``metrics.jsonl``: one JSON line per finished epoch;
- ``evaluate.json`` and the pictures (``curves.png``, ...): written by
  :mod:`ppl_vae.runs.evaluate` and :mod:`ppl_vae.runs.pictures`;
- ``written.json``: the files above besides the first three, each with the checkpoint (epoch
  and SHA-256) it describes (:class:`ppl_vae.runs.files.Outputs`). Replacing a run removes
  only those; nothing else in the folder is ever touched.

Checkpoints written before the format had a number (format 0), and configurations stored with
old field names, are read through :mod:`ppl_vae.compat`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ppl_vae.compat import LEGACY_RUN_OUTPUTS, NUMPY_GLOBALS, upgrade_config, upgrade_format0
from ppl_vae.config import from_dict, to_dict
from ppl_vae.data import DataConfig
from ppl_vae.errors import InputError, MissingInputError
from ppl_vae.runs.files import (
    RECORD,
    Outputs,
    folder_lock,
    make_output_dir,
    save_torch,
    write_json,
    write_text,
)
from ppl_vae.runs.validate import check_checkpoint, check_metrics
from ppl_vae.svi import TrainConfig, TrainState
from ppl_vae.vae import VAEConfig

__all__ = [
    "BEST",
    "CHECKPOINT",
    "CHECKPOINTS",
    "CONFIG",
    "EM_RESULTS",
    "EVALUATE",
    "FORMAT",
    "GAPS",
    "MARKERS",
    "METRICS",
    "RunConfig",
    "RunDir",
    "held_by",
]

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
CHECKPOINTS = ("best", "last")  # which checkpoint evaluate and plot read (--checkpoint)
CONFIG = "config.json"
METRICS = "metrics.jsonl"
EVALUATE = "evaluate.json"
GAPS = "gaps.json"  # ppl-vae gaps's record
FORMAT = 2  # the checkpoint layout written here
# guides whose parameters mean something else since format 2 (same names for iaf: the gated
# step became z' = exp(s) z + m; fullrank: L = diag(sigma)(I + M) from two heads; lowrank: the
# factor relative to sigma); a run of these written before is refused rather than read as
# another distribution
RELAID_OUT = {
    "iaf": "the gated IAF step",
    "fullrank": "one head predicting L's entries",
    "lowrank": "a covariance factor in the data's units",
}
MARKERS = (CHECKPOINT, CONFIG, METRICS, BEST)  # a folder holding any of these holds a run
EM_RESULTS = "results.json"  # ppl-vae em's record: a folder holding it holds em's results


@dataclass(frozen=True)
class RunConfig:
    """The three configurations that define a VAE run."""

    data: DataConfig
    vae: VAEConfig
    train: TrainConfig
    # --model m2: the indices of the labelled training points, drawn by a new run (from
    # --labeled and --seed) and recorded in config.json, so that a resumed run takes them again
    labelled: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.vae.model == "two-layer" and self.train.loss == "meanfield":
            raise InputError(
                "--model two-layer needs --loss elbo or iwae: its guide draws z2 given z1, so "
                "the mean-field loss's closed-form KL of z1 (at a z2 drawn from that z1) is biased"
            )
        t = self.train
        if self.vae.model == "m2":
            wrong = [
                (t.loss != "meanfield", "--loss", "its loss is M2's (ppl_vae.m2.M2Loss)"),
                (t.num_particles != 1, "--num-particles", "M2's loss draws one z per point"),
                (t.beta != 1.0 or t.kl_warmup != 0 or t.kl_delay != 0,
                 "--beta/--kl-warmup/--kl-delay", "M2's loss weights no KL term"),
            ]  # fmt: skip
            for bad, flag, why in wrong:
                if bad:
                    raise InputError(f"--model m2 takes no {flag}: {why}")

    def to_dict(self) -> dict:
        out = {"data": to_dict(self.data), "vae": to_dict(self.vae), "train": to_dict(self.train)}
        return out if self.labelled is None else {**out, "labelled": list(self.labelled)}

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        labelled = d.get("labelled")
        if labelled is not None and (
            not isinstance(labelled, list)
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in labelled)
        ):
            raise InputError(
                f"the recorded labelled points must be a list of indices, got {labelled!r}"
            )
        return cls(
            from_dict(DataConfig, d["data"]),
            from_dict(VAEConfig, d["vae"]),
            from_dict(TrainConfig, d["train"]),
            None if labelled is None else tuple(labelled),
        )


def _load_plain(data: bytes, path: Path) -> object:
    """``torch.load(weights_only=True)`` of a checkpoint's bytes: tensors and plain data only;
    nothing is executed."""
    try:
        with torch.serialization.safe_globals(NUMPY_GLOBALS):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise InputError(
                f"{path} holds objects other than tensors and plain data, which loading would "
                f"execute; it was not loaded. Only load checkpoints from a source you trust"
            ) from None
        raise InputError(f"checkpoint {path} is unreadable or corrupt; delete it") from None
    except Exception as e:
        raise InputError(
            f"checkpoint {path} is unreadable or corrupt ({type(e).__name__}); "
            f"delete it and train again"
        ) from None


def _temporary_of_ours(name: str) -> bool:
    """Whether ``name`` is a temporary file (``.NAME.XXXXXXXX.tmp``) of a file we write."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return False
    base = name[1:].rsplit(".", 2)[0]
    return base in (*MARKERS, RECORD, EVALUATE, GAPS) or base.endswith(".png")


def held_by(folder: str | os.PathLike, own_run: str | os.PathLike | None = None) -> str | None:
    """Which command's files ``folder`` holds, when they are not ours to write over:
    ``"run"`` (a VAE run, other than ``own_run``), ``"em"`` (em's results) or ``None``."""
    folder = Path(folder)
    own = own_run is not None and folder.resolve() == Path(own_run).resolve()
    if RunDir(folder).holds_run() and not own:
        return "run"
    return "em" if (folder / EM_RESULTS).is_file() else None


class RunDir:
    """The files of one VAE run in the folder ``path``.

    ``identity`` is ``{"epoch", "sha256"}`` of the checkpoint last read or written here: what
    the pictures and the estimate record that they describe. ``data_fingerprint`` is that of
    the data the run was trained on (:func:`ppl_vae.data.data_fingerprint`), recorded in the
    checkpoint, so that a changed data file is refused at ``--resume`` and flagged later.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.identity: dict | None = None
        self.data_fingerprint: str | None = None  # of the data the run trains on (data.py)

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def outputs(self) -> Outputs:
        """The record of the pictures and estimate written into the run."""
        return Outputs(self.path, LEGACY_RUN_OUTPUTS if self.holds_run() else ())

    @property
    def best(self) -> Path:
        return self.path / BEST

    def has_checkpoint(self) -> bool:
        return self.checkpoint.is_file()

    def stamp(self) -> tuple[int, ...]:
        """The identity of the checkpoint files' current versions (they are replaced by
        renames, so a new version is a new inode): to tell whether they changed since read."""
        out = ()
        for path in (self.checkpoint, self.best):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                out += (0, 0, 0)
            else:
                out += (st.st_ino, st.st_size, st.st_mtime_ns)
        return out

    def check_unchanged(self, stamp: tuple[int, ...]) -> None:
        """Refuses to go on when another process replaced a checkpoint since ``stamp``."""
        if self.stamp() != stamp:
            raise InputError(
                f"the checkpoint in {self.path} changed while this command read it (another "
                f"process wrote to the run); run the command again"
            )

    def read_metrics(self) -> list[dict]:
        """The records of ``metrics.jsonl`` (none if it is absent); a clear error if damaged."""
        if not self.metrics.is_file():
            return []
        try:
            text = self.metrics.read_text().splitlines()
            lines = [json.loads(line) for line in text if line.strip()]
        except (ValueError, UnicodeDecodeError):
            raise InputError(
                f"{self.metrics} is not one JSON object per line; delete it (the checkpoint "
                f"holds the same records and rewrites it at the next --resume)"
            ) from None
        return check_metrics(lines, self.metrics)

    def holds_run(self) -> bool:
        """Whether the folder already holds (part of) a run."""
        return any((self.path / name).exists() for name in MARKERS)

    def foreign(self) -> list[str]:
        """The names in the folder that ppl_vae did not write there (the user's files)."""
        if not self.path.is_dir():
            return []
        ours = {".lock"}  # a folder without a run owns nothing else (written.json is em's, ...)
        if self.holds_run():
            ours |= {*MARKERS, RECORD, *self.outputs.read()}
        names = (p.name for p in self.path.iterdir())
        return sorted(n for n in names if n not in ours and not _temporary_of_ours(n))

    def check_can_hold_run(self, overwrite: bool) -> None:
        """Refuses to train into a folder that holds a run (unless ``overwrite``: the run's own
        files are replaced, others stay) or, holding no run, anything at all: a folder of the
        user's own files is never made into a run."""
        if self.holds_run():
            if overwrite:
                return
            raise InputError(
                f"{self.path} holds a run already; pass --resume to continue it, "
                f"--overwrite to replace it, or choose another --out"
            )
        foreign = self.foreign()
        if foreign:
            shown = ", ".join(foreign[:3]) + (
                f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
            )
            raise InputError(
                f"{self.path} holds files that are not a ppl_vae run ({shown}); train into an "
                f"empty or new folder (--out)"
            )

    @contextmanager
    def writing(self, shared: bool = False) -> Iterator[RunDir]:
        """Holds the folder's lock, exclusive for a writer of the run or ``shared`` for a reader
        that writes its own files into it (evaluate, plot); a writer also removes the
        temporary files that writers killed earlier left behind."""
        make_output_dir(self.path)
        with folder_lock(self.path, shared=shared):
            if not shared:
                for name in os.listdir(self.path):
                    if _temporary_of_ours(name):
                        (self.path / name).unlink(missing_ok=True)
            yield self

    def start(self, config: RunConfig | None, history: list[dict]) -> None:
        """Prepares the writes of a run: a new one, or ``history`` continued.

        A new run writes nothing until its first checkpoint, so a run it replaces stays intact
        until then. A continued run gets a ``metrics.jsonl`` that matches its checkpoint (a
        kill between the two writes of an epoch leaves ``metrics.jsonl`` one line short, never
        ahead). ``config`` is ``None`` for a model and guide that no configuration builds (your
        own Pyro functions): the checkpoint then holds the state alone.
        """
        make_output_dir(self.path)
        self._new = not history
        if history:
            write_text("".join(json.dumps(m) + "\n" for m in history), self.metrics)

    def save(
        self, state: TrainState, config: RunConfig | None = None, *, best: bool = False
    ) -> None:
        """Replaces the checkpoint, then, if ``best``, ``best.pt``, then ``metrics.jsonl``
        (and, at a new run's first epoch, ``config.json``, removing the pictures and estimate
        the replaced run recorded as written); each write atomic."""
        record = {
            "format": FORMAT,
            "epoch": state.epoch,
            "params": state.params,
            "optimizer": state.optimizer,
            "rng": state.rng,
            "metrics": state.metrics,
            "config": config.to_dict() if config is not None else None,
            "untrained_elbo": state.untrained_elbo,
            "data_fingerprint": self.data_fingerprint,
        }
        digest = save_torch(record, self.checkpoint)
        self.identity = {"epoch": state.epoch, "sha256": digest}
        if best:
            save_torch(record, self.best)
        if getattr(self, "_new", False):
            self._new = False
            if config is not None:
                write_json(config.to_dict(), self.path / CONFIG, indent=1)
            self.outputs.remove_written()
        write_text("".join(json.dumps(m) + "\n" for m in state.metrics), self.metrics)

    def state(self) -> TrainState:
        """The training state alone, for runs of your own model and guide."""
        return self._read(self.checkpoint)[0]

    def best_usable(self) -> bool:
        """Whether ``best.pt`` is there and belongs to the run: the model configuration and
        the parameters' names and shapes of ``checkpoint.pt``, whose first epochs' metrics
        are its own. (A damaged ``checkpoint.pt`` is an error here.)"""
        if not (self.best.is_file() and self.has_checkpoint()):
            return False
        last, last_config = RunDir(self.path)._read(self.checkpoint)
        try:
            best, best_config = RunDir(self.path)._read(self.best)
        except InputError:
            return False  # a damaged best.pt is not used; checkpoint.pt still is

        def shapes(state: TrainState) -> dict:
            return {k: tuple(v.shape) for k, v in state.params.items()}

        def model(config: object) -> object:  # the rest may change on --resume
            return config.get("vae") if isinstance(config, dict) else None

        return (
            model(best_config) == model(last_config) is not None
            and shapes(best) == shapes(last)
            and best.metrics == last.metrics[: best.epoch]
        )

    def load(self, which: str = "last") -> tuple[TrainState, RunConfig]:
        """The training state and configuration in the checkpoint (``which``: ``"last"``,
        ``checkpoint.pt``, or ``"best"``, ``best.pt``); clear errors if unusable."""
        if which not in CHECKPOINTS:
            raise InputError(f"unknown checkpoint {which!r}; choose best or last")
        if which == "best" and not self.best_usable():
            why = (
                "has no best.pt (runs trained before ppl_vae kept one have none)"
                if not self.best.is_file()
                else "has a best.pt of another run (its metrics are not checkpoint.pt's)"
            )
            raise MissingInputError(f"{self.path} {why}; pass --checkpoint last")
        state, plain = self._read(self.best if which == "best" else self.checkpoint)
        if plain is None:
            raise InputError(
                f"{self.path} holds the state of a model that no configuration builds; "
                f"load it with RunDir(path).state() and your own model and guide"
            )
        if not isinstance(plain, dict) or not {"data", "vae", "train"} <= plain.keys():
            raise InputError(
                f"{self.checkpoint} is damaged: its configuration lacks the data, model or "
                f"training settings; delete it and train again, or restore the file from a copy"
            )
        return state, RunConfig.from_dict(plain)

    def _read(self, path: Path) -> tuple[TrainState, dict | None]:
        if not path.is_file():
            raise MissingInputError(f"no checkpoint at {path}; train a run there first")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise InputError(f"cannot read {path}: {e.strerror or e}") from None
        ckpt = _load_plain(data, path)
        if not isinstance(ckpt, dict) or not {"params", "epoch", "optimizer"} <= ckpt.keys():
            raise InputError(f"{path} is not a ppl_vae checkpoint; delete it and train again")
        version = ckpt.get("format", 0)
        if version == 0:
            upgraded = upgrade_format0(ckpt)
            if upgraded is None:
                raise InputError(
                    f"{self.path} was not written by ppl-vae train; no VAE configuration in it"
                )
            plain, rng = upgraded
            ckpt = {**ckpt, "rng": rng}
        elif version in (1, FORMAT):  # format 1: format 2's layout, but see RELAID_OUT
            plain = ckpt.get("config")
            plain = upgrade_config(plain) if isinstance(plain, dict) else plain
        else:
            raise InputError(
                f"{path} has checkpoint format {version}, newer than this ppl_vae reads "
                f"({FORMAT}); upgrade ppl_vae"
            )
        vae = plain.get("vae") if isinstance(plain, dict) else None
        guide = vae.get("guide") if isinstance(vae, dict) else None
        if version < FORMAT and guide in RELAID_OUT:
            raise InputError(
                f"{path} holds a {guide} guide of an earlier ppl_vae ({RELAID_OUT[guide]}), whose "
                f"parameters this version reads differently; train the run again"
            )
        check_checkpoint(ckpt, path)
        self.identity = {"epoch": ckpt["epoch"], "sha256": hashlib.sha256(data).hexdigest()}
        fingerprint = ckpt.get("data_fingerprint")
        self.data_fingerprint = fingerprint if isinstance(fingerprint, str) else None
        state = TrainState(
            ckpt["epoch"], ckpt["params"], ckpt["optimizer"], ckpt["rng"], list(ckpt["metrics"]),
            ckpt.get("untrained_elbo"),
        )  # fmt: skip
        return state, plain
