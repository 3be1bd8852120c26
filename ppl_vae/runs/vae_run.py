r"""VAE runs on disk: train into a run directory, load one back, evaluate its log p(x)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pyro
import torch

from ppl_vae.config import check_positive, option
from ppl_vae.data import Data, DataConfig, load_data
from ppl_vae.distributed import agree, all_gather_objects, world
from ppl_vae.errors import InputError
from ppl_vae.guides import AmortizedGuide
from ppl_vae.importance import LogLikelihood, default_chunk_size, log_likelihood_diagnostics
from ppl_vae.model import VAEModel
from ppl_vae.plots import (
    curves_figure,
    density_figure,
    interpolation_figure,
    latent_figure,
    manifold_figure,
    reconstructions_figure,
    samples_figure,
)
from ppl_vae.progress import Progress, time_left
from ppl_vae.registry import Registry
from ppl_vae.rng import derived_seed, forked_rng, seed_streams
from ppl_vae.runs.checkpoint import EVALUATE, RunConfig, RunDir
from ppl_vae.runs.files import make_output_dir, resolve_device, save_figure, write_json
from ppl_vae.svi import TrainConfig, TrainState, collect_params, restore_params, train
from ppl_vae.vae import VAEConfig, build_vae

__all__ = [
    "PICTURES",
    "EvaluateConfig",
    "Interrupted",
    "Run",
    "evaluate_run",
    "default_pictures",
    "load_run",
    "plot_run",
    "resumed_config",
    "train_run",
    "write_pictures",
]

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


def _needs(run: Run, what: str, ok: bool, name: str) -> None:
    if not ok:
        raise InputError(f"the {name} picture needs {what}; this run's data are {run.data.name}")


def _images(run: Run, name: str) -> None:
    _needs(run, "images", run.data.is_image, name)


def _manifold(run: Run):
    _images(run, "manifold")
    dim = run.model.latent_dim
    _needs(run, f"a 2-D latent (this run's has {dim} dimensions)", dim == 2, "manifold")
    return manifold_figure(run.model)


def _density(run: Run):
    _needs(run, "2-D data", run.data.event_shape == (2,), "density")
    return density_figure(run.model, run.guide, run.data)


PICTURES: Registry = Registry("picture")
PICTURES.register("curves", lambda run: curves_figure(run.metrics), help="ELBO per epoch")
PICTURES.register(
    "samples", lambda run: samples_figure(run.model, run.data), help="decoded prior draws"
)
PICTURES.register(
    "reconstructions",
    lambda run: reconstructions_figure(run.model, run.guide, run.data),
    help="test inputs above their reconstructions",
)
PICTURES.register(
    "interpolation",
    lambda run: (
        _images(run, "interpolation") or interpolation_figure(run.model, run.guide, run.data)
    ),
    help="decodings between posterior means of test images",
)
PICTURES.register(
    "latent", lambda run: latent_figure(run.guide, run.data), help="posterior means by label"
)
PICTURES.register("manifold", _manifold, help="decodings on a grid of prior quantiles (2-D z)")
PICTURES.register("density", _density, help="data and model log-density (2-D data)")


def default_pictures(run: Run) -> tuple[str, ...]:
    """The pictures that apply to ``run``: images or 2-D points, and the latent's size."""
    if run.data.is_image:
        names = ["curves", "samples", "reconstructions", "interpolation", "latent"]
        return (*names, "manifold") if run.model.latent_dim == 2 else tuple(names)
    if run.data.event_shape == (2,):
        return ("curves", "samples", "density", "latent")
    return ("curves", "samples", "reconstructions", "latent")


def write_pictures(
    run: Run, out_dir: str | os.PathLike | None = None, names: tuple[str, ...] | None = None
) -> list[Path]:
    """Draws ``names`` (default: every picture that applies) as ``NAME.png`` into ``out_dir``
    (default: the run's folder). Draws come from forked random streams, so drawing leaves a
    training run's streams, and so its numbers, unchanged."""
    names = default_pictures(run) if names is None else tuple(names)
    for name in names:
        PICTURES.check(name)
    out = Path(out_dir) if out_dir is not None else run.directory
    written = []
    with forked_rng(run.data.device, 0):
        for name in names:
            written.append(save_figure(PICTURES[name].factory(run), out / f"{name}.png"))
    return written


def plot_run(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    names: tuple[str, ...] | None = None,
    device: str = "auto",
    data_dir: str | None = None,
) -> list[Path]:
    """Draws the pictures of a finished or running run from its checkpoint and
    ``metrics.jsonl``, into ``out_dir`` (default: the run's folder); changes neither."""
    for name in names or ():
        PICTURES.check(name)
    run = load_run(run_dir, device, data_dir=data_dir)
    lines = RunDir(run_dir).read_metrics()
    if lines:
        run.metrics = lines
    out = make_output_dir(out_dir) if out_dir is not None else run.directory
    return write_pictures(run, out, names)


CHANGEABLE = ("epochs", "capture")  # training settings a resumed run may change


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
    name = path.split(".")[-1]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if "." in path:  # a nested configuration (the network)
        return _flag(type(getattr(cls(), path.split(".")[0])), path.split(".", 1)[1])
    flags = fields[name].metadata.get("flags") if name in fields else None
    return flags[0] if flags else f"--{name.replace('_', '-')}"


def check_resume(saved: RunConfig, config: RunConfig, finished: int, run_dir: Path) -> None:
    """An error naming the first setting of ``config`` that contradicts the run's own."""
    allowed = ", ".join(f"--{n}" for n in CHANGEABLE)
    for cls, a, b in (
        (DataConfig, replace(saved.data, data_dir=None), replace(config.data, data_dir=None)),
        (VAEConfig, saved.vae, config.vae),
        (TrainConfig, replace(saved.train, epochs=1, capture=True),
         replace(config.train, epochs=1, capture=True)),
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
    if config.train.epochs <= finished:
        raise InputError(
            f"the run in {run_dir} has finished {finished} epochs, so --epochs "
            f"{config.train.epochs} leaves nothing to do; pass a larger --epochs"
        )


def resumed_config(run_dir: str | os.PathLike, given: dict[str, dict]) -> RunConfig:
    """The run's recorded configuration with the ``given`` settings applied over it
    (``{"data": {...}, "vae": {..., "network": {...}}, "train": {...}}``, as flags give them);
    :func:`train_run` then refuses any that contradicts the record."""
    _, saved = RunDir(run_dir).load()

    def overlay(config, values: dict):
        plain = {k: v for k, v in values.items() if not isinstance(v, dict)}
        nested = {
            k: overlay(getattr(config, k), v) for k, v in values.items() if isinstance(v, dict)
        }
        return replace(config, **plain, **nested)

    return RunConfig(
        overlay(saved.data, given.get("data", {})),
        overlay(saved.vae, given.get("vae", {})),
        overlay(saved.train, given.get("train", {})),
    )


def train_run(
    data_config: DataConfig,
    vae_config: VAEConfig,
    train_config: TrainConfig,
    out_dir: str | os.PathLike,
    device: str = "auto",
    resume: bool = False,
    quiet: bool = False,
    pictures: bool = True,
    plot_every: int | None = None,
    overwrite: bool = False,
) -> Run:
    """Loads data, builds the VAE and trains it, with metrics and checkpoints in ``out_dir``.

    A folder that holds a run is refused unless ``resume`` (continue it: the data, model and
    objective must be the recorded ones; only the epochs and the capture may change) or
    ``overwrite`` (replace it: the old run stays intact until the new one's first checkpoint).
    One process writes a run at a time (a lock in the folder). With ``pictures``, every picture
    that applies (:func:`default_pictures`) is drawn at the end, and every ``plot_every``
    epochs. Divergence stops training with ``FloatingPointError`` naming the checkpoint kept.
    Under ``torchrun`` every rank trains and only rank 0 takes the lock and writes.
    """
    if plot_every is not None and (isinstance(plot_every, bool) or plot_every < 1):
        raise InputError(f"plot_every must be a positive number of epochs, got {plot_every}")
    if resume and overwrite:
        raise InputError("--resume continues a run and --overwrite replaces it; choose one")
    run_dir = RunDir(out_dir)
    with contextlib.ExitStack() as stack:
        state = None
        if resume:
            state, saved = run_dir.load()  # checked before anything is written
            check_resume(saved, RunConfig(data_config, vae_config, train_config), state.epoch,
                         run_dir.path)  # fmt: skip
            data_config = replace(saved.data, data_dir=data_config.data_dir)
            vae_config = saved.vae
        elif run_dir.holds_run() and not overwrite:
            raise InputError(
                f"{run_dir.path} holds a run already; pass --resume to continue it, "
                f"--overwrite to replace it, or choose another --out"
            )
        config = RunConfig(data_config, vae_config, train_config)
        dev = resolve_device(device)
        data = load_data(data_config, dev)
        pyro.set_rng_seed(train_config.seed)
        model, guide = build_vae(vae_config, data)

        def begin() -> None:  # rank 0 writes; only once every input has been checked
            nonlocal state
            stack.enter_context(run_dir.writing())
            if resume:
                state, _ = run_dir.load()  # as the lock holder sees it
            run_dir.start(config, state.metrics if state is not None else [])

        agree(begin)  # under torchrun: a refusal on rank 0 (the lock) stops every rank
        saved_epoch = state.epoch if state is not None else 0

        def checkpoint(s: TrainState) -> None:
            nonlocal saved_epoch
            run_dir.save(s, config)
            saved_epoch = s.epoch
            if pictures and plot_every and s.epoch % plot_every == 0:
                write_pictures(Run(model, guide, data, config, s.metrics, run_dir.path))

        try:
            metrics = train(
                model, guide, data, train_config,
                resume_from=state, checkpoint=checkpoint, quiet=quiet,
            )  # fmt: skip
        except FloatingPointError as e:
            raise FloatingPointError(f"{e}; {_kept(run_dir, saved_epoch)}") from None
        except KeyboardInterrupt:
            raise Interrupted(_kept(run_dir, saved_epoch)) from None
        run = Run(model, guide, data, config, metrics, run_dir.path)
        if pictures and world().main:
            write_pictures(run)
        return run


class Interrupted(KeyboardInterrupt):
    """Training was interrupted (Ctrl-C, SIGTERM); the message says what is kept."""


def _kept(run_dir: RunDir, epoch: int) -> str:
    if epoch:
        return f"the checkpoint of epoch {epoch} in {run_dir.path} is intact"
    if run_dir.has_checkpoint():
        return f"no epoch finished; the earlier checkpoint in {run_dir.path} is untouched"
    return "no epoch finished, so no checkpoint was written"


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
    return LogLikelihood(r.log_px.cpu(), r.elbo.cpu(), r.ess.cpu(), iwae, r.num_samples)


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
    desc = f"log p(x), {config.split}" + (f", rank 0 of {w.size}" if w.active else "")
    with (
        Progress(share * k, desc, "draw", quiet=quiet or not w.main, scale=True) as progress,
        forked_rng(data.device, config.seed),
    ):
        for start in mine:
            g = seed_streams(data.device, derived_seed(config.seed, start // config.batch_size))
            x = data.encode(x_all[start : start + config.batch_size], generator=g)
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
    if w.active:  # every rank's batches, back in the order of the points
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
) -> dict:
    """Importance-sampled log p(x) of a trained run on a split, with diagnostics.

    ``run`` is a :class:`Run` or a run directory (loaded with ``device`` and ``data_dir``).
    Data points are taken ``config.batch_size`` at a time, each with exactly
    ``config.num_samples`` draws from the guide (see
    :func:`ppl_vae.importance.log_likelihood`); dynamically binarized data are binarized once,
    from ``config.seed``. Returns the record of ``evaluate.json`` — the means over points
    (``nll`` is -log p(x), in nats), the settings, the wall time and the per-point estimates —
    and, with ``write``, writes it into the run's directory. Progress goes to stderr (see
    :mod:`ppl_vae.progress`) unless ``quiet``.
    """
    config = config or EvaluateConfig()
    if not isinstance(run, Run):
        run = load_run(run, device, data_dir=data_dir)
    t0 = time.perf_counter()
    result = _estimate(run, config, quiet)
    log_px = result.pop("log_px")
    record = {
        **result,
        "seconds": time.perf_counter() - t0,
        "epoch": run.metrics[-1]["epoch"] if run.metrics else 0,
        "chunk_size": config.chunk_size_on(run.data.device),
        "batch_size": config.batch_size,
        "seed": config.seed,
        "limit": config.limit,
        "device": str(run.data.device),
        "processes": world().size,
        "log_px": log_px,
    }
    if write and run.directory is not None and world().main:
        write_json(record, run.directory / EVALUATE)
    return record
