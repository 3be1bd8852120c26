r"""Stochastic variational inference: the training loop, with an epoch callback; no files."""

from __future__ import annotations

import copy
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO
from torch import Tensor
from tqdm.auto import tqdm

from ppl_vae.capture import CapturedLoss
from ppl_vae.config import check_memory, check_number, check_positive, check_seed, option
from ppl_vae.data import Data
from ppl_vae.distributed import (
    World,
    all_gather_objects,
    all_reduce_sum,
    batch_shard,
    reduce_gradients,
    world,
)
from ppl_vae.distributions import first_order_gradients
from ppl_vae.errors import InputError
from ppl_vae.graphs import GraphedSteps, graphs_off_reason
from ppl_vae.losses import LOSSES, IWAELoss, scale_latent
from ppl_vae.optim import adam, load_adam_state
from ppl_vae.progress import Progress, time_left
from ppl_vae.rng import (
    derived_seed,
    forked_rng,
    rng_state,
    saved_device,
    seed_streams,
    set_rng_state,
)
from ppl_vae.schedules import SCHEDULES, Schedule
from ppl_vae.selection import best_epoch, stops, watched
from ppl_vae.semisupervised import SemiSupervised
from ppl_vae.sites import LATENT, check_points, sample_sites, trace_guide_and_model

__all__ = [
    "GradientClip",
    "LoopState",
    "ReseededStreamWarning",
    "StepLosses",
    "TrainConfig",
    "TrainState",
    "check_programs",
    "collect_params",
    "init_state",
    "kl_weight",
    "make_loss",
    "mean_elbo",
    "run_epoch",
    "shard_step",
    "snapshot",
    "step_loss",
    "stopped_early",
    "svi_step",
    "train",
]


@dataclass(frozen=True)
class TrainConfig:
    """How to run stochastic variational inference."""

    epochs: int = option(10, "passes over the training set (with --resume: the new total)")
    batch_size: int = option(
        100, "data points per SVI step, over all processes (under torchrun each takes its share)"
    )
    lr: float = option(1e-3, "Adam learning rate (the base rate of --lr-schedule)")
    clip_grad: float | None = option(
        None, "clip each step's gradient (of the loss per training point) to this global norm "
        "(default: none); the mean norm before clipping is recorded per epoch as grad_norm, "
        "the share of steps clipped as clipped",
    )  # fmt: skip
    lr_schedule: str = option(
        "constant", f"the learning rate per epoch, recorded as lr in metrics.jsonl: "
        f"{SCHEDULES.help()}", choices=SCHEDULES,
    )  # fmt: skip
    lr_warmup: int | None = option(None, "cosine: epochs of linear warm-up (default 0)")
    lr_floor: float | None = option(
        None, "cosine: the rate reached at --epochs; plateau: the lowest rate (default 0)"
    )
    lr_factor: float | None = option(None, "plateau: the factor of each cut (default 0.5)")
    lr_patience: int | None = option(
        None, "plateau: epochs without a better validation ELBO before a cut (default 10)"
    )
    loss: str = option(
        "meanfield", "the training objective; meanfield, the default, takes the KL term in "
        "closed form where the guide's family has one (0.61 +- 0.04 nats lower test NLL than "
        "elbo after 50 MNIST epochs, docs/RESULTS.md)", choices=LOSSES,
    )  # fmt: skip
    num_particles: int = option(
        1, "vectorized particles per step: ELBO draws averaged, or the IWAE k"
    )
    beta: float = option(1.0, "final weight of the KL term (log p(z) - log q(z|x))")
    kl_warmup: int = option(0, "epochs over which the KL weight rises linearly from 0 to beta")
    kl_delay: int = option(
        0,
        "epochs at KL weight 0 before the warm-up (q(z|x) learns to carry x first; the "
        "VampPrior collapses without it, docs/RESULTS.md)",
    )
    seed: int = option(0, "seeds parameters, batching, binarization and latent draws")
    eval_batch_size: int = option(
        1000, "rows per batch when computing the test and validation ELBO"
    )
    validation: int = option(
        0, "training points held out at random (seeded by --seed) as a validation set: its "
        "ELBO is recorded per epoch as validation_elbo and chooses best.pt, --patience and "
        "the plateau schedule; without one they watch the test ELBO (0: none; papers use "
        "10000 on MNIST)",
    )  # fmt: skip
    patience: int | None = option(
        None, "stop early when the validation ELBO (the test ELBO without --validation) has "
        "not improved for this many epochs (default: train every epoch)",
    )  # fmt: skip
    capture: bool = option(
        True, "replay a checked record of each step's tensor operations instead of running "
        "the Pyro program again (same numbers, less Python per step)",
    )  # fmt: skip
    compile: bool | None = option(
        None, "compile each step's record with torch.compile (inductor), checked against the "
        "program like the record; on one CPU thread the compiled step took 0.84-0.87 of the "
        "record's time after 5-15 s of compiling per batch shape (docs/BENCHMARKS.md). "
        "Default: decided after the first epoch at the final KL weight: on (CPU with a C++ "
        "compiler) when the epochs left would take 10 minutes or more uncompiled",
    )  # fmt: skip
    cuda_graphs: bool | None = option(
        None, "replay each recorded step (forward, backward, gradient clip, fused Adam) as a "
        "CUDA graph, one launch a step (docs/BENCHMARKS.md). Default: on with --device cuda "
        "in one process; where it cannot be, the step runs without, with a warning naming why",
    )  # fmt: skip

    def __post_init__(self):
        check_positive(self, "epochs", "batch_size", "num_particles", "eval_batch_size")
        if isinstance(self.validation, bool) or not isinstance(self.validation, int):
            raise InputError(
                f"validation must be a whole number of points, got {self.validation!r}"
            )
        if self.validation < 0:
            raise InputError(
                f"validation must be >= 0 points, got {self.validation}; pass --validation 0 "
                f"for none or e.g. 10000"
            )
        if self.patience is not None and (
            isinstance(self.patience, bool) or not isinstance(self.patience, int)
            or self.patience < 1
        ):  # fmt: skip
            raise InputError(
                f"patience must be a whole number of epochs >= 1, got {self.patience!r}; drop "
                f"--patience to train every epoch"
            )
        if self.clip_grad is not None:
            check_number(
                "clip_grad", self.clip_grad, hint="pass --clip-grad with a positive norm, e.g. 100"
            )
        check_seed("seed", self.seed)
        if not _finite_number(self.lr) or not self.lr > 0:
            raise InputError(
                f"learning rate must be positive and finite, got {self.lr!r}; pass --lr between "
                f"1e-5 and 1e-1 (Adam's usual range; the default is 1e-3)"
            )
        hint = "pass --beta 1 (the ELBO) or another KL weight, usually between 0 and 10"
        check_number("beta", self.beta, allow_low=True, hint=hint)
        if isinstance(self.kl_warmup, bool) or not isinstance(self.kl_warmup, int):
            raise InputError(f"kl_warmup must be a whole number of epochs, got {self.kl_warmup!r}")
        if self.kl_warmup < 0:
            raise InputError(f"kl_warmup must be >= 0 epochs, got {self.kl_warmup}")
        if isinstance(self.kl_delay, bool) or not isinstance(self.kl_delay, int):
            raise InputError(f"kl_delay must be a whole number of epochs, got {self.kl_delay!r}")
        if self.kl_delay < 0:
            raise InputError(f"kl_delay must be >= 0 epochs, got {self.kl_delay}")
        LOSSES.check(self.loss)
        SCHEDULES.check(self.lr_schedule)
        if self.lr_warmup is not None and (
            isinstance(self.lr_warmup, bool) or not isinstance(self.lr_warmup, int)
            or not 0 <= self.lr_warmup < self.epochs
        ):  # fmt: skip
            raise InputError(
                f"lr_warmup must be a whole number of epochs in [0, --epochs), got "
                f"{self.lr_warmup!r}"
            )
        if self.lr_floor is not None and not (
            _finite_number(self.lr_floor) and 0 <= self.lr_floor < self.lr
        ):
            raise InputError(f"lr_floor must lie in [0, --lr), got {self.lr_floor!r}")
        if self.schedule().monitors and not self.validation:  # (checks the options too)
            raise InputError(
                f"the {self.lr_schedule} schedule watches the validation ELBO; pass --validation "
                f"N to hold out N training points (e.g. 10000 on MNIST)"
            )
        if self.compile and not self.capture:
            raise InputError("--compile compiles the step's record: drop --no-capture")
        if self.cuda_graphs and not self.capture:
            raise InputError("--cuda-graphs replays the step's record: drop --no-capture")
        if self.loss == "iwae" and (self.kl_warmup or self.kl_delay or self.beta != 1.0):
            raise InputError(
                "KL warm-up, delay and beta weight the ELBO's KL term; the iwae loss has none: "
                "drop --kl-warmup/--kl-delay/--beta or use --loss elbo"
            )

    def schedule_options(self) -> dict:
        """The options of the learning-rate schedule that are set."""
        names = ("lr_warmup", "lr_floor", "lr_factor", "lr_patience")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}

    def schedule(self) -> Schedule:
        """The learning-rate schedule (checked: an option of another schedule is an error)."""
        options = self.schedule_options()
        SCHEDULES.check_options(self.lr_schedule, options, prefix="--")
        return SCHEDULES.build(self.lr_schedule, self.epochs, **options)


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class TrainState:
    """Everything needed to continue training exactly: what a checkpoint holds of the loop."""

    epoch: int  # the last finished epoch
    params: dict[str, Tensor]  # unconstrained parameters by Pyro name, on the CPU
    optimizer: dict  # the Adam state dict
    rng: dict  # see ppl_vae.rng.rng_state
    metrics: list[dict]  # one dictionary per finished epoch
    untrained_elbo: float | None = None  # the test ELBO before training, for divergence checks


def make_loss(config: TrainConfig) -> ELBO | IWAELoss:
    """The loss ``config.loss`` names, with ``config.num_particles`` vectorized particles."""
    return LOSSES.build(config.loss, num_particles=config.num_particles)


def kl_weight(epoch: int, config: TrainConfig) -> float:
    """The KL weight during 1-based ``epoch``: 0 for the first ``kl_delay`` epochs, then rising
    linearly to ``beta`` over ``kl_warmup``."""
    epoch -= config.kl_delay
    if epoch <= 0:
        return 0.0
    if config.kl_warmup == 0:
        return config.beta
    return config.beta * min(1.0, epoch / config.kl_warmup)


def collect_params(model: Callable, guide: Callable, *args, **kwargs) -> dict[str, Tensor]:
    """The unconstrained parameters that ``model`` and ``guide`` register, by name."""
    with poutine.trace(param_only=True) as tr:
        guide(*args, **kwargs)
        model(*args, **kwargs)
    params = {name: site["value"].unconstrained() for name, site in tr.trace.nodes.items()}
    return dict(sorted(params.items()))


def restore_params(params: dict[str, Tensor], saved: dict[str, Tensor]) -> None:
    """Copies ``saved`` values into ``params`` in place; names and shapes must match."""
    if params.keys() != saved.keys():
        missing, extra = params.keys() - saved.keys(), saved.keys() - params.keys()
        raise InputError(
            f"checkpoint parameters do not match the model and guide (missing {sorted(missing)}, "
            f"unexpected {sorted(extra)}); was it written for another architecture?"
        )
    with torch.no_grad():
        for name, p in params.items():
            if p.shape != saved[name].shape:
                raise InputError(
                    f"checkpoint parameter {name} has shape {tuple(saved[name].shape)}, the model "
                    f"has {tuple(p.shape)}; was it written for another architecture?"
                )
            p.copy_(saved[name])


@torch.no_grad()
def mean_elbo(
    model: Callable,
    guide: Callable,
    data: Data,
    split: Literal["test", "train", "validation"] = "test",
    batch_size: int = 1000,
    *,
    seed: int = 0,
    num_particles: int = 1,
    objective: SemiSupervised | None = None,
) -> float:
    """The mean ELBO per data point (nats) on ``split``, at full KL weight.

    Batch ``b`` of the split draws its binarization and latents from the seed
    ``derived_seed(seed, b)`` in forked streams, so the figure is a deterministic function of
    the parameters, the caller's streams are left alone, and under ``torchrun`` (each rank
    takes every ``size``-th batch, the sums are reduced) it is the one-process figure. With an
    ``objective`` (:class:`~ppl_vae.semisupervised.SemiSupervised`), its bound of an unlabelled
    batch.
    """
    elbo = objective or LOSSES.build("elbo", num_particles=num_particles)
    w = world()
    x_all = {"test": data.test, "train": data.train, "validation": data.validation}[split]
    total = torch.zeros((), dtype=torch.float64, device=data.device)
    with forked_rng(data.device, seed):
        for b, start in enumerate(range(0, x_all.shape[0], batch_size)):
            if b % w.size == w.rank:
                g = seed_streams(data.device, derived_seed(seed, b))
                x = data.encode(x_all[start : start + batch_size], generator=g)
                total -= elbo.differentiable_loss(model, guide, x)
    return float(all_reduce_sum(total)) / x_all.shape[0]


def svi_step(
    loss: Callable[..., Tensor],
    optimizer: torch.optim.Optimizer,
    *args,
    before_update: Callable[[], None] | None = None,
    **kwargs,
) -> Tensor:
    """One SVI step: ``loss(*args, **kwargs)``, its gradient, one optimizer step.

    ``loss`` returns a differentiable loss tensor, e.g.
    ``functools.partial(elbo.differentiable_loss, model, guide)`` or a
    :class:`~ppl_vae.capture.CapturedLoss`. One ``torch.optim`` optimizer over all parameters
    replaces Pyro's one-optimizer-per-parameter wrapper, and the loss comes back as a tensor, so
    a step makes no host synchronisation. ``before_update`` runs between the gradient and the
    update (under ``torchrun``: the gradients' all-reduce).
    """
    value = loss(*args, **kwargs)
    value.backward()
    if before_update is not None:
        before_update()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return value.detach()


COMPILE_PAYS_SECONDS = 600.0
"""Uncompiled training time left from which ``TrainConfig.compile``'s default turns it on (CPU):
the compiled step took 0.84-0.87 of the record's time after 5-15 s of compiling per batch shape
(docs/BENCHMARKS.md), so ten minutes saves some 80 s against at most 30 s of compiling."""


def can_compile_by_default(config: TrainConfig, device: torch.device) -> bool:
    """Whether ``config.compile``'s default (None) may turn compiling on: a recorded step on a
    CPU with a C++ compiler. CUDA stays uncompiled by default: its pay-back is not measured."""
    if config.compile is not None or not config.capture or device.type != "cpu":
        return False
    return any(shutil.which(c) for c in (os.environ.get("CXX") or "g++", "c++"))


def step_loss(
    elbo: ELBO | IWAELoss,
    model: Callable,
    guide: Callable,
    params: dict[str, Tensor],
    *,
    capture: bool = True,
    compile: bool = False,
) -> Callable[..., Tensor]:
    """``elbo``'s differentiable loss of ``model`` and ``guide``, captured if ``capture``
    (and the record compiled if ``compile``)."""

    def loss(*args, **kwargs) -> Tensor:
        with first_order_gradients():  # the step takes one gradient of it
            return elbo.differentiable_loss(model, guide, *args, **kwargs)

    return CapturedLoss(loss, params.values(), compile=compile) if capture else loss


class StepLosses:
    """The step loss for each KL weight, made on first use and rechecked every epoch.

    ``StepLosses(model, guide, params, config=config)(weight)`` is the loss that
    :func:`svi_step` takes, with the KL term weighted by ``weight``.
    """

    def __init__(
        self,
        model,
        guide,
        params,
        *,
        config: TrainConfig,
        objective: SemiSupervised | None = None,
        undecided: bool = False,
    ):
        self.model, self.guide, self.params, self.config = model, guide, params, config
        self.compile = bool(config.compile)
        self.undecided = undecided  # the default's choice to compile is still to be made
        self.objective = objective  # a SemiSupervised objective (M2), or None: config.loss
        self.elbo = objective or make_loss(config)
        self.losses: dict[float, Callable[..., Tensor]] = {}

    def __call__(self, weight: float) -> Callable[..., Tensor]:
        if weight not in self.losses:
            model, guide = self.model, self.guide
            if weight != 1.0:
                sites = frozenset(getattr(model, "latent_sites", (LATENT,)))
                model, guide = (
                    scale_latent(weight, sites)(model),
                    scale_latent(weight, sites)(guide),
                )
            self.losses[weight] = step_loss(
                self.elbo, model, guide, self.params, capture=self.config.capture,
                compile=self.compile,
            )  # fmt: skip
        loss = self.losses[weight]
        if isinstance(loss, CapturedLoss):
            loss.recheck()  # the program may have changed since (e.g. by on_epoch)
        return loss

    def compile_from_now(self) -> None:
        """Compiles the records from the next use on (made again, then compiled)."""
        self.compile, self.undecided = True, False
        self.losses.clear()

    @property
    def compile_seconds(self) -> float:
        """Seconds spent compiling records so far (``TrainConfig.compile``)."""
        return sum(getattr(loss, "compile_seconds", 0.0) for loss in self.losses.values())


def kl_weight_note(metrics: dict) -> str:
    """ " (KL weight w)" after an epoch's training objective when it was not the ELBO's weight 1
    (a warm-up, or ``--beta``): the figure is then not comparable with the test ELBO."""
    weight = metrics.get("kl_weight", 1.0)
    return "" if weight == 1 else f" (KL weight {weight:g})"


def _report(metrics: dict, epochs: int, *, done: int, elapsed: float) -> None:
    """One line per epoch on stderr; on a terminal it stays above the next epoch's bar."""
    held = metrics.get("validation_elbo")
    tqdm.write(
        f"epoch {metrics['epoch']}/{epochs}: train {metrics['train_elbo']:.3f}"
        f"{kl_weight_note(metrics)}, "
        + (f"validation {held:.3f}, " if held is not None else "")
        + f"test ELBO {metrics['test_elbo']:.3f} nats, "
        + (f"test accuracy {metrics['test_accuracy']:.4f}, " if "test_accuracy" in metrics else "")
        + f"{metrics['seconds']:.1f} s"
        + (
            f" (compiling the step: {metrics['compile_seconds']:.1f} s)"
            if "compile_seconds" in metrics
            else ""
        )
        + time_left(done, done + epochs - metrics["epoch"], elapsed),
        file=sys.stderr,
    )


def _diverged(epoch: int) -> FloatingPointError:
    return FloatingPointError(
        f"the loss became NaN or infinite in epoch {epoch}; lower --lr or check the data"
    )


def _check_divergence(
    test: float,
    epoch: int,
    *,
    history: list[dict],
    untrained: float | None,
    warming: bool = False,
    unweighted: bool = False,
) -> None:
    """Training has diverged when the test ELBO is not finite, falls below the untrained
    model's by more than max(1, 10%) nats, or falls more than half its size (plus one nat)
    below the best so far: e.g. below -151 after a best of -100. During a KL warm-up
    (``warming``) the margin below the untrained ELBO is that of the best, half its size plus
    one nat: trained on a down-weighted KL, q(z|x) moves away from the prior first, and the
    test ELBO may fall below the untrained one (on moons from -6.51 to -9.07 in epoch 1)
    before it rises. At KL weight 0 (``unweighted``) the ELBO is not what training raises (its
    KL term may grow by orders of magnitude), so only a test ELBO that is not finite is."""
    if unweighted:
        if not math.isfinite(test):
            raise FloatingPointError(
                f"training diverged in epoch {epoch}: the test ELBO is {test}; lower --lr or "
                f"check the data"
            )
        return
    best = max((m["test_elbo"] for m in history), default=None)
    low = not math.isfinite(test)
    if untrained is not None and math.isfinite(untrained):
        margin = 0.5 * abs(untrained) + 1.0 if warming else max(1.0, 0.1 * abs(untrained))
        low = low or test < untrained - margin
    if best is not None:
        low = low or test < best - 0.5 * abs(best) - 1.0
    if low:
        seen = f"best so far {best:.6g}, " if best is not None else ""
        before = f"untrained {untrained:.6g}" if untrained is not None else "untrained unknown"
        raise FloatingPointError(
            f"training diverged in epoch {epoch}: the test ELBO fell to {test:.6g} nats "
            f"({seen}{before}); lower --lr or check the data"
        )


def shard_step(
    loss: Callable[..., Tensor],
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    *,
    params: list[Tensor],
    num_data: int,
    w: World,
    before_update: Callable[[], None] | None = None,
) -> Tensor:
    """:func:`svi_step` under ``torchrun`` on the global batch ``x``: this rank's rows, the
    gradients of ``params`` summed over the ranks with each weighted by its share (the gradient
    of the whole batch's loss), then ``before_update`` (on the summed gradients, alike on
    every rank). Returns this rank's share of the batch's loss."""
    part = batch_shard(x.shape[0], w)
    share = (part.stop - part.start) / x.shape[0]

    def reduce() -> None:
        reduce_gradients(params, share)
        if before_update is not None:
            before_update()

    if share == 0:  # fewer rows than ranks: no loss here, zeros to the all-reduce
        reduce()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return torch.zeros((), device=x.device)
    return svi_step(loss, optimizer, x[part], num_data, before_update=reduce) * share


def semi_supervised_shard_step(
    loss: Callable[..., Tensor],
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    labelled: tuple[Tensor, Tensor, int],
    *,
    params: list[Tensor],
    num_data: int,
    w: World,
    before_update: Callable[[], None] | None = None,
) -> Tensor:
    """:func:`shard_step` for M2 (:class:`~ppl_vae.semisupervised.SemiSupervised`): the
    unlabelled batch ``x`` and the ``labelled`` one ``(x, y, num_labelled)`` are each split
    across the ranks, and the loss weights this rank's part of each by its share of that batch
    (the two shares differ where the batches' sizes do), so that the gradients summed over the
    ranks are those of the whole step. Returns this rank's part of the step's loss."""
    x_l, y_l, num_labelled = labelled
    part, part_l = batch_shard(x.shape[0], w), batch_shard(x_l.shape[0], w)
    shares = ((part.stop - part.start) / x.shape[0], (part_l.stop - part_l.start) / x_l.shape[0])

    def reduce() -> None:
        reduce_gradients(params, 1.0)  # each part is weighted in the loss already
        if before_update is not None:
            before_update()

    if shares == (0.0, 0.0):  # fewer rows than ranks in both: zeros to the all-reduce
        reduce()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return torch.zeros((), device=x.device)
    args = (x[part], num_data, x_l[part_l], y_l[part_l], num_labelled, shares)
    return svi_step(loss, optimizer, *args, before_update=reduce)


class ReseededStreamWarning(UserWarning):
    """A resumed run's data stream was saved on another device type and cannot continue here:
    it goes on from a new seed, reproducibly but not bit-identically to an unmoved run."""


@dataclass
class LoopState:
    """The training loop between two epochs: live objects that :func:`run_epoch` changes in
    place; :func:`snapshot` turns them into a :class:`TrainState` for a checkpoint."""

    epoch: int  # the last finished epoch (0 before the first)
    params: dict[str, Tensor]  # the unconstrained parameters by Pyro name, as trained
    optimizer: torch.optim.Optimizer  # Adam over ``params``
    generator: torch.Generator  # batch order and binarization, alike on every rank
    losses: StepLosses  # the model, the guide and their step loss for each KL weight
    metrics: list[dict]  # one dictionary per finished epoch
    untrained_elbo: float | None  # the test ELBO before training, for divergence checks
    notice: str | None = None  # a line for the user after this epoch's (the compile decision)
    step: Callable[..., Tensor] = svi_step  # or GraphedSteps (TrainConfig.cuda_graphs)


def init_state(
    model: Callable,
    guide: Callable,
    data: Data,
    config: TrainConfig,
    *,
    resume_from: TrainState | None = None,
    objective: SemiSupervised | None = None,
) -> LoopState:
    """The loop's state before its first epoch, or after ``resume_from``'s last.

    Clears Pyro's param store, seeds the streams from ``config.seed``, registers the parameters
    by running ``model`` and ``guide`` once on a batch, and makes the Adam optimizer (fused
    where torch has the kernel, :func:`ppl_vae.optim.adam`); then restores what
    ``resume_from`` holds, or else computes the untrained test ELBO. Under ``torchrun`` every
    rank starts from the same parameters and data stream and draws its latents from a stream
    of its own. A data stream that cannot continue on this device is reseeded, with a
    :class:`ReseededStreamWarning` (from rank 0).
    """
    device, w = data.device, world()
    pyro.clear_param_store()
    pyro.set_rng_seed(config.seed)
    generator = torch.Generator(device=device).manual_seed(config.seed)  # alike on every rank
    x0 = data.encode(
        data.train[: config.batch_size], generator=torch.Generator(device).manual_seed(0)
    )
    args, kwargs = _program_args(objective, x0, data.train.shape[0])
    params = collect_params(model, guide, *args, **kwargs)
    if not params:
        raise InputError(
            "the model and guide register no parameters; use pyro.module or pyro.param"
        )
    if w.rank > 0:  # the same initial parameters (seed), then each rank its own latent draws
        pyro.set_rng_seed(derived_seed(config.seed, "rank", w.rank))
    schedule = config.schedule()
    optimizer = adam(params.values(), lr=config.lr, eps=schedule.adam_eps)  # fused if torch can
    if resume_from is None:
        epoch, metrics = 0, []
        untrained = mean_elbo(
            model, guide, data, "test", batch_size=config.eval_batch_size, seed=config.seed,
            objective=objective,
        )  # fmt: skip
    else:
        _restore(
            resume_from,
            params=params,
            optimizer=optimizer,
            generator=generator,
            seed=config.seed,
        )
        epoch, metrics = resume_from.epoch, list(resume_from.metrics)
        untrained = resume_from.untrained_elbo
    losses = StepLosses(
        model, guide, params, config=config, objective=objective,
        undecided=can_compile_by_default(config, device),
    )  # fmt: skip
    step = graphed_steps(config, optimizer, device, w)
    return LoopState(epoch, params, optimizer, generator, losses, metrics, untrained, step=step)


def graphed_steps(
    config: TrainConfig, optimizer: torch.optim.Optimizer, device: torch.device, w: World
) -> Callable[..., Tensor]:
    """The step of the loop: :class:`~ppl_vae.graphs.GraphedSteps` where
    ``config.cuda_graphs`` (default: on with a recorded step on CUDA in one process) and the
    device and optimizer allow it, else :func:`svi_step`, with a warning naming the reason
    when graphs were asked for."""
    if not config.capture or config.cuda_graphs is False:
        return svi_step
    reason = graphs_off_reason(optimizer, device)
    if reason is None and w.distributed:
        reason = "torchrun's gradient all-reduce is not captured"
    if reason is None:
        return GraphedSteps(svi_step)
    if config.cuda_graphs and w.main:
        warnings.warn(
            f"the SVI step runs without CUDA graphs: {reason}; drop --cuda-graphs to silence this",
            RuntimeWarning,
            stacklevel=4,  # train's caller (graphed_steps, init_state, train)
        )
    return svi_step


def _restore(
    saved: TrainState,
    *,
    params: dict[str, Tensor],
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    seed: int,
) -> None:
    """Puts ``saved``'s parameters, optimizer state and this rank's data stream in place."""
    restore_params(params, saved.params)
    # a copy (Adam updates its state in place; a second resume needs it intact), with this
    # optimizer's implementation kept: a run saved with unfused Adam resumes fused
    load_adam_state(optimizer, saved.optimizer)
    w = world()
    rng = _rank_rng(saved.rng, w)
    reseed = derived_seed(seed, "moved", saved.epoch, w.rank)
    if not set_rng_state(rng, generator, reseed) and w.main:
        warnings.warn(
            f"this run's data stream was saved on {saved_device(rng)} and cannot continue on "
            f"{generator.device.type}; batch order and binarization go on from a new stream "
            f"(seed {reseed}, from --seed and the epoch), so the run is reproducible but not "
            f"bit-identical to one that stayed on {saved_device(rng)}",
            ReseededStreamWarning,
            stacklevel=4,  # train's caller (_restore, init_state, train)
        )


def _rank_rng(rng: dict, w: World) -> dict:
    """This rank's streams in a checkpoint's ``rng``; an error if the number of processes
    differs from the run's (the data order would repeat or skip)."""
    ranks = rng.get("ranks", [rng])
    if len(ranks) != w.size:
        how = (
            "without torchrun"
            if len(ranks) == 1
            else f"with torchrun --nproc_per_node {len(ranks)}"
        )
        raise InputError(
            f"this run was trained by {len(ranks)} process{'es' * (len(ranks) > 1)}, this is "
            f"{w.size}; resume it {how} (each process's random streams are in the checkpoint)"
        )
    return ranks[w.rank]


def run_epoch(state: LoopState, data: Data, config: TrainConfig, *, quiet: bool = False) -> dict:
    """Trains epoch ``state.epoch + 1`` and returns its metrics (also appended to the state's).

    A pass over the training set at the epoch's KL weight and learning rate, then the test
    ELBO (and the validation ELBO, when ``data`` holds a validation set); an ELBO that is not
    finite or falls far below the untrained or the best one so far raises
    ``FloatingPointError``. ``quiet`` hides the progress bar (always hidden on ranks but 0).
    """
    epoch = state.epoch + 1
    t0 = time.perf_counter()
    # a function of the epoch and the finished epochs' metrics: a resumed run continues it
    lr = config.schedule().rate(epoch, config.lr, state.metrics)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    weight = kl_weight(epoch, config)
    loss = state.losses(weight)
    compiling = state.losses.compile_seconds
    train_elbo, gradients = _train_pass(state, data, config, loss=loss, epoch=epoch, quiet=quiet)
    compiling = state.losses.compile_seconds - compiling  # part of the pass's time
    if state.losses.undecided and weight == kl_weight(config.epochs, config):
        state.notice = _decide_compile(state.losses, time.perf_counter() - t0, epoch, config)
    model, guide = state.losses.model, state.losses.guide
    objective = state.losses.objective
    elbos = {
        f"{split}_elbo": mean_elbo(
            model, guide, data, split, batch_size=config.eval_batch_size, seed=config.seed,
            objective=objective,
        )
        for split in ("test", "validation")
        if split == "test" or data.validation is not None
    }  # fmt: skip
    if objective is not None:
        elbos.update(objective.metrics(guide, data))
    _check_divergence(
        elbos["test_elbo"], epoch, history=state.metrics, untrained=state.untrained_elbo,
        warming=weight < config.beta, unweighted=weight == 0,
    )  # fmt: skip
    metrics = {
        "epoch": epoch,
        "train_elbo": train_elbo,
        **elbos,
        "kl_weight": weight,
        "lr": lr,
        **gradients,
        "seconds": time.perf_counter() - t0,
        **({"compile_seconds": compiling} if compiling else {}),
    }
    state.metrics.append(metrics)
    state.epoch = epoch
    return metrics


def _decide_compile(
    losses: StepLosses, seconds: float, epoch: int, config: TrainConfig
) -> str | None:
    """``TrainConfig.compile``'s default, from the pass just timed (at the final KL weight);
    the line that says so, when the step will be compiled."""
    left = seconds * (config.epochs - epoch)
    if left < COMPILE_PAYS_SECONDS:
        losses.undecided = False
        return None
    losses.compile_from_now()
    return (
        f"compiling the step from epoch {epoch + 1}: about {left / 60:.0f} min of training "
        f"left uncompiled (--no-compile to keep it uncompiled)"
    )


def _train_pass(
    state: LoopState,
    data: Data,
    config: TrainConfig,
    *,
    loss: Callable[..., Tensor],
    epoch: int,
    quiet: bool,
) -> tuple[float, dict]:
    """One pass over the training set; returns the mean objective per data point and the
    gradients' record: ``grad_norm``, the mean global norm before clipping (of the loss per
    training point, :class:`GradientClip`), and with
    ``config.clip_grad`` ``clipped``, the share of steps whose norm was cut to it.

    Under ``torchrun`` every rank draws the same permutation and binarization (the state's
    generator is seeded alike on all ranks) and steps on its share of each global batch.
    """
    w = world()
    optimizer, params = state.optimizer, list(state.params.values())
    num_data = data.train.shape[0]
    steps = math.ceil(num_data / config.batch_size)
    total = torch.zeros((), device=data.device)
    clip = GradientClip(params, config.clip_grad, num_data=num_data, device=data.device)
    bar = Progress(steps, f"epoch {epoch}/{config.epochs}", "step", quiet=quiet or not w.main).bar
    # The first trace (collect_params) validated every site; the hot loop skips validation.
    with pyro.validation_enabled(False):
        batches = data.batches(config.batch_size, "train", generator=state.generator)
        objective = state.losses.objective
        for i, x in enumerate(batches):
            if objective is not None:  # M2: this step's labelled batch, after the unlabelled
                extra = objective.step_args((epoch - 1) * steps + i, state.generator)
                if w.distributed:
                    total += semi_supervised_shard_step(
                        loss, optimizer, x, extra, params=params, num_data=num_data, w=w,
                        before_update=clip,
                    )  # fmt: skip
                else:
                    total += state.step(loss, optimizer, x, num_data, *extra, before_update=clip)
            elif w.distributed:
                total += shard_step(
                    loss, optimizer, x, params=params, num_data=num_data, w=w,
                    before_update=clip,
                )  # fmt: skip
            else:
                total += state.step(loss, optimizer, x, num_data, before_update=clip)
            if i % 50 == 49:  # one host sync per 50 steps: progress and an early NaN check
                running = -all_reduce_sum(total.clone()).item() / (i + 1) / num_data
                if not math.isfinite(running):
                    raise _diverged(epoch)
                bar.set_postfix(elbo=f"{running:.2f}", refresh=False)
            bar.update()
    bar.close()
    train_elbo = -float(all_reduce_sum(total)) / steps / num_data
    if not math.isfinite(train_elbo):
        raise _diverged(epoch)
    return train_elbo, clip.record(steps)


class GradientClip:
    """Between a step's gradient and its update: the global norm of the gradients of
    ``params``, summed over the steps on the device (no host synchronisation), and, with a
    ``max_norm``, the gradients scaled down to it where it is exceeded (as
    ``torch.nn.utils.clip_grad_norm_`` does).

    The norm is that of the loss per training point: Pyro scales a mini-batch's loss to the
    whole training set, so the gradient's norm is divided by ``num_data``. A threshold then
    means the same for any size of training set.
    """

    def __init__(
        self, params: list[Tensor], max_norm: float | None, *, num_data: int, device: torch.device
    ):
        self.params, self.max_norm, self.num_data = params, max_norm, num_data
        self.norms = torch.zeros((), dtype=torch.float64, device=device)
        self.clipped = torch.zeros((), dtype=torch.float64, device=device)

    def __call__(self) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return
        norms = torch.stack([torch.linalg.vector_norm(g) for g in grads])
        norm = torch.linalg.vector_norm(norms) / self.num_data
        self.norms += norm
        if self.max_norm is not None:
            self.clipped += norm > self.max_norm
            scale = (self.max_norm / (norm + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(grads, scale)

    def record(self, steps: int) -> dict:
        """``grad_norm`` (the mean over ``steps``) and, when clipping, ``clipped``."""
        out = {"grad_norm": float(self.norms) / steps}
        if self.max_norm is not None:
            out["clipped"] = float(self.clipped) / steps
        return out


def snapshot(state: LoopState) -> TrainState | None:
    """``state`` as a :class:`TrainState` of its own (copies, on the CPU): later epochs leave
    it as it is.

    Under ``torchrun`` every rank must call it (each rank's random streams are gathered into
    the state); rank 0 gets the state, the others ``None``.
    """
    w = world()
    rng = rng_state(state.generator)
    if w.distributed:
        rng = {"ranks": all_gather_objects(rng)}
    if not w.main:
        return None
    # copies: on a CPU .cpu() and state_dict() are the live tensors, which later steps change
    params = {k: v.detach().cpu().clone() for k, v in state.params.items()}
    return TrainState(
        state.epoch,
        params,
        copy.deepcopy(state.optimizer.state_dict()),
        rng,
        list(state.metrics),
        state.untrained_elbo,
    )


def _program_args(objective: SemiSupervised | None, x: Tensor, num_data: int) -> tuple[tuple, dict]:
    """How the programs are called on a training batch: ``(x, num_data)``, or as the
    objective says (M2's programs take a label second)."""
    return ((x, num_data), {}) if objective is None else objective.program_args(x, num_data)


STEP_MEMORY_FACTOR = 3  # layers' outputs, kept for the backward pass; log-densities, gradients


def check_programs(
    model: Callable,
    guide: Callable,
    data: Data,
    config: TrainConfig,
    objective: SemiSupervised | None = None,
) -> None:
    """Checks, before the first step, what a step of ``train`` needs: the guide samples every
    latent site of the model, and a step's tensors (``config.num_particles`` draws of a batch)
    fit in the device's memory.

    The model and guide run without gradients, in forked random streams, on one batch with one
    particle (and two, when the step draws several); the outputs of their layers (the tensors a
    step keeps for its backward pass) are counted, and a step's memory is extrapolated to
    ``num_particles``.
    """
    sizes = []

    def count(module: torch.nn.Module, inputs, output) -> None:
        if torch.is_tensor(output) and next(module.children(), None) is None:  # a layer
            sizes[-1] += output.numel() * output.element_size()

    with torch.no_grad(), forked_rng(data.device, config.seed), pyro.validation_enabled(False):
        x = data.encode(data.train[: config.batch_size])
        check_points(x, model, guide)
        args, kwargs = _program_args(objective, x, data.train.shape[0])
        model_tr, guide_tr = trace_guide_and_model(model, guide, args, kwargs)
        latent = {s["name"] for s in sample_sites(model_tr) if not s["is_observed"]}
        missing = sorted(latent - {s["name"] for s in sample_sites(guide_tr)})
        if missing:
            raise InputError(
                f"the guide does not sample the model's latent site{'s' * (len(missing) > 1)} "
                f"{', '.join(map(repr, missing))}, which would be drawn from the prior and "
                f"never inferred; give the guide a pyro.sample site of the same name"
            )
        for k in (1, 2) if config.num_particles > 1 else (1,):  # a model may not vectorize
            sizes.append(0)
            hook = torch.nn.modules.module.register_module_forward_hook(count)
            try:
                loss = objective or LOSSES.build(config.loss, num_particles=k)
                labelled = objective.step_args(0, None) if objective is not None else ()
                loss.differentiable_loss(model, guide, x, data.train.shape[0], *labelled)
            finally:
                hook.remove()
    per_particle = max(sizes[1] - sizes[0], 0) if len(sizes) == 2 else 0
    need = STEP_MEMORY_FACTOR * (sizes[0] + (config.num_particles - 1) * per_particle)
    check_memory(
        need,
        f"a training step ({config.num_particles} particles of a batch of {x.shape[0]})",
        device=data.device,
        fix="lower --num-particles or --batch-size",
    )


def train(
    model: Callable,
    guide: Callable,
    data: Data,
    config: TrainConfig,
    *,
    resume_from: TrainState | None = None,
    checkpoint: Callable[[TrainState], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    quiet: bool = False,
    objective: SemiSupervised | None = None,
) -> list[dict]:
    r"""Trains ``model`` and ``guide`` on ``data`` by SVI and returns the per-epoch metrics.

    Each step evaluates the Pyro ELBO (``Trace_ELBO`` or ``TraceMeanField_ELBO``, or the IWAE
    bound) of a mini-batch, scaled to the whole training set, and takes one Adam step on every
    parameter the two programs register. The mini-batch ELBO is differentiated through the
    reparameterized latent draws. ``model`` and ``guide`` are Pyro callables taking
    ``(x, num_data=None)``; the guide's latent sites must match the model's. Training clears
    Pyro's param store first.

    With ``config.capture`` (the default), the step's tensor operations are recorded once per
    batch shape and KL weight, checked against the program, and replayed
    (:class:`~ppl_vae.capture.CapturedLoss`); the numbers are those of running the program.
    Records are checked again at the start of every epoch and made afresh if the program
    changed; a program whose computation changes from step to step needs ``capture=False``.

    Nothing is written to disk: ``checkpoint`` receives a :class:`TrainState` after every
    epoch (``ppl_vae.runs`` writes it), and ``resume_from`` continues from one with the same
    numbers as an uninterrupted run. A NaN or infinite loss raises ``FloatingPointError``.
    The loop is :func:`init_state`, then :func:`run_epoch` and :func:`snapshot` per epoch.

    Under ``torchrun`` (see :mod:`ppl_vae.distributed`) every rank steps on its share of each
    global batch of ``config.batch_size`` and the gradients are summed over the ranks, each
    weighted by its share: the update is the one-process update on the whole batch, with each
    rank's latent draws from its own stream. The metrics are reduced over the ranks.

    Arguments:
        model: The generative model, a Pyro program.
        guide: The amortized guide, a Pyro program.
        data: Training and test tensors (see :class:`~ppl_vae.data.Data`).
        config: Optimisation settings.
        resume_from: A state from an earlier run of the same configuration.
        checkpoint: Called with the state after every epoch (on rank 0 only under torchrun;
            the state holds every rank's random streams).
        on_epoch: Called with each epoch's metrics (after ``checkpoint``).
        quiet: Hide the progress bar (it is also hidden when stderr is not a terminal).
        objective: M2's :class:`~ppl_vae.semisupervised.SemiSupervised` in place of
            ``config.loss``: ``data`` are then the unlabelled points (an epoch is a pass over
            them), each step adds a labelled batch's loss, and the metrics add
            ``test_accuracy``. Under ``torchrun`` both batches of a step are split across the
            ranks (:func:`semi_supervised_shard_step`).

    With ``config.validation``, that many training points are held out
    (:meth:`~ppl_vae.data.Data.hold_out`) and their ELBO is recorded per epoch; with
    ``config.patience``, training stops once the validation ELBO (else the test ELBO) has not
    improved for that many epochs (:mod:`ppl_vae.selection`).

    Returns:
        One dictionary per epoch with ``epoch``, ``train_elbo``, ``test_elbo`` (and
        ``validation_elbo``; with an M2 ``objective``, the unlabelled bounds and
        ``test_accuracy``), ``kl_weight``, ``lr``, ``grad_norm`` (and ``clipped``) and
        ``seconds``.
    """
    if config.validation:
        data = data.hold_out(config.validation, derived_seed(config.seed, "validation"))
    check_programs(model, guide, data, config, objective)
    state = init_state(model, guide, data, config, resume_from=resume_from, objective=objective)
    w, first, began = world(), state.epoch, time.perf_counter()
    for _ in range(state.epoch, config.epochs):
        if stops(state.metrics, config.patience):
            break
        metrics = run_epoch(state, data, config, quiet=quiet)
        if not quiet and w.main:
            done, elapsed = state.epoch - first, time.perf_counter() - began
            _report(metrics, config.epochs, done=done, elapsed=elapsed)
            if state.notice is not None:  # after the epoch it is about
                tqdm.write(state.notice, file=sys.stderr)
        state.notice = None
        if checkpoint is not None and (saved := snapshot(state)) is not None:
            checkpoint(saved)
        if on_epoch is not None:
            on_epoch(metrics)
    if state.epoch < config.epochs and not quiet and w.main:  # stopped early
        tqdm.write(
            f"stopped early: {stopped_early(state.metrics, config.patience)}", file=sys.stderr
        )
    return state.metrics


def stopped_early(metrics: list[dict], patience: int) -> str:
    """Why training stopped before ``--epochs``, in words."""
    key = watched(metrics)
    return (
        f"by epoch {metrics[-1]['epoch']} the {key.split('_')[0]} ELBO had not improved for "
        f"{patience} epochs (--patience) since epoch {best_epoch(metrics)}"
    )
