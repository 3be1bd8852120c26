r"""Evaluating a run: its log p(x) per point by importance sampling or AIS (``--method``),
written to ``evaluate.json``; for a conditional VAE (``--model cvae``) the same estimators give
log p(y|x), the hidden pixels given the visible ones (``"conditional": true``, under the same
keys ``nll`` and ``log_px``), without the collapse diagnostics of a prior p(z)."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ppl_vae.collapse import (
    gaussian_marginals,
    kl_per_dimension,
    latent_activity,
    mutual_information,
)
from ppl_vae.config import check_memory, check_positive, check_seed, option
from ppl_vae.data import Data
from ppl_vae.distributed import gather_round_robin, round_robin, world
from ppl_vae.errors import InputError
from ppl_vae.importance import default_chunk_size
from ppl_vae.m2 import m2_log_likelihood
from ppl_vae.progress import Progress, time_left
from ppl_vae.rng import derived_seed, forked_rng, seed_streams
from ppl_vae.runs.checkpoint import EVALUATE, RunDir
from ppl_vae.runs.estimators import (
    ANNEALING,
    DEFAULT_IWAE_KS,
    DEFAULTS,
    METHODS,
    Estimator,
    iwae_ks,
)
from ppl_vae.runs.records import guarded, record_target, write_record
from ppl_vae.runs.run import Run, load_run
from ppl_vae.semisupervised import classifier_accuracy

_OPTIONS = tuple(dict.fromkeys(o for m in METHODS for o in METHODS.options(m)))  # every method's

__all__ = ["DEFAULT_IWAE_KS", "EvaluateConfig", "evaluate_run", "run_epoch", "seeded_batch"]


def _iwae_ks(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise InputError(f"expected comma-separated integers like 1,10,100, got {text!r}") from None


@dataclass(frozen=True)
class EvaluateConfig:
    """How to estimate log p(x) of a trained run: by importance sampling or by AIS."""

    split: str = option("test", "the split to evaluate", choices=("test", "train"))
    num_samples: int | None = option(
        None, f"is: K, importance samples per point (default {DEFAULTS['is']['num_samples']})"
    )
    chunk_size: int | None = option(
        None, "draws (ais: chains) per vectorized pass (default 10,000 / --batch-size on a "
        "CPU, 100,000 / --batch-size on a GPU); peak memory grows with chunk size x batch "
        "size, not with K",
    )  # fmt: skip
    batch_size: int = option(100, "data points per pass")
    iwae_k: tuple[int, ...] | None = option(
        None, "is: k of the IWAE bounds reported from the same draws, each <= K "
        "(default 1,10,100 up to K)", parse=_iwae_ks, metavar="K1,K2,...",
    )  # fmt: skip
    limit: int | None = option(None, "evaluate only the first N points")
    seed: int = option(0, "seeds the draws and the binarization")
    method: str = option("is", f"how log p(x) is estimated: {METHODS.help()}", choices=METHODS)
    num_chains: int | None = option(
        None, f"ais: C, chains per point (default {DEFAULTS['ais']['num_chains']})"
    )
    num_steps: int | None = option(
        None, f"ais: T, annealing steps, T - 1 HMC transitions per chain (default "
        f"{DEFAULTS['ais']['num_steps']})",
    )  # fmt: skip
    leapfrog_steps: int | None = option(
        None, f"ais: leapfrog steps per HMC transition (default "
        f"{DEFAULTS['ais']['leapfrog_steps']})",
    )  # fmt: skip
    schedule: str | None = option(
        None, f"ais: the spacing of the inverse temperatures (default "
        f"{DEFAULTS['ais']['schedule']})", choices=tuple(ANNEALING),
    )  # fmt: skip

    def __post_init__(self):
        if self.split not in ("train", "test"):
            raise InputError(f"unknown split {self.split!r}; use train or test")
        METHODS.check(self.method)
        given = {n: getattr(self, n) for n in _OPTIONS if getattr(self, n) is not None}
        METHODS.check_options(self.method, given, prefix="--")
        for name, value in DEFAULTS[self.method].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        check_positive(self, "num_samples", "chunk_size", "batch_size", "limit", "num_chains",
                       "num_steps", "leapfrog_steps")  # fmt: skip
        check_seed("seed", self.seed)
        if self.schedule is not None and self.schedule not in ANNEALING:
            raise InputError(
                f"unknown annealing schedule {self.schedule!r}; choose one of "
                f"{', '.join(ANNEALING)}"
            )
        if self.iwae_k is not None:
            object.__setattr__(self, "iwae_k", tuple(self.iwae_k))
            bad = [k for k in self.iwae_k if not 1 <= k <= self.num_samples]
            if bad:
                raise InputError(
                    f"every --iwae-k must lie in 1..{self.num_samples} (--num-samples), got {bad}"
                )

    def estimator(self) -> Estimator:
        """The method's estimator with this configuration's options."""
        return METHODS.build(
            self.method, **{n: getattr(self, n) for n in METHODS.options(self.method)}
        )

    @property
    def iwae_ks(self) -> tuple[int, ...]:
        """The IWAE k to report: as given, or the defaults that do not exceed K."""
        return iwae_ks(self.num_samples, self.iwae_k) if self.method == "is" else ()

    def chunk_size_on(self, device) -> int:
        """Draws per pass: as given, or the device's default for ``batch_size`` points."""
        return self.chunk_size or default_chunk_size(self.batch_size, device)

    def num_points(self, data: Data) -> int:
        """How many points of ``data`` this evaluates."""
        n = (data.test if self.split == "test" else data.train).shape[0]
        return min(n, self.limit) if self.limit is not None else n


def seeded_batch(data: Data, x_all: torch.Tensor, batch_size: int, seed: int, b: int) -> Tensor:
    """Batch ``b`` of ``x_all`` (``batch_size`` points each) as the model sees them, binarized
    from the batch's own seed ``derived_seed(seed, b)``, which also seeds the draws that follow
    (torch's global streams): a batch's figures do not depend on which process takes it."""
    g = seed_streams(data.device, derived_seed(seed, b))
    return data.encode(x_all[b * batch_size : (b + 1) * batch_size], generator=g)


def _collapse(run: Run, config: EvaluateConfig, x_all: torch.Tensor) -> dict:
    """Active units, KL per latent dimension (mean over points) and I(x; z) under q (None for
    a flow guide) on the points evaluated (:mod:`ppl_vae.collapse`)."""
    with torch.no_grad(), forked_rng(run.data.device, config.seed):
        batches = range(math.ceil(x_all.shape[0] / config.batch_size))
        size, seed = config.batch_size, config.seed
        x = torch.cat([seeded_batch(run.data, x_all, size, seed, b) for b in batches])
        options = {"batch_size": config.batch_size}
        activity = latent_activity(run.guide, x, **options)
        gaussian = gaussian_marginals(run.guide.distribution(x[:1])) is not None
        return {
            "active_units": int((activity > 1e-2).sum().item()),
            "latent_activity": activity.tolist(),
            "kl_per_dim": kl_per_dimension(run.guide, x, **options).mean(0).tolist(),
            "mutual_information": mutual_information(run.guide, x, **options) if gaussian else None,
        }


def _baseline(run: Run, config: EvaluateConfig, x_all: torch.Tensor) -> dict:
    """A CVAE run's baseline: its exact log p(y|x) on the points evaluated (the same
    binarization), as ``{"baseline": {"nll", "nll_standard_error", "log_px"}}``; empty
    without a baseline."""
    if getattr(run.model, "baseline", None) is None:
        return {}
    with torch.no_grad(), forked_rng(run.data.device, config.seed):
        batches = range(math.ceil(x_all.shape[0] / config.batch_size))
        size, seed = config.batch_size, config.seed
        x = torch.cat([seeded_batch(run.data, x_all, size, seed, b) for b in batches])
        log_px = run.model.baseline_log_likelihood(x).cpu()
    return {
        "baseline": {
            "nll": -log_px.mean().item(),
            "nll_standard_error": (log_px.std() / log_px.shape[0] ** 0.5).item(),
            "log_px": log_px.tolist(),
        }
    }


# a mixture prior's log-density holds (draws, components, latent dim) values at its peak: three
# copies, measured (the differences from the components' means, their scaled squares, ...);
# with diagonal components (ppl_vae.priors._Mixture) it holds (draws, components) float64
# values instead: four copies (the three terms of the square and their sum)
MIXTURE_COPIES = 3
DIAGONAL_COPIES = 4


def _check_prior_memory(run: Run, config: EvaluateConfig, chunk: int) -> None:
    """An error before drawing when a pass's mixture-prior log-density (``mog``, ``vamp``)
    needs more memory than the device has: it grows with --chunk-size x --batch-size x the
    prior's components (x the latent dimension for full-covariance components: 3 copies of the
    (draws, components, latent dim) values; the VampPrior's 500 components on MNIST at
    --chunk-size 500, --batch-size 100 needed about 15 GB in that form, and beside other jobs
    the process was killed)."""
    prior = getattr(run.model, "learned_prior", None)
    components = getattr(prior, "components", None)
    if components is None:
        return
    points = min(config.batch_size, config.num_points(run.data))
    if getattr(prior, "diagonal", False):
        need = chunk * points * components * 8 * DIAGONAL_COPIES
    else:
        itemsize = next(run.model.parameters()).element_size()
        need = chunk * points * components * run.model.latent_dim * itemsize * MIXTURE_COPIES
    check_memory(
        need,
        f"a pass of {chunk} draws for {points} points through the {components}-component prior",
        device=run.data.device,
        fix="lower --chunk-size or --batch-size",
    )


def _estimate(run: Run, config: EvaluateConfig, quiet: bool) -> dict:
    """Every point's estimate; batch ``b`` (points ``b * batch_size`` onwards) draws from the
    seed ``derived_seed(seed, b)``, so that the figures do not depend on how batches are
    shared out: under ``torchrun`` rank r takes every size-th batch from the r-th, and every
    rank gets all batches' results back, in order."""
    data, w, estimator = run.data, world(), config.estimator()
    x_all = data.train if config.split == "train" else data.test
    n = config.num_points(data)
    x_all, k = x_all[:n], estimator.work
    chunk = config.chunk_size_on(data.device)
    _check_prior_memory(run, config, chunk)
    count = math.ceil(n / config.batch_size)
    mine = round_robin(count)
    share = sum(min(config.batch_size, n - b * config.batch_size) for b in mine)
    results, done, total_log_px = [], 0, 0.0
    what = "log p(y|x)" if run.vae_config.model == "cvae" else "log p(x)"
    desc = f"{what}, {config.split}" + (f", rank 0 of {w.size}" if w.distributed else "")
    with (
        Progress(share * k, desc, estimator.unit, quiet=quiet or not w.main, scale=True) as bar,
        forked_rng(data.device, config.seed),
    ):
        for b in mine:
            x = seeded_batch(data, x_all, config.batch_size, config.seed, b)
            result = estimator.batch(
                run.model, run.guide, x, chunk,
                lambda d, base=done * k, m=x.shape[0]: bar.update(base + m * d),
            )  # fmt: skip
            results.append(result)
            done += x.shape[0]
            total_log_px += result.log_px.sum().item()
            elapsed, nll = bar.elapsed, -total_log_px / done
            bar.update(
                done * k,
                f"{desc}: {done:,}/{share:,} points, NLL so far {nll:.2f} nats, "
                f"{done * k / elapsed:,.0f} {estimator.unit}s/s, {elapsed:.1f} s"
                + time_left(done, share, elapsed),
            )
    results = gather_round_robin(results, count)  # every rank's batches, in order
    log_px = torch.cat([r.log_px for r in results])
    conditional = run.vae_config.model == "cvae"  # log p(y|x): no p(z) to collapse onto
    return {
        "method": config.method,
        **({"conditional": True} if conditional else {}),
        "split": config.split,
        "num_points": int(log_px.shape[0]),
        "nll": -log_px.mean().item(),
        "nll_standard_error": (log_px.std() / log_px.shape[0] ** 0.5).item(),
        **estimator.summary(results),
        **(_collapse(run, config, x_all) if w.main and not conditional else {}),
        **(_baseline(run, config, x_all) if w.main and conditional else {}),
        "log_px": log_px.tolist(),
    }


def _m2_estimate(run: Run, config: EvaluateConfig, quiet: bool) -> dict:
    """An M2 run's log p(x) per point with the label summed out exactly
    (:func:`~ppl_vae.m2.m2_log_likelihood`, ``num_samples`` draws of z per point and class),
    batch ``b`` binarized and drawn from ``derived_seed(seed, b)`` as for a VAE, and the
    classifier's test accuracy (:func:`~ppl_vae.semisupervised.classifier_accuracy`, as in
    training). Under ``torchrun`` the batches are shared out as by :func:`_estimate`."""
    data, n, w = run.data, config.num_points(run.data), world()
    x_all = (data.train if config.split == "train" else data.test)[:n]
    chunk, classes = config.chunk_size_on(data.device), run.guide.num_classes
    k = config.num_samples * classes  # draws per point
    count = math.ceil(n / config.batch_size)
    mine = round_robin(count)
    share = sum(min(config.batch_size, n - b * config.batch_size) for b in mine)
    desc = f"log p(x), label summed out, {config.split}"
    desc += f", rank 0 of {w.size}" if w.distributed else ""
    log_px, done = [], 0
    with (
        Progress(share * k, desc, "sample", quiet=quiet or not w.main, scale=True) as bar,
        forked_rng(data.device, config.seed),
    ):
        for b in mine:
            x = seeded_batch(data, x_all, config.batch_size, config.seed, b)
            log_px.append(
                m2_log_likelihood(
                    run.model, run.guide, x, num_samples=config.num_samples, chunk_size=chunk,
                    progress=lambda d, base=done * k, m=x.shape[0] * classes: bar.update(
                        base + m * d
                    ),
                ).cpu()
            )  # fmt: skip
            done += x.shape[0]
    log_px = torch.cat(gather_round_robin(log_px, count))  # every rank's batches, in order
    return {
        "method": config.method,
        "label_summed_out": True,
        "split": config.split,
        "num_points": int(log_px.shape[0]),
        "nll": -log_px.mean().item(),
        "nll_standard_error": (log_px.std() / log_px.shape[0] ** 0.5).item(),
        "num_samples": config.num_samples,
        "test_accuracy": classifier_accuracy(run.guide, data, run.train_config.seed),
        "log_px": log_px.tolist(),
    }


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
    """log p(x) of a trained run on a split, by importance sampling or AIS, with diagnostics.

    ``run`` is a :class:`Run` or a run directory (loaded with ``device``, ``data_dir`` and
    ``checkpoint``: ``"best"`` or ``"last"``, by default the best where the run keeps one).
    Data points are taken ``config.batch_size`` at a time; with ``config.method`` ``"is"``
    each gets exactly ``config.num_samples`` draws from the guide (see
    :func:`ppl_vae.importance.log_likelihood_diagnostics`), with ``"ais"``
    ``config.num_chains`` annealing chains of ``config.num_steps`` steps (see
    :func:`ppl_vae.ais.annealed_log_likelihood`). Dynamically binarized data are binarized
    once, from ``config.seed``. Returns the record of ``evaluate.json``: the method, the means
    over points (``nll`` is -log p(x), in nats) and the method's diagnostics (IS: ELBO, ESS,
    IWAE bounds, Pareto k̂; AIS: mean acceptance, log-weight variance, chain ESS and step
    size under ``"ais"``), the settings, the checkpoint estimated (its epoch and SHA-256), the
    wall time and the per-point estimates. Progress goes to stderr (see
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
    if run.vae_config.model == "cvae" and config.method != "is":
        raise InputError(
            f"--method {config.method} anneals towards p(z|x) from a guide q(z|x); a "
            f"conditional VAE's log p(y|x) is estimated by --method is"
        )
    semi_supervised = run.vae_config.model == "m2"
    if semi_supervised:
        _check_m2(config)
    target = record_target(run, out, EVALUATE, "the estimate") if write else None
    with guarded(run, target, stamp):
        t0 = time.perf_counter()
        result = (_m2_estimate if semi_supervised else _estimate)(run, config, quiet)
        log_px = result.pop("log_px")
        record = {
            **result,
            "seconds": time.perf_counter() - t0,
            "epoch": run_epoch(run),
            "checkpoint": run.checkpoint,
            "chunk_size": config.chunk_size_on(run.data.device),
            "batch_size": config.batch_size,
            "seed": config.seed,
            "limit": config.limit,
            "device": str(run.data.device),
            "processes": world().size,
            "log_px": log_px,
        }
        if world().main:
            if report is not None:
                report(record)
            if target is not None:
                write_record(record, target, run, reported=report is not None,
                             what="the estimate")  # fmt: skip
    return record


def _check_m2(config: EvaluateConfig) -> None:
    """What an M2 run's estimate takes: importance sampling per class."""
    if config.method != "is":
        raise InputError(
            f"--method {config.method} anneals from a guide q(z|x) over continuous latents; "
            f"M2's label is discrete and summed out exactly: evaluate it with --method is"
        )
    if config.iwae_k is not None:
        raise InputError("--iwae-k: an M2 run reports log p(x) alone; drop --iwae-k")


def run_epoch(run: Run) -> int:
    """The epoch of the parameters estimated: the checkpoint's, else the last recorded."""
    if run.checkpoint is not None:
        return run.checkpoint["epoch"]
    return run.metrics[-1]["epoch"] if run.metrics else 0
