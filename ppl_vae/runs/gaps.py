r"""The inference gaps of a run on its first test points (:func:`ppl_vae.gaps.inference_gaps`),
written to ``gaps.json``."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ppl_vae.ais import annealed_log_likelihood
from ppl_vae.config import check_number, check_positive, check_seed, option
from ppl_vae.distributed import gather_round_robin, round_robin, world
from ppl_vae.errors import InputError
from ppl_vae.gaps import check_family, inference_gaps
from ppl_vae.progress import Progress, time_left
from ppl_vae.rng import forked_rng
from ppl_vae.runs.checkpoint import GAPS, RunDir
from ppl_vae.runs.estimators import DEFAULTS
from ppl_vae.runs.evaluate import run_epoch, seeded_batch
from ppl_vae.runs.records import guarded, record_target, write_record
from ppl_vae.runs.run import Run, load_run

__all__ = ["QUANTITIES", "GapsConfig", "gaps_run"]

# what gaps prints and summarizes, in order: log p(x) = ELBO(q*) + approximation gap, and
# ELBO(q*) = amortized ELBO + amortization gap
QUANTITIES = {
    "log_px": "log p(x) (AIS)",
    "elbo_optimal": "ELBO of q*",
    "elbo": "amortized ELBO",
    "approximation_gap": "approximation gap",
    "amortization_gap": "amortization gap",
}
PER_POINT = (*QUANTITIES, "elbo_standard_error", "elbo_optimal_standard_error")


@dataclass(frozen=True)
class GapsConfig:
    """How to split log p(x) − ELBO on the first test points of a run."""

    limit: int = option(100, "the first N test points")
    num_chains: int = option(DEFAULTS["ais"]["num_chains"], "AIS chains per point for log p(x)")
    num_steps: int = option(
        DEFAULTS["ais"]["num_steps"], "AIS annealing steps T (T - 1 HMC transitions)"
    )
    standard_error: float = option(
        0.01, "the Monte Carlo standard error aimed at for each point's two ELBOs, in nats"
    )
    batch_size: int = option(
        100, "points per pass: q* is fitted to a batch's points together, its convergence "
        "judged on their mean ELBO",
    )  # fmt: skip
    chunk_size: int | None = option(
        None, "ELBO draws per vectorized pass (default 10,000 / the batch's points on a CPU, "
        "100,000 / them on a GPU; recorded as null)",
    )  # fmt: skip
    seed: int = option(0, "seeds the binarization and every draw")

    def __post_init__(self):
        check_positive(self, "limit", "num_chains", "num_steps", "batch_size", "chunk_size")
        check_number("standard_error", self.standard_error, hint="pass e.g. --standard-error 0.01")
        check_seed("seed", self.seed)


def _gaps(run: Run, x, config: GapsConfig, on_step: Callable[[int], None]) -> dict:
    """:func:`inference_gaps` of the batch ``x``, its AIS reporting its steps to ``on_step``
    (the same draws as ``inference_gaps(..., num_chains=, num_steps=)`` from here)."""
    ais = {"num_chains": config.num_chains, "num_steps": config.num_steps}
    log_px = annealed_log_likelihood(run.model, run.guide, x, **ais, progress=on_step)
    gaps = inference_gaps(
        run.model, run.guide, x, log_px=log_px, standard_error=config.standard_error,
        chunk_size=config.chunk_size,
    )  # fmt: skip
    return {k: v.cpu() for k, v in gaps.items()}


def _estimate(run: Run, config: GapsConfig, quiet: bool) -> dict[str, torch.Tensor]:
    """Every point's gaps, batch ``b`` drawing from ``derived_seed(seed, b)`` (as evaluate
    does); under ``torchrun`` the batches are shared out and gathered back in order."""
    data, w = run.data, world()
    n = min(config.limit, data.test.shape[0])
    x_all = data.test[:n]
    count = math.ceil(n / config.batch_size)
    mine = round_robin(count)
    share = sum(min(config.batch_size, n - b * config.batch_size) for b in mine)
    desc = "gaps, test" + (f", rank 0 of {w.size}" if w.distributed else "")
    results, done = [], 0
    with (
        Progress(share, desc, "point", quiet=quiet or not w.main) as bar,
        forked_rng(data.device, config.seed),
    ):

        def line(done: int, now: str = "") -> str:
            elapsed = bar.elapsed
            return (f"{desc}: {done:,}/{share:,} points{now}, {elapsed:.1f} s"
                    + time_left(done, share, elapsed))  # fmt: skip

        for b in mine:
            x = seeded_batch(data, x_all, config.batch_size, config.seed, b)

            def on_step(t: int, done: int = done, m: int = x.shape[0]) -> None:
                now = f"AIS step {t}/{config.num_steps}" if t < config.num_steps else "fitting q*"
                bar.update(done, line(done, f"; the next {m}: {now}"))

            results.append(_gaps(run, x, config, on_step))
            done += x.shape[0]
            bar.update(done, line(done))
    results = gather_round_robin(results, count)
    return {k: torch.cat([r[k] for r in results]) for k in PER_POINT}


def _summary(per_point: dict[str, torch.Tensor]) -> dict:
    """Means over points and their standard errors (None for one point)."""
    n = per_point["log_px"].shape[0]
    return {
        "means": {k: per_point[k].mean().item() for k in QUANTITIES},
        "standard_errors": {
            k: (per_point[k].std() / n**0.5).item() if n > 1 else None for k in QUANTITIES
        },
    }


def gaps_run(
    run: Run | str | os.PathLike,
    config: GapsConfig | None = None,
    *,
    device: str = "auto",
    data_dir: str | None = None,
    quiet: bool = False,
    write: bool = True,
    out: str | os.PathLike | None = None,
    report: Callable[[dict], None] | None = None,
    checkpoint: str | None = None,
) -> dict:
    """log p(x) (AIS), the amortized ELBO and that of the best q of the guide's family, and the
    approximation and amortization gaps, on the first ``config.limit`` test points of a run.

    The points are taken ``config.batch_size`` at a time, binarized and drawn from the batch's
    seed as :func:`~ppl_vae.runs.evaluate_run` does; each batch is
    :func:`ppl_vae.gaps.inference_gaps` with AIS of ``config.num_chains`` chains and
    ``config.num_steps`` steps (in the base space of a flow guide). A guide without an
    optimal-q family (no ``point_parameters``) is refused before any work. Returns the record
    of ``gaps.json``: the means over points and their standard errors over points, the
    per-point values (with each ELBO's Monte Carlo standard error), the settings, the
    checkpoint (epoch and SHA-256) and the wall time.
    ``run``, ``device``, ``data_dir``, ``checkpoint``, ``write``, ``out``, ``report`` and
    ``quiet`` work as in :func:`~ppl_vae.runs.evaluate_run`, with ``gaps.json`` in place of
    ``evaluate.json``.
    """
    config = config or GapsConfig()
    directory = None if isinstance(run, Run) else RunDir(run)
    stamp = directory.stamp() if directory is not None else None
    if not isinstance(run, Run):
        run = load_run(run, device, data_dir=data_dir, checkpoint=checkpoint)
    if run.vae_config.model == "cvae":
        raise InputError(
            "gaps compares log p(x) with a guide q(z|x)'s ELBO, by AIS; a conditional VAE "
            "(--model cvae) has neither: evaluate reports its log p(y|x)"
        )
    if run.vae_config.model == "m2":
        raise InputError(
            "gaps compares log p(x) with a guide q(z|x)'s ELBO over continuous latents, by "
            "AIS; M2's label is discrete (summed out): evaluate reports its log p(x)"
        )
    check_family(run.guide)
    target = record_target(run, out, GAPS, "the gaps") if write else None
    with guarded(run, target, stamp):
        t0 = time.perf_counter()
        per_point = _estimate(run, config, quiet)
        record = {
            "split": "test",
            "num_points": int(per_point["log_px"].shape[0]),
            **_summary(per_point),
            "seconds": time.perf_counter() - t0,
            "epoch": run_epoch(run),
            "checkpoint": run.checkpoint,
            "num_chains": config.num_chains,
            "num_steps": config.num_steps,
            "standard_error": config.standard_error,
            "batch_size": config.batch_size,
            "chunk_size": config.chunk_size,
            "seed": config.seed,
            "limit": config.limit,
            "device": str(run.data.device),
            "processes": world().size,
            "per_point": {k: v.tolist() for k, v in per_point.items()},
        }
        if world().main:
            if report is not None:
                report(record)
            if target is not None:
                write_record(record, target, run, reported=report is not None, what="the gaps")
    return record
