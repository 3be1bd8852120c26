r"""The EM baseline as a run: fit a mixture to a data set, write ``results.json`` and a picture."""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

import ppl_vae.mixture
from ppl_vae.compat import old_em_settings
from ppl_vae.config import check_positive, option, to_dict
from ppl_vae.data import Data, DataConfig, load_data
from ppl_vae.distributed import all_reduce_sum, batch_shard, world
from ppl_vae.errors import InputError, WriteError
from ppl_vae.mixture import COVARIANCE_TYPES, INITS, MIXTURES
from ppl_vae.plots import mixture_figure
from ppl_vae.progress import Progress, time_left
from ppl_vae.runs.checkpoint import EM_RESULTS, held_by
from ppl_vae.runs.files import (
    RECORD,
    Outputs,
    check_output_dir,
    folder_lock,
    make_output_dir,
    remove_stale_temporaries,
    resolve_device,
    staged,
)

__all__ = ["DTYPES", "MixtureConfig", "em_run", "make_mixture"]

DTYPES = {"float64": torch.float64, "float32": torch.float32}
RESULTS = EM_RESULTS
PICTURE = "mixture.png"


SPECIFIC = ("covariance_type", "reg_covar", "alpha")  # options of one mixture family only


@dataclass(frozen=True)
class MixtureConfig:
    """A mixture and its EM settings; the fields are the estimators' own arguments.

    ``covariance_type``, ``reg_covar`` (Gaussian) and ``alpha`` (Bernoulli) are ``None``
    unless set; setting one that the fitted family does not take is an error that names it.
    """

    mixture: str | None = option(
        None, "the family; auto (the default): bernoulli for binary data, else gaussian",
        choices=(*MIXTURES.names, "auto"),
    )  # fmt: skip
    n_components: int = option(
        8, "K, the number of components", flags=("--n-components", "--components")
    )
    covariance_type: str | None = option(
        None, "Gaussian covariance (default full)", flags=("--covariance-type", "--covariance"),
        choices=COVARIANCE_TYPES,
    )  # fmt: skip
    max_iter: int = option(100, "EM iterations per initialisation")
    tol: float = option(1e-3, "stop when the mean log-likelihood changes by less (0: --max-iter)")
    reg_covar: float | None = option(None, "Gaussian: added to covariance diagonals (default 1e-6)")
    n_init: int = option(1, "initialisations; the best final log-likelihood is kept")
    init: str = option("kmeans", "initial responsibilities", choices=INITS)
    alpha: float | None = option(None, "Bernoulli: Beta(1+alpha, 1+alpha) pseudo-count (default 1)")
    seed: int = option(0, "seeds the initialisation")
    dtype: str = option("float64", "the precision EM runs in", choices=tuple(DTYPES))

    def __post_init__(self):
        if self.mixture == "auto":
            object.__setattr__(self, "mixture", None)
        check_positive(self, "n_components", "n_init")
        if self.dtype not in DTYPES:
            raise InputError(f"unknown dtype {self.dtype!r}; choose float64 or float32")
        # each estimator checks its own arguments; the family is known once the data are
        for kind in (self.mixture,) if self.mixture is not None else MIXTURES.names:
            self._build(kind, strict=self.mixture is not None)

    def specific(self) -> dict:
        """The family-specific options that are set."""
        return {k: getattr(self, k) for k in SPECIFIC if getattr(self, k) is not None}

    def kind(self, binary: bool) -> str:
        """The family fitted to data that are (or are not) binary."""
        return self.mixture or ("bernoulli" if binary else "gaussian")

    def estimator(self, kind: str):
        """An unfitted estimator of family ``kind``; an error if a set option does not apply."""
        return self._build(kind, strict=True)

    def _build(self, kind: str, strict: bool):
        specific = self.specific()
        if strict:
            MIXTURES.check_options(kind, specific, prefix="--")
        else:
            specific = {k: v for k, v in specific.items() if k in MIXTURES.options(kind)}
        common = dict(
            n_components=self.n_components, tol=self.tol, max_iter=self.max_iter,
            n_init=self.n_init, init=self.init, seed=self.seed,
        )  # fmt: skip
        return MIXTURES.build(kind, **common, **specific)


def make_mixture(config: MixtureConfig, binary: bool):
    """The estimator ``config`` names for data that are (or are not) binary."""
    return config.estimator(config.kind(binary))


def _arrays(data: Data, kind: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    train, test = data.train.to(dtype), data.test.to(dtype)
    if kind == "gaussian":
        train, test = train.flatten(1), test.flatten(1)
    return train, test


@contextmanager
def _progress(mixture, config: MixtureConfig, dataset: str, quiet: bool):
    """Reports the fit's iterations, a line at a time (the last one always).

    The time left is at most the remaining iterations at the rate since the first one (which
    also pays for the initialisation, k-means by default).
    """
    total = config.n_init * config.max_iter
    name = f"EM {type(mixture).__name__} K={config.n_components} on {dataset}"
    previous, first = {}, []

    with Progress(total, name, "iteration", quiet=quiet) as progress:

        def on_iteration(init: int, n_iter: int, objective: float) -> None:
            done, elapsed = (init - 1) * config.max_iter + n_iter, progress.elapsed
            if not first:  # the rate is taken from here on
                first.extend((done, elapsed))
            change = objective - previous.get(init, -math.inf)
            previous[init] = objective
            if abs(change) < config.tol:
                state = ", converged"
            else:
                d0, t0 = first
                state = time_left(done - d0, total - d0, elapsed - t0, bound=True)
            text = (
                f"{name}: initialisation {init}/{config.n_init}, iteration {n_iter}: "
                f"{mixture.objective} {objective:.4f} nats per point, {elapsed:.1f} s{state}"
            )
            progress.update(done, text)

        mixture.on_iteration = on_iteration
        try:
            with progress.waiting(f"initialising ({config.init})"):
                yield
        finally:
            mixture.on_iteration = None


def em_run(
    data_config: DataConfig,
    config: MixtureConfig,
    out_dir: str | os.PathLike,
    device: str = "cpu",
    *,
    quiet: bool = False,
    report: Callable[[dict], None] | None = None,
) -> dict:
    """Fits a mixture to the training split and writes ``results.json`` and ``mixture.png``.

    The output directory is checked before the fit (it must be writable, hold no VAE run, and
    hold no file of those names that ppl_vae did not write) and created only after the fit;
    ``report`` is called with the record before anything is written, and the two files are
    replaced together or not at all, so a failed write loses neither the result nor the
    previous files. Bad input leaves nothing behind. Returns the record
    written to ``results.json`` (train/test mean log-likelihood in nats per point, iterations,
    convergence, settings and seconds). Progress goes to stderr (see :mod:`ppl_vae.progress`)
    unless ``quiet``. Under ``torchrun`` each rank fits on its contiguous share of the training
    points with the E-step's sums reduced over the ranks (:mod:`ppl_vae.mixture.rows`), the
    same mixture as one process to rounding; rank 0 writes.
    """
    dev = resolve_device(device)
    data = load_data(data_config, dev)
    mixture = make_mixture(config, data.is_binary)
    _check_em_folder(Path(out_dir))
    train, test = _arrays(data, config.kind(data.is_binary), DTYPES[config.dtype])
    w, num_train = world(), train.shape[0]
    if w.distributed:  # each rank fits on its rows; every sum over points is reduced
        train, mixture.sharded = train[batch_shard(train.shape[0], w)], True
    t0 = time.perf_counter()
    with _progress(mixture, config, data.name, quiet or not w.main), warnings.catch_warnings():
        # the record says whether EM converged
        warnings.simplefilter("ignore", ppl_vae.mixture.ConvergenceWarning)
        mixture.fit(train)
    seconds = time.perf_counter() - t0
    train_ll = float(all_reduce_sum(mixture.score_samples(train).sum())) / num_train
    settings, data_settings = old_em_settings(to_dict(config), to_dict(data_config))
    record = {
        "dataset": data.name,
        "mixture": type(mixture).__name__,
        "train_log_likelihood": train_ll,
        "test_log_likelihood": mixture.score(test),
        "n_iter": mixture.n_iter_,
        "converged": mixture.converged_,
        "seconds": seconds,
        "num_train": num_train,
        "num_test": test.shape[0],
        "device": str(dev),
        "processes": w.size,
        "settings": {"data": data_settings, "mixture": settings},
        "history": mixture.history_,
    }
    if not w.main:
        return record
    fig = mixture_figure(mixture, data)
    record["picture"] = PICTURE if fig is not None else None
    if report is not None:
        report(record)
    out = make_output_dir(out_dir)
    try:
        with folder_lock(out), staged() as files:  # one writer; a killed one's leftovers go
            remove_stale_temporaries(out, (RESULTS, PICTURE, RECORD))
            if fig is not None:
                files.save_figure(fig, out / PICTURE)
            files.write_json(record, out / RESULTS, indent=1)
            Outputs(out).stage(files, dict.fromkeys(files.names, {}))
    except WriteError as e:
        kept = "; the result is printed above" if report is not None else ""
        raise WriteError(f"{e}{kept}; the previous files in {out} are as they were") from None
    return record


def _check_em_folder(out: Path) -> None:
    """``em --out`` is a folder of its own: writable, not a VAE run's, and without files of
    its names (results.json, mixture.png) that ppl_vae did not write."""
    check_output_dir(out)
    if held_by(out) == "run":
        raise InputError(
            f"{out} holds a VAE run of ppl-vae train; em writes into a folder of its own: "
            f"choose another --out"
        )
    legacy = (RESULTS, PICTURE) if (out / RESULTS).is_file() else ()
    outputs = Outputs(out, legacy)
    others = sorted(set(outputs.read()) - {RESULTS, PICTURE})
    if others:
        raise InputError(
            f"{out} holds files of another ppl-vae command ({', '.join(others)}); em writes into "
            f"a folder of its own: choose another --out"
        )
    outputs.check_replaceable([RESULTS, PICTURE])
