r"""Evaluating a run: its importance-sampled log p(x) per point, written to ``evaluate.json``."""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ppl_vae.collapse import (
    gaussian_marginals,
    kl_per_dimension,
    latent_activity,
    mutual_information,
)
from ppl_vae.config import check_positive, check_seed, option
from ppl_vae.data import Data
from ppl_vae.distributed import all_gather_objects, on_rank0_for_all, world
from ppl_vae.errors import InputError, WriteError
from ppl_vae.importance import LogLikelihood, default_chunk_size, log_likelihood_diagnostics
from ppl_vae.progress import Progress, time_left
from ppl_vae.psis import tail_size
from ppl_vae.rng import derived_seed, forked_rng, seed_streams
from ppl_vae.runs.checkpoint import EVALUATE, RunDir, held_by
from ppl_vae.runs.files import RESERVED, check_output_dir, make_output_dir, staged
from ppl_vae.runs.pictures import warn_stale
from ppl_vae.runs.run import Run, load_run

__all__ = ["DEFAULT_IWAE_KS", "EvaluateConfig", "evaluate_run"]

DEFAULT_IWAE_KS = (1, 10, 100)


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
        None, "draws per vectorized pass (default 10,000 / --batch-size on a CPU, 100,000 / "
        "--batch-size on a GPU); peak memory grows with chunk size x batch size, not with K",
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
        check_seed("seed", self.seed)
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

    def chunk_size_on(self, device) -> int:
        """Draws per pass: as given, or the device's default for ``batch_size`` points."""
        return self.chunk_size or default_chunk_size(self.batch_size, device)

    def num_points(self, data: Data) -> int:
        """How many points of ``data`` this evaluates."""
        n = (data.test if self.split == "test" else data.train).shape[0]
        return min(n, self.limit) if self.limit is not None else n


def _on_cpu(r: LogLikelihood) -> LogLikelihood:
    iwae = {k: v.cpu() for k, v in r.iwae.items()}
    k = r.pareto_k.cpu()
    return LogLikelihood(r.log_px.cpu(), r.elbo.cpu(), r.ess.cpu(), iwae, r.num_samples, k)


def _batch(data: Data, x_all: torch.Tensor, config: EvaluateConfig, b: int) -> torch.Tensor:
    """Batch ``b`` of the points as the model sees them, binarized from the batch's own seed
    (which also seeds the draws that follow)."""
    g = seed_streams(data.device, derived_seed(config.seed, b))
    return data.encode(x_all[b * config.batch_size : (b + 1) * config.batch_size], generator=g)


def _collapse(run: Run, config: EvaluateConfig, x_all: torch.Tensor) -> dict:
    """Active units, KL per latent dimension (mean over points) and I(x; z) under q (None for
    a flow guide) on the points evaluated (:mod:`ppl_vae.collapse`)."""
    with torch.no_grad(), forked_rng(run.data.device, config.seed):
        batches = range(math.ceil(x_all.shape[0] / config.batch_size))
        x = torch.cat([_batch(run.data, x_all, config, b) for b in batches])
        options = {"batch_size": config.batch_size}
        activity = latent_activity(run.guide, x, **options)
        gaussian = gaussian_marginals(run.guide.distribution(x[:1])) is not None
        return {
            "active_units": int((activity > 1e-2).sum().item()),
            "latent_activity": activity.tolist(),
            "kl_per_dim": kl_per_dimension(run.guide, x, **options).mean(0).tolist(),
            "mutual_information": mutual_information(run.guide, x, **options) if gaussian else None,
        }


def _pareto(k: torch.Tensor, num_samples: int, worst: int = 10) -> dict | None:
    """The share of points whose k̂ exceeds 0.7 and the worst points; None where K < 50
    leaves too few weights in the tail."""
    if tail_size(num_samples) < 10:
        return None
    order = k.argsort(descending=True)[:worst]
    return {
        "above_0.7": (k > 0.7).double().mean().item(),
        "worst_points": order.tolist(),
        "worst_k": [v if math.isfinite(v) else None for v in k[order].tolist()],
    }


def _estimate(run: Run, config: EvaluateConfig, quiet: bool) -> dict:
    """Every point's estimate; batch ``b`` (points ``b * batch_size`` onwards) draws from the
    seed ``derived_seed(seed, b)``, so that the figures do not depend on how batches are
    shared out: under ``torchrun`` rank r takes every size-th batch from the r-th, and every
    rank gets all batches' results back, in order."""
    data, w = run.data, world()
    x_all = data.train if config.split == "train" else data.test
    n = config.num_points(data)
    x_all, ks, k = x_all[:n], config.iwae_ks, config.num_samples
    chunk = config.chunk_size_on(data.device)
    mine = list(range(0, n, config.batch_size))[w.rank :: w.size]  # first points of my batches
    share = sum(min(config.batch_size, n - start) for start in mine)
    results, done, total_log_px = [], 0, 0.0
    desc = f"log p(x), {config.split}" + (f", rank 0 of {w.size}" if w.distributed else "")
    with (
        Progress(share * k, desc, "draw", quiet=quiet or not w.main, scale=True) as progress,
        forked_rng(data.device, config.seed),
    ):
        for start in mine:
            x = _batch(data, x_all, config, start // config.batch_size)
            result = log_likelihood_diagnostics(
                run.model, run.guide, x, num_samples=k, chunk_size=chunk, iwae_ks=ks,
                progress=lambda d, base=done * k, m=x.shape[0]: progress.update(base + m * d),
            )  # fmt: skip
            results.append(result)
            done += x.shape[0]
            total_log_px += result.log_px.sum().item()
            elapsed, nll = progress.elapsed, -total_log_px / done
            progress.update(
                done * k,
                f"{desc}: {done:,}/{share:,} points, NLL so far {nll:.2f} nats, "
                f"{done * k / elapsed:,.0f} draws/s, {elapsed:.1f} s"
                + time_left(done, share, elapsed),
            )
    if w.distributed:  # every rank's batches, back in the order of the points
        ranks = all_gather_objects([_on_cpu(r) for r in results])
        results = [ranks[b % w.size][b // w.size] for b in range(math.ceil(n / config.batch_size))]
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
        "pareto_k": _pareto(torch.cat([r.pareto_k for r in results]), k),
        **(_collapse(run, config, x_all) if w.main else {}),
        "log_px": log_px.tolist(),
    }


def _target(run: Run, out: str | os.PathLike | None) -> Path:
    """Where the record goes: ``out`` (a file, or a folder for ``evaluate.json``), else the
    run's ``evaluate.json``; a folder that holds another run is refused."""
    if out is None:
        if run.directory is None:
            raise InputError("this run has no folder; pass out=FILE, or write=False")
        return run.directory / EVALUATE
    path = Path(out)
    if path.is_dir() or str(out).endswith(os.sep):
        path = path / EVALUATE
    if path.suffix != ".json" or path.name in RESERVED:
        raise InputError(
            f"--out {out}: the estimate is a JSON file; name a .json file other than "
            f"{', '.join(RESERVED[1:4])}, or a folder"
        )
    owner = held_by(path.parent, own_run=run.directory)
    if owner == "em":
        raise InputError(
            f"{path.parent} holds the results of ppl-vae em; write the estimate into its run, "
            f"or a folder of its own"
        )
    if owner == "run":
        raise InputError(
            f"{path.parent} holds another ppl_vae run, whose estimate --out would replace; "
            f"write the estimate into its own run, or elsewhere"
        )
    return path


def evaluate_run(
    run: Run | str | os.PathLike,
    config: EvaluateConfig | None = None,
    *,
    device: str = "auto",
    data_dir: str | None = None,
    quiet: bool = False,
    write: bool = True,
    out: str | os.PathLike | None = None,
    report: Callable[[dict], None] | None = None,
    checkpoint: str | None = None,
) -> dict:
    """Importance-sampled log p(x) of a trained run on a split, with diagnostics.

    ``run`` is a :class:`Run` or a run directory (loaded with ``device``, ``data_dir`` and
    ``checkpoint``: ``"best"`` or ``"last"``, by default the best where the run keeps one).
    Data points are taken ``config.batch_size`` at a time, each with exactly
    ``config.num_samples`` draws from the guide (see
    :func:`ppl_vae.importance.log_likelihood_diagnostics`); dynamically binarized data are
    binarized once, from ``config.seed``. Returns the record of ``evaluate.json``: the means
    over points (``nll`` is -log p(x), in nats), the settings, the checkpoint estimated (its
    epoch and SHA-256), the wall time and the per-point estimates. Progress goes to stderr (see
    :mod:`ppl_vae.progress`) unless ``quiet``.

    With ``write``, the record goes to ``out`` (a file, or a folder for ``evaluate.json``;
    default: the run's folder), checked before the estimate starts; ``report`` is called with
    the record before it is written, so that a failed write loses nothing. Writing into the
    run's folder holds its lock for readers throughout, so the record never lands in a run
    that another process is training or replacing.
    """
    config = config or EvaluateConfig()
    directory = None if isinstance(run, Run) else RunDir(run)
    stamp = directory.stamp() if directory is not None else None
    if not isinstance(run, Run):
        run = load_run(run, device, data_dir=data_dir, checkpoint=checkpoint)
    target = _target(run, out) if write else None
    into_run = (
        target is not None
        and run.directory is not None
        and target.parent.resolve() == run.directory.resolve()
    )
    with contextlib.ExitStack() as stack:

        def check() -> None:  # rank 0 writes; every rank learns of a refusal
            if target is None:
                return
            check_output_dir(target.parent)
            RunDir(target.parent).outputs.check_replaceable([target.name])
            if into_run:
                stack.enter_context(RunDir(run.directory).writing(shared=True))
                if stamp is not None:
                    RunDir(run.directory).check_unchanged(stamp)

        on_rank0_for_all(check)
        t0 = time.perf_counter()
        result = _estimate(run, config, quiet)
        log_px = result.pop("log_px")
        record = {
            **result,
            "seconds": time.perf_counter() - t0,
            "epoch": _epoch(run),
            "checkpoint": run.checkpoint,
            "chunk_size": config.chunk_size_on(run.data.device),
            "batch_size": config.batch_size,
            "seed": config.seed,
            "limit": config.limit,
            "device": str(run.data.device),
            "processes": world().size,
            "log_px": log_px,
        }
        if not world().main:
            return record
        if report is not None:
            report(record)
        if target is not None:
            _write(record, target, run, reported=report is not None)
    if into_run:
        warn_stale(RunDir(run.directory), run.checkpoint)
    return record


def _epoch(run: Run) -> int:
    """The epoch of the parameters estimated: the checkpoint's, else the last recorded."""
    if run.checkpoint is not None:
        return run.checkpoint["epoch"]
    return run.metrics[-1]["epoch"] if run.metrics else 0


def _write(record: dict, target: Path, run: Run, reported: bool) -> None:
    """``record`` to ``target`` with its line in the folder's ``written.json``, both or none."""
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
            f"{e}; the estimate is printed above: save it with --out FILE elsewhere"
        ) from None
