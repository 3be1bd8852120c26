r"""VAE runs on disk: train into a run directory, load one back, evaluate its log p(x)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pyro
import torch

from ppl_vae.config import check_positive, option
from ppl_vae.data import Data, DataConfig, load_data
from ppl_vae.errors import InputError
from ppl_vae.guides import AmortizedGuide
from ppl_vae.importance import log_likelihood
from ppl_vae.model import VAEModel
from ppl_vae.plots import reconstructions_figure, samples_figure
from ppl_vae.rng import forked_rng
from ppl_vae.runs.checkpoint import EVALUATE, RunConfig, RunDir
from ppl_vae.runs.files import resolve_device, save_figure, write_json
from ppl_vae.svi import TrainConfig, TrainState, collect_params, restore_params, train
from ppl_vae.vae import VAEConfig, build_vae

__all__ = [
    "PICTURES",
    "EvaluateConfig",
    "Run",
    "evaluate_run",
    "load_run",
    "train_run",
    "write_pictures",
]

PICTURES = ("samples.png", "reconstructions.png")
DEFAULT_IWAE_KS = (1, 10, 100)


@dataclass
class Run:
    """A trained VAE with its data, configuration and metrics, and the folder it lives in."""

    model: VAEModel
    guide: AmortizedGuide
    data: Data
    config: RunConfig
    metrics: list[dict]
    directory: Path | None = None

    @property
    def data_config(self) -> DataConfig:
        return self.config.data

    @property
    def vae_config(self) -> VAEConfig:
        return self.config.vae

    @property
    def train_config(self) -> TrainConfig:
        return self.config.train


def write_pictures(run: Run, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Draws ``samples.png`` and ``reconstructions.png`` into ``out_dir`` (the run's folder)."""
    out = Path(out_dir) if out_dir is not None else run.directory
    figures = (
        samples_figure(run.model, run.data),
        reconstructions_figure(run.model, run.guide, run.data),
    )
    return [save_figure(fig, out / name) for fig, name in zip(figures, PICTURES, strict=True)]


def train_run(
    data_config: DataConfig,
    vae_config: VAEConfig,
    train_config: TrainConfig,
    out_dir: str | os.PathLike,
    device: str = "auto",
    resume: bool = False,
    quiet: bool = False,
    pictures: bool = True,
) -> Run:
    """Loads data, builds the VAE and trains it, with metrics and checkpoints in ``out_dir``.

    With ``resume``, the data and VAE configuration come from the checkpoint, so only the
    training settings (e.g. more epochs) can change. With ``pictures``, ``samples.png`` and
    ``reconstructions.png`` are drawn at the end.
    """
    run_dir = RunDir(out_dir)
    state = None
    if resume:
        state, saved = run_dir.load()
        data_config, vae_config = saved.data, saved.vae
    config = RunConfig(data_config, vae_config, train_config)
    dev = resolve_device(device)
    data = load_data(data_config, dev)
    pyro.set_rng_seed(train_config.seed)
    model, guide = build_vae(vae_config, data)
    run_dir.start(config, state.metrics if state is not None else [])  # inputs all checked
    saved_epoch = state.epoch if state is not None else 0

    def checkpoint(s: TrainState) -> None:
        nonlocal saved_epoch
        run_dir.save(s, config)
        saved_epoch = s.epoch

    try:
        metrics = train(
            model, guide, data, train_config,
            resume_from=state, checkpoint=checkpoint, quiet=quiet,
        )  # fmt: skip
    except FloatingPointError as e:
        kept = (
            f"the last good checkpoint (epoch {saved_epoch}) is kept in {run_dir.path}"
            if saved_epoch
            else "no epoch finished, so no checkpoint was written"
        )
        raise FloatingPointError(f"{e}; {kept}") from None
    run = Run(model, guide, data, config, metrics, run_dir.path)
    if pictures:
        write_pictures(run)
    return run


def load_run(run_dir: str | os.PathLike, device: str = "auto", data_dir: str | None = None) -> Run:
    """Rebuilds a trained VAE from ``run_dir/checkpoint.pt`` on ``device``.

    ``data_dir`` overrides the MNIST folder recorded at training time.
    """
    run_dir = RunDir(run_dir)
    state, config = run_dir.load()
    if data_dir is not None:
        config = replace(config, data=replace(config.data, data_dir=data_dir))
    data = load_data(config.data, resolve_device(device))
    model, guide = build_vae(config.vae, data)
    pyro.clear_param_store()
    restore_params(collect_params(model, guide, data.encode(data.test[:2])), state.params)
    return Run(model, guide, data, config, state.metrics, run_dir.path)


def _iwae_ks(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise InputError(f"expected comma-separated integers like 1,10,100, got {text!r}") from None


@dataclass(frozen=True)
class EvaluateConfig:
    """How to estimate log p(x) of a trained run by importance sampling."""

    split: str = option("test", "the split to evaluate", choices=("test", "train"))
    num_samples: int = option(5000, "K, importance samples per point")
    chunk_size: int | None = option(
        None, "draws per vectorized pass (default about 100,000 / --batch-size); peak memory "
        "grows with chunk size x batch size, not with K",
    )  # fmt: skip
    batch_size: int = option(100, "data points per pass")
    iwae_k: tuple[int, ...] | None = option(
        None, "k of the IWAE bounds reported from the same draws, each <= K "
        "(default 1,10,100 up to K)", parse=_iwae_ks, metavar="K1,K2,...",
    )  # fmt: skip
    limit: int | None = option(None, "evaluate only the first N points")
    seed: int = option(0, "seeds the draws and the binarization")

    def __post_init__(self):
        if self.split not in ("train", "test"):
            raise InputError(f"unknown split {self.split!r}; use train or test")
        check_positive(self, "num_samples", "chunk_size", "batch_size", "limit")
        if self.iwae_k is not None:
            object.__setattr__(self, "iwae_k", tuple(self.iwae_k))
            bad = [k for k in self.iwae_k if not 1 <= k <= self.num_samples]
            if bad:
                raise InputError(
                    f"every --iwae-k must lie in 1..{self.num_samples} (--num-samples), got {bad}"
                )

    @property
    def iwae_ks(self) -> tuple[int, ...]:
        """The IWAE k to report: as given, or the defaults that do not exceed K."""
        if self.iwae_k is not None:
            return self.iwae_k
        return tuple(k for k in DEFAULT_IWAE_KS if k <= self.num_samples)

    def num_points(self, data: Data) -> int:
        """How many points of ``data`` this evaluates."""
        n = (data.test if self.split == "test" else data.train).shape[0]
        return min(n, self.limit) if self.limit is not None else n


def _estimate(run: Run, config: EvaluateConfig, progress: Callable[[int], None] | None) -> dict:
    data = run.data
    x_all = data.train if config.split == "train" else data.test
    x_all = x_all[: config.num_points(data)]
    ks = config.iwae_ks
    results, done = [], 0
    with forked_rng(data.device, config.seed) as g:
        for start in range(0, x_all.shape[0], config.batch_size):
            x = data.encode(x_all[start : start + config.batch_size], generator=g)

            def advance(k, n=x.shape[0], base=done):
                if progress is not None:
                    progress(base + n * k)

            results.append(
                log_likelihood(
                    run.model,
                    run.guide,
                    x,
                    num_samples=config.num_samples,
                    chunk_size=config.chunk_size,
                    diagnostics=True,
                    iwae_ks=ks,
                    progress=advance,
                )  # fmt: skip
            )
            done += x.shape[0] * config.num_samples
    log_px = torch.cat([r.log_px for r in results])
    return {
        "split": config.split,
        "num_points": int(log_px.shape[0]),
        "num_samples": config.num_samples,
        "nll": -log_px.mean().item(),
        "nll_standard_error": (log_px.std() / log_px.shape[0] ** 0.5).item(),
        "elbo": torch.cat([r.elbo for r in results]).mean().item(),
        "ess": torch.cat([r.ess for r in results]).mean().item(),
        "iwae": {str(k): torch.cat([r.iwae[k] for r in results]).mean().item() for k in ks},
        "log_px": log_px.tolist(),
    }


def evaluate_run(
    run: Run | str | os.PathLike,
    config: EvaluateConfig | None = None,
    *,
    device: str = "auto",
    data_dir: str | None = None,
    progress: Callable[[int], None] | None = None,
    write: bool = True,
) -> dict:
    """Importance-sampled log p(x) of a trained run on a split, with diagnostics.

    ``run`` is a :class:`Run` or a run directory (loaded with ``device`` and ``data_dir``).
    Data points are taken ``config.batch_size`` at a time, each with exactly
    ``config.num_samples`` draws from the guide (see
    :func:`ppl_vae.importance.log_likelihood`); dynamically binarized data are binarized once,
    from ``config.seed``. Returns the record of ``evaluate.json`` — the means over points
    (``nll`` is -log p(x), in nats), the settings, the wall time and the per-point estimates —
    and, with ``write``, writes it into the run's directory.
    """
    config = config or EvaluateConfig()
    if not isinstance(run, Run):
        run = load_run(run, device, data_dir=data_dir)
    t0 = time.perf_counter()
    result = _estimate(run, config, progress)
    log_px = result.pop("log_px")
    record = {
        **result,
        "seconds": time.perf_counter() - t0,
        "epoch": run.metrics[-1]["epoch"] if run.metrics else 0,
        "chunk_size": config.chunk_size,
        "batch_size": config.batch_size,
        "seed": config.seed,
        "limit": config.limit,
        "device": str(run.data.device),
        "log_px": log_px,
    }
    if write and run.directory is not None:
        write_json(record, run.directory / EVALUATE)
    return record
