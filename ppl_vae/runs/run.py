r"""A trained VAE with its data, configuration and metrics (:class:`Run`), and loading one."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import pyro

from ppl_vae.data import Data, DataConfig, data_fingerprint, load_data
from ppl_vae.guides import AmortizedGuide
from ppl_vae.model import VAEModel
from ppl_vae.runs.checkpoint import RunConfig, RunDir
from ppl_vae.runs.files import resolve_device
from ppl_vae.svi import TrainConfig, collect_params, restore_params
from ppl_vae.vae import VAEConfig, build_vae

__all__ = ["DataChangedWarning", "Run", "default_checkpoint", "load_run"]


class DataChangedWarning(UserWarning):
    """A run's data file changed since the run was trained on it."""


@dataclass
class Run:
    """A trained VAE with its data, configuration and metrics, and the folder it lives in."""

    model: VAEModel
    guide: AmortizedGuide
    data: Data
    config: RunConfig
    metrics: list[dict]
    directory: Path | None = None
    checkpoint: dict | None = None  # {"epoch", "sha256"} of the checkpoint the model comes from

    @property
    def data_config(self) -> DataConfig:
        return self.config.data

    @property
    def vae_config(self) -> VAEConfig:
        return self.config.vae

    @property
    def train_config(self) -> TrainConfig:
        return self.config.train


def default_checkpoint(run_dir: RunDir) -> str:
    """``"best"`` where the run keeps a usable ``best.pt``, else ``"last"``."""
    return "best" if run_dir.best_usable() else "last"


def load_run(
    run_dir: str | os.PathLike,
    device: str = "auto",
    data_dir: str | None = None,
    checkpoint: str | None = None,
) -> Run:
    """Rebuilds a trained VAE on ``device`` from ``run_dir/best.pt`` (``checkpoint="best"``,
    the epoch with the best validation or test ELBO) or ``run_dir/checkpoint.pt``
    (``"last"``); by default the best where the run keeps one.

    ``data_dir`` overrides the MNIST folder recorded at training time. The run's ``metrics``
    are every finished epoch's (those of ``checkpoint.pt``), whichever is loaded; its
    ``checkpoint`` says which epoch the model is.
    """
    run_dir = RunDir(run_dir)
    which = checkpoint or default_checkpoint(run_dir)
    state, config = run_dir.load(which)
    identity = run_dir.identity
    metrics = state.metrics if which == "last" else RunDir(run_dir.path).state().metrics
    if data_dir is not None:
        config = replace(config, data=replace(config.data, data_dir=data_dir))
    data = load_data(config.data, resolve_device(device))
    if run_dir.data_fingerprint not in (None, data_fingerprint(data)):
        warnings.warn(
            f"the data of {config.data.dataset} differ from those the run in {run_dir.path} was "
            f"trained on (their fingerprint changed); what is computed from them describes "
            f"other data",
            DataChangedWarning,
            stacklevel=2,
        )
    model, guide = build_vae(config.vae, data)
    pyro.clear_param_store()
    restore_params(collect_params(model, guide, data.encode(data.test[:2])), state.params)
    return Run(model, guide, data, config, metrics, run_dir.path, identity)
