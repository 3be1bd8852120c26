r"""Training into a run directory: a new run, a replaced one, or one continued (``--resume``)."""

from __future__ import annotations

import contextlib
import dataclasses
import os

import pyro
import torch

from ppl_vae.cvae_images import fit_baseline
from ppl_vae.data import DataConfig, data_fingerprint, load_data
from ppl_vae.distributed import RankStopped, on_rank0_for_all, stopped_ranks, world
from ppl_vae.errors import InputError
from ppl_vae.m2 import paper_alpha
from ppl_vae.runs.checkpoint import RunConfig, RunDir
from ppl_vae.runs.files import resolve_device
from ppl_vae.runs.pictures import default_pictures, write_pictures
from ppl_vae.runs.resume import ResumePoint
from ppl_vae.runs.run import Run
from ppl_vae.runs.tensorboard import Board, check_board
from ppl_vae.selection import best_epoch
from ppl_vae.semisupervised import SemiSupervised, labelled_split
from ppl_vae.svi import TrainConfig, TrainState, collect_params, restore_params, train
from ppl_vae.vae import VAEConfig, build_vae

__all__ = ["Interrupted", "resume_run", "train_run"]


class Interrupted(KeyboardInterrupt):
    """Training was interrupted (Ctrl-C, SIGTERM); the message says what is kept."""


def train_run(
    data_config: DataConfig,
    vae_config: VAEConfig,
    train_config: TrainConfig,
    out_dir: str | os.PathLike,
    device: str = "auto",
    *,
    resume: bool = False,
    quiet: bool = False,
    pictures: bool = True,
    plot_every: int | None = None,
    overwrite: bool = False,
    tensorboard: str | os.PathLike | None = None,
) -> Run:
    """Loads data, builds the VAE and trains it, with metrics and checkpoints in ``out_dir``.

    A folder that holds a run is refused unless ``resume`` (continue it: the data, model and
    objective must be the recorded ones; only the epochs and the capture may change) or
    ``overwrite`` (replace it: the old run stays intact until the new one's first checkpoint).
    One process writes a run at a time (a lock in the folder). With ``pictures``, every picture
    that applies (:func:`ppl_vae.runs.pictures.default_pictures`) is drawn at the end, and every
    ``plot_every`` epochs. Divergence stops training with ``FloatingPointError`` naming the
    checkpoint kept. Under ``torchrun`` every rank trains and only rank 0 takes the lock and
    writes.

    Each epoch that improves on the best validation ELBO (the test ELBO without
    ``--validation``) is also kept as ``best.pt``; the run returned, and its pictures, have the
    parameters of that epoch (on rank 0 under ``torchrun``; the others', the last epoch's).

    With ``tensorboard`` (a folder outside the run's), rank 0 also logs the epochs' metrics,
    the pictures and the configuration there (:mod:`ppl_vae.runs.tensorboard`); a resumed run
    logs on from its checkpoint's epoch.
    """
    if resume and overwrite:
        raise InputError("--resume continues a run and --overwrite replaces it; choose one")
    given = RunConfig(data_config, vae_config, train_config)
    options = dict(quiet=quiet, pictures=pictures, plot_every=plot_every, tensorboard=tensorboard)
    return _train(RunDir(out_dir), given, device, resume=resume, overwrite=overwrite, **options)


def resume_run(
    out_dir: str | os.PathLike,
    changes: dict | None = None,
    device: str = "auto",
    *,
    quiet: bool = False,
    pictures: bool = True,
    plot_every: int | None = None,
    tensorboard: str | os.PathLike | None = None,
) -> Run:
    """Continues the run in ``out_dir`` with its own settings and ``changes`` laid over them
    (``{"train": {"epochs": 20}}``, as the flags of ``ppl-vae train --resume`` give them).

    A change that contradicts the record (anything but the epochs, the capture and the data
    folder) is an ``InputError`` naming its flag; otherwise as :func:`train_run` with
    ``resume=True``.
    """
    options = dict(quiet=quiet, pictures=pictures, plot_every=plot_every, tensorboard=tensorboard)
    return _train(RunDir(out_dir), changes or {}, device, resume=True, overwrite=False, **options)


def _train(
    run_dir: RunDir,
    given: RunConfig | dict,
    device: str,
    *,
    resume: bool,
    overwrite: bool,
    quiet: bool,
    pictures: bool,
    plot_every: int | None,
    tensorboard: str | os.PathLike | None,
) -> Run:
    if plot_every is not None and (isinstance(plot_every, bool) or plot_every < 1):
        raise InputError(f"plot_every must be a positive number of epochs, got {plot_every}")
    if tensorboard is not None:  # the package and the folder, before anything is loaded
        check_board(tensorboard, run_dir.path)
    point = ResumePoint.read(run_dir, given) if resume else None  # before anything is written
    if point is None:
        run_dir.check_can_hold_run(overwrite)
    run_dir.outputs.read()  # a damaged record is refused before the run changes
    config, state = (point.config, point.state) if point else (given, None)
    data = load_data(config.data, resolve_device(device))
    fingerprint = data_fingerprint(data)
    if point is not None and run_dir.data_fingerprint not in (None, fingerprint):
        raise InputError(
            f"the data of {config.data.dataset} differ from those the run in {run_dir.path} was "
            f"trained on (their fingerprint changed); --resume continues the same run on the "
            f"same data: restore the data, or start a new run with --overwrite or another --out"
        )
    run_dir.data_fingerprint = fingerprint
    pyro.set_rng_seed(config.train.seed)
    model, guide = build_vae(config.vae, data)
    trained, objective = _semi_supervised(config, data, guide)  # before the folder is made
    if objective is not None and config.labelled is None:  # a new M2 run records its points
        config = dataclasses.replace(config, labelled=tuple(objective.labelled.tolist()))
    if pictures:  # a picture of the user's in the way is refused before the first epoch
        names = default_pictures(Run(model, guide, data, config, [], run_dir.path))
        run_dir.outputs.check_replaceable([f"{name}.png" for name in names])
    created = not run_dir.path.exists()
    try:
        return _train_into(
            run_dir, config, state=state, point=point,
            built=(model, guide, data, trained, objective),
            pictures=pictures, plot_every=plot_every, quiet=quiet, tensorboard=tensorboard,
        )  # fmt: skip
    except BaseException:
        if created and not run_dir.has_checkpoint():  # bad input leaves nothing behind
            _remove_empty_run_folder(run_dir.path)
        raise


def _remove_empty_run_folder(folder) -> None:
    """Removes a run folder this command created when it holds nothing but the lock."""
    try:
        (folder / ".lock").unlink(missing_ok=True)
        folder.rmdir()
    except OSError:
        pass  # not empty, or already gone


def _train_into(
    run_dir: RunDir,
    config: RunConfig,
    *,
    state: TrainState | None,
    point: ResumePoint | None,
    built: tuple,
    pictures: bool,
    plot_every: int | None,
    quiet: bool,
    tensorboard: str | os.PathLike | None,
) -> Run:
    model, guide, data, trained, objective = built  # trained: M2's unlabelled points
    board: Board | None = None  # rank 0's TensorBoard log, with --tensorboard
    with contextlib.ExitStack() as stack:  # closes the log and the lock, also on failure

        def begin() -> None:  # rank 0 writes; only once every input has been checked
            nonlocal board
            stack.enter_context(run_dir.writing())
            if point is not None:
                point.check_unchanged(run_dir)  # the state continued is the one on disk
            run_dir.start(config, state.metrics if state is not None else [])
            if tensorboard is not None:
                first = (state.epoch if state is not None else 0) + 1
                board = stack.enter_context(Board(tensorboard, first_epoch=first))

        on_rank0_for_all(begin)  # under torchrun: a refusal on rank 0 (the lock) stops all

        def draw(run: Run) -> None:
            step = run.metrics[-1]["epoch"] if run.metrics else 0
            on_figure = None if board is None else lambda n, f: board.picture(n, f, step)
            write_pictures(run, on_figure=on_figure)

        def _run(metrics: list[dict]) -> Run:
            return Run(model, guide, data, config, metrics, run_dir.path, run_dir.identity)

        def checkpoint(s: TrainState) -> None:  # on rank 0 only
            run_dir.save(s, config, best=best_epoch(s.metrics) == s.epoch)
            if board is not None:  # the log never runs ahead of the checkpoint
                board.epoch(s.metrics[-1])
            if pictures and plot_every and s.epoch % plot_every == 0:
                draw(_run(s.metrics))

        epochs = config.vae.baseline_epochs
        if state is None and epochs is not None:  # a new CVAE run starts from its baseline
            t = config.train
            fit_baseline(model, data, epochs, batch_size=t.batch_size, lr=t.lr, seed=t.seed)
        try:
            metrics = train(
                model, guide, trained, config.train,
                resume_from=state, checkpoint=checkpoint, quiet=quiet, objective=objective,
            )  # fmt: skip
        except (FloatingPointError, InputError) as e:  # InputError: a full disk, say
            raise type(e)(f"{e}; {_kept(run_dir)}") from None
        except KeyboardInterrupt:
            gone = stopped_ranks() if world().distributed else []
            if not gone:
                raise Interrupted(_kept(run_dir)) from None
            # torchrun's SIGTERM, sent because another rank died while this one was between
            # collectives: name that rank, as a failed collective would have
            stopped = RankStopped(gone, "its process ended")
            stopped.args = (f"{stopped}; {_kept(run_dir)}",)
            raise stopped from None
        except RankStopped as e:  # under torchrun: another rank died
            e.args = (f"{e}; {_kept(run_dir)}",)
            raise
        run = _run(metrics)
        if (
            world().main
            and best_epoch(metrics) != metrics[-1]["epoch"]
            and run_dir.best_usable()  # a run from before best.pt may have none yet
        ):
            run = _at_best(run, run_dir)
        if pictures and world().main:
            try:
                draw(run)
            except KeyboardInterrupt:
                raise Interrupted(
                    f"{_kept(run_dir)}; the pictures were not drawn (ppl-vae plot draws them)"
                ) from None
            except InputError as e:  # a full disk, say: the training is kept all the same
                raise type(e)(
                    f"{e}; {_kept(run_dir)}, and the pictures were not drawn "
                    f"(ppl-vae plot draws them)"
                ) from None
        if board is not None:
            board.hparams(config, metrics)
        return run


def _semi_supervised(config: RunConfig, data, guide) -> tuple:
    """What the loop trains on: the data, or for M2 the unlabelled points and the objective
    that adds a batch of the labelled ones to each step: those recorded in the run (on
    resume), else :func:`~ppl_vae.semisupervised.labelled_split` of --labeled and --seed."""
    vae, t = config.vae, config.train
    if vae.model != "m2":
        return data, None
    if config.labelled is None:
        labelled = labelled_split(data, vae.labeled, guide.num_classes, t.seed)
    else:
        labelled = _recorded(config.labelled, vae.labeled, data.train.shape[0])
    rest = torch.ones(data.train.shape[0], dtype=torch.bool)
    rest[labelled] = False
    alpha = paper_alpha(data.train.shape[0], vae.labeled) if vae.alpha is None else vae.alpha
    objective = SemiSupervised(data, labelled, alpha=alpha, batch_size=t.batch_size, seed=t.seed,
                               balanced=vae.balanced)  # fmt: skip
    if not rest.any():
        raise InputError(
            f"--labeled {vae.labeled} labels every training point of {data.name}; leave some "
            f"unlabelled (pass a smaller --labeled)"
        )
    return data.subset(torch.nonzero(rest).squeeze(1)), objective


def _recorded(labelled: tuple[int, ...], num: int, num_train: int) -> torch.Tensor:
    """The recorded labelled points, checked: ``num`` distinct training indices."""
    index = torch.tensor(labelled, dtype=torch.long)
    if (
        len(index) != num
        or len(index.unique()) != num
        or not all(0 <= i < num_train for i in labelled)
    ):
        raise InputError(
            f"the run records {len(index)} labelled points, not {num} distinct indices of the "
            f"{num_train} training points (--labeled {num}); its config.json was changed"
        )
    return index


def _at_best(run: Run, run_dir: RunDir) -> Run:
    """``run`` with the parameters of ``best.pt``, which evaluate and plot read by default."""
    best = RunDir(run_dir.path)
    state, _ = best.load("best")
    x = run.data.encode(run.data.test[:2])
    restore_params(collect_params(run.model, run.guide, x), state.params)
    return dataclasses.replace(run, checkpoint=best.identity)


def _kept(run_dir: RunDir) -> str:
    """What an interrupted or failed run keeps: the checkpoint last written or read (a run
    continued) is the one on disk, since each is replaced whole."""
    epoch = run_dir.identity["epoch"] if run_dir.identity else 0
    if epoch:
        return f"the checkpoint of epoch {epoch} in {run_dir.path} is intact"
    if run_dir.has_checkpoint():
        return f"no epoch finished; the earlier checkpoint in {run_dir.path} is untouched"
    return "no epoch finished, so no checkpoint was written"
