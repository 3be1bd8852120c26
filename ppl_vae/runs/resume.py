r"""Continuing a run: its checkpoint read once, the settings given checked once against it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from pathlib import Path

from ppl_vae.data import DataConfig
from ppl_vae.errors import InputError
from ppl_vae.runs.checkpoint import RunConfig, RunDir
from ppl_vae.selection import stops
from ppl_vae.svi import TrainConfig, TrainState, stopped_early
from ppl_vae.vae import VAEConfig

__all__ = ["CHANGEABLE", "ResumePoint", "check_resume"]

CHANGEABLE = (
    "epochs",
    "capture",
    "compile",
    "cuda_graphs",
    "patience",
)  # training settings a resumed run may change


def _differences(recorded, given, prefix: str = "") -> list[tuple[str, object, object]]:
    """(field path, recorded, given) for each field where two configurations differ."""
    out = []
    for f in dataclasses.fields(recorded):
        a, b = getattr(recorded, f.name), getattr(given, f.name)
        if dataclasses.is_dataclass(a):
            out += _differences(a, b, f"{prefix}{f.name}.")
        elif a != b:
            out.append((f"{prefix}{f.name}", a, b))
    return out


def _flag(cls: type, path: str) -> str:
    """The command-line flag of the field at ``path`` (``network.hidden``) of ``cls``."""
    head, _, rest = path.partition(".")
    if rest:  # a nested configuration (the network)
        return _flag(type(getattr(cls(), head)), rest)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    flags = fields[head].metadata.get("flags") if head in fields else None
    return flags[0] if flags else f"--{head.replace('_', '-')}"


def _changeable_reset(config: TrainConfig) -> TrainConfig:
    """``config`` with the settings a resumed run may change set alike (compared without)."""
    return replace(config, epochs=1, capture=True, compile=False, cuda_graphs=None, patience=None)


def check_resume(saved: RunConfig, config: RunConfig, metrics: list[dict], run_dir: Path) -> None:
    """An error naming the first setting of ``config`` that contradicts the run's own, or
    that leaves nothing to do (``metrics``: the finished epochs')."""
    finished = len(metrics)
    allowed = ", ".join(f"--{n}" for n in CHANGEABLE)
    for cls, a, b in (
        (DataConfig, replace(saved.data, data_dir=None), replace(config.data, data_dir=None)),
        (VAEConfig, saved.vae, config.vae),
        (TrainConfig, _changeable_reset(saved.train), _changeable_reset(config.train)),
    ):  # fmt: skip
        for path, recorded, given in _differences(a, b):
            flag = _flag(cls, path)
            given = ",".join(map(str, given)) if isinstance(given, tuple) else given
            raise InputError(
                f"{flag} {given} contradicts the run's recorded {path}={recorded}; --resume "
                f"continues the same run, where only {allowed}, --device, --quiet and "
                f"--plot-every may change: drop {flag}, or start a new run with --overwrite "
                f"or another --out"
            )
    if stops(metrics, config.train.patience):
        raise InputError(
            f"the run in {run_dir} stopped early: {stopped_early(metrics, config.train.patience)}; "
            f"pass a larger --patience to train on"
        )
    if config.train.epochs <= finished:
        raise InputError(
            f"the run in {run_dir} has finished {finished} epochs, so --epochs "
            f"{config.train.epochs} leaves nothing to do; pass a larger --epochs"
        )


def _overlay(config, values: dict):
    """``config`` with ``values`` (``{field: value or {nested field: value}}``) over it."""
    plain = {k: v for k, v in values.items() if not isinstance(v, dict)}
    nested = {k: _overlay(getattr(config, k), v) for k, v in values.items() if isinstance(v, dict)}
    return replace(config, **plain, **nested)


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run continues: the checkpoint's state, the configuration it continues
    with (the recorded one, with the epochs, the capture and the data folder given), and the
    identity of the checkpoint file that was read."""

    state: TrainState
    config: RunConfig
    stamp: tuple[int, int, int]

    @classmethod
    def read(cls, run_dir: RunDir, given: RunConfig | dict) -> ResumePoint:
        """Reads ``run_dir``'s checkpoint (once) and checks ``given`` against it (once).

        ``given`` is either whole configurations, as :func:`ppl_vae.runs.train_run` takes them,
        or only the settings a user gave, as ``{"data": {...}, "vae": {..., "network": {...}},
        "train": {...}}`` (the flags of ``ppl-vae train --resume``), laid over the record.
        """
        stamp = run_dir.stamp()
        state, saved = run_dir.load()
        if isinstance(given, RunConfig):
            config = given
        else:
            config = RunConfig(*(_overlay(getattr(saved, part), given.get(part, {}))
                                 for part in ("data", "vae", "train")))  # fmt: skip
        check_resume(saved, config, state.metrics, run_dir.path)
        data = replace(saved.data, data_dir=config.data.data_dir)
        return cls(state, RunConfig(data, saved.vae, config.train, saved.labelled), stamp)

    def check_unchanged(self, run_dir: RunDir) -> None:
        """Refuses to continue when another process replaced the checkpoint since it was read
        (called by the lock holder, so that the state continued is the one on disk)."""
        run_dir.check_unchanged(self.stamp)
