r"""A VAE run directory: its file names, the checkpoint format, ``config.json`` and metrics.

A run directory holds

- ``checkpoint.pt``: ``{"format": 1, "epoch", "params", "optimizer", "rng", "metrics",
  "config"}``, where ``config`` is ``{"data", "vae", "train"}`` as plain data
  (:func:`ppl_vae.config.to_dict`) and the random streams are tensors, written atomically
  after every epoch and read with ``torch.load(weights_only=True)``: a file that needs more
  (a pickle that would run code) is refused, never executed;
- ``config.json``: the same configurations, readable without torch;
- ``metrics.jsonl``: one JSON line per finished epoch;
- ``evaluate.json``, ``samples.png``, ``reconstructions.png``: written by
  :mod:`ppl_vae.runs.evaluate` and :mod:`ppl_vae.runs.pictures`.

Checkpoints written before the format had a number (format 0), and configurations stored with
old field names, are read through :mod:`ppl_vae.compat`.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ppl_vae.compat import NUMPY_GLOBALS, upgrade_config, upgrade_format0
from ppl_vae.config import from_dict, to_dict
from ppl_vae.data import DataConfig
from ppl_vae.errors import InputError, MissingInputError
from ppl_vae.runs.files import (
    folder_lock,
    make_output_dir,
    remove_stale_temporaries,
    save_torch,
    write_json,
    write_text,
)
from ppl_vae.svi import TrainConfig, TrainState
from ppl_vae.vae import VAEConfig

__all__ = ["CHECKPOINT", "CONFIG", "EVALUATE", "FORMAT", "METRICS", "RunConfig", "RunDir"]

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
EVALUATE = "evaluate.json"
FORMAT = 1  # the checkpoint layout written here


@dataclass(frozen=True)
class RunConfig:
    """The three configurations that define a VAE run."""

    data: DataConfig
    vae: VAEConfig
    train: TrainConfig

    def to_dict(self) -> dict:
        return {"data": to_dict(self.data), "vae": to_dict(self.vae), "train": to_dict(self.train)}

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        return cls(
            from_dict(DataConfig, d["data"]),
            from_dict(VAEConfig, d["vae"]),
            from_dict(TrainConfig, d["train"]),
        )


def _load_plain(path: Path) -> object:
    """``torch.load(weights_only=True)``: tensors and plain data only; nothing is executed."""
    try:
        with torch.serialization.safe_globals(NUMPY_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
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


class RunDir:
    """The files of one VAE run in the folder ``path``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    def has_checkpoint(self) -> bool:
        return self.checkpoint.is_file()

    def read_metrics(self) -> list[dict]:
        """The lines of ``metrics.jsonl`` (none if it is absent); a clear error if corrupt."""
        if not self.metrics.is_file():
            return []
        try:
            return [json.loads(line) for line in self.metrics.read_text().splitlines() if line]
        except (ValueError, UnicodeDecodeError):
            raise InputError(f"{self.metrics} is not one JSON object per line") from None

    def holds_run(self) -> bool:
        """Whether the folder already holds (part of) a run."""
        return any((self.path / name).exists() for name in (CHECKPOINT, CONFIG, METRICS))

    @contextmanager
    def writing(self) -> Iterator[RunDir]:
        """Holds the folder's lock (one writer at a time) and removes stale temporaries."""
        make_output_dir(self.path)
        with folder_lock(self.path):
            remove_stale_temporaries(self.path, (CHECKPOINT, CONFIG, METRICS))
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

    def save(self, state: TrainState, config: RunConfig | None = None) -> None:
        """Replaces the checkpoint, then ``metrics.jsonl`` (and, at a new run's first epoch,
        ``config.json`` and the old run's pictures and estimate); each write atomic."""
        record = {
            "format": FORMAT,
            "epoch": state.epoch,
            "params": state.params,
            "optimizer": state.optimizer,
            "rng": state.rng,
            "metrics": state.metrics,
            "config": config.to_dict() if config is not None else None,
            "untrained_elbo": state.untrained_elbo,
        }
        save_torch(record, self.checkpoint)
        if getattr(self, "_new", False):
            self._new = False
            if config is not None:
                write_json(config.to_dict(), self.path / CONFIG, indent=1)
            for stale in (EVALUATE, *(p.name for p in self.path.glob("*.png"))):
                (self.path / stale).unlink(missing_ok=True)
        write_text("".join(json.dumps(m) + "\n" for m in state.metrics), self.metrics)

    def state(self) -> TrainState:
        """The training state alone, for runs of your own model and guide."""
        return self._read()[0]

    def load(self) -> tuple[TrainState, RunConfig]:
        """The training state and configuration in the checkpoint; clear errors if unusable."""
        state, plain = self._read()
        if plain is None:
            raise InputError(
                f"{self.path} holds the state of a model that no configuration builds; "
                f"load it with RunDir(path).state() and your own model and guide"
            )
        return state, RunConfig.from_dict(plain)

    def _read(self) -> tuple[TrainState, dict | None]:
        path = self.checkpoint
        if not path.is_file():
            raise MissingInputError(f"no checkpoint at {path}; train a run there first")
        ckpt = _load_plain(path)
        if not isinstance(ckpt, dict) or not {"params", "epoch", "optimizer"} <= ckpt.keys():
            raise InputError(f"{path} is not a ppl_vae checkpoint; delete it and train again")
        version, rng = ckpt.get("format", 0), ckpt["rng"]
        if version == 0:
            upgraded = upgrade_format0(ckpt)
            if upgraded is None:
                raise InputError(
                    f"{self.path} was not written by ppl-vae train; no VAE configuration in it"
                )
            plain, rng = upgraded
        elif version == FORMAT:
            plain = ckpt["config"] and upgrade_config(ckpt["config"])
        else:
            raise InputError(
                f"{path} has checkpoint format {version}, newer than this ppl_vae reads "
                f"({FORMAT}); upgrade ppl_vae"
            )
        state = TrainState(
            ckpt["epoch"], ckpt["params"], ckpt["optimizer"], rng, list(ckpt["metrics"]),
            ckpt.get("untrained_elbo"),
        )  # fmt: skip
        return state, plain
