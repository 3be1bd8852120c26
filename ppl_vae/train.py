r"""Stochastic variational inference: the training loop, checkpoints and per-epoch metrics."""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO
from pyro.poutine.scale_messenger import ScaleMessenger
from torch import Tensor

from ppl_vae.capture import CapturedLoss
from ppl_vae.data import Data
from ppl_vae.elbo import TraceELBO, TraceMeanFieldELBO
from ppl_vae.evaluate import importance_log_weights
from ppl_vae.model import LATENT, PLATE

__all__ = [
    "LOSSES",
    "IWAELoss",
    "TraceELBO",
    "TraceMeanFieldELBO",
    "TrainConfig",
    "collect_params",
    "evaluate_elbo",
    "kl_weight",
    "make_loss",
    "resolve_device",
    "scale_latent",
    "step_loss",
    "svi_step",
    "train",
]


class IWAELoss:
    r"""The importance-weighted bound of Burda et al. (2015), per data point, as a loss.

    .. math::
        \mathcal{L}_k(x_i) = \log \frac{1}{k} \sum_{j=1}^k \frac{p(x_i, z_j)}{q(z_j|x_i)},
        \qquad z_j \sim q(z|x_i)

    The k draws are vectorized under an outer particle plate and the bound is formed per point
    before the mini-batch scale ``num_data / N`` is applied. (Pyro's ``RenyiELBO(alpha=0)`` forms
    the same bound, but scales the log-weights before the log-sum-exp, which is not the bound of
    the full data set under subsampling, and it has no ``differentiable_loss``.) With
    reparameterized guides the gradient is that of Burda et al.: the normalized weights times
    the gradients of the log-weights. ``num_particles=1`` gives the ELBO.
    """

    def __init__(self, num_particles: int = 5, max_plate_nesting: int = 1, data_plate: str = PLATE):
        if num_particles < 1:
            raise ValueError(f"num_particles must be a positive integer, got {num_particles}")
        self.num_particles, self.max_plate_nesting = num_particles, max_plate_nesting
        self.data_plate = data_plate

    def differentiable_loss(self, model, guide, *args, **kwargs):
        log_w, scale = importance_log_weights(
            model, guide, self.num_particles, args, kwargs, self.data_plate, self.max_plate_nesting
        )
        bound = torch.logsumexp(log_w, 0) - math.log(self.num_particles)
        return -(bound.sum() * scale)

    def loss(self, model, guide, *args, **kwargs):
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))


LOSSES: dict[str, type] = {
    "elbo": TraceELBO,
    "meanfield": TraceMeanFieldELBO,
    "iwae": IWAELoss,
}
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


@dataclass(frozen=True)
class TrainConfig:
    """How to run stochastic variational inference."""

    epochs: int = 10  # passes over the training set
    batch_size: int = 100  # data points per SVI step
    lr: float = 1e-3  # Adam learning rate
    loss: str = "elbo"  # "elbo" (Trace_ELBO), "meanfield" (analytic KL) or "iwae" (IWAE bound)
    num_particles: int = 1  # vectorized particles per step (ELBO average, or the IWAE k)
    beta: float = 1.0  # final weight of the KL term (log p(z) - log q(z|x))
    kl_warmup: int = 0  # epochs over which the KL weight rises linearly from 0 to beta
    seed: int = 0  # seeds parameters, batching, binarization and latent draws
    eval_batch_size: int = 1000  # rows per batch when computing the test ELBO
    capture: bool = True  # replay each step's tensor operations from a checked record

    def __post_init__(self):
        for name in ("epochs", "batch_size", "num_particles", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"learning rate must be positive, got {self.lr}")
        if not self.beta >= 0:
            raise ValueError(f"beta must be non-negative, got {self.beta}")
        if self.kl_warmup < 0:
            raise ValueError(f"kl_warmup must be >= 0 epochs, got {self.kl_warmup}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.loss == "iwae" and (self.kl_warmup or self.beta != 1.0):
            raise ValueError(
                "KL warm-up and beta weight the ELBO's KL term; the iwae loss has none: "
                "drop --kl-warmup/--beta or use --loss elbo"
            )


def make_loss(config: TrainConfig) -> ELBO | IWAELoss:
    """The Pyro ELBO ``config.loss`` names, with vectorized particles."""
    if config.loss == "iwae":
        return IWAELoss(num_particles=config.num_particles, max_plate_nesting=1)
    return LOSSES[config.loss](
        num_particles=config.num_particles,
        vectorize_particles=config.num_particles > 1,
        max_plate_nesting=1,
    )


def resolve_device(device: str) -> torch.device:
    """``"auto"`` picks CUDA when a GPU is visible; ``"cuda"`` without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use auto, cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA GPU is visible; use cpu or auto")
    return dev


class scale_latent(ScaleMessenger):
    r"""``pyro.poutine.scale`` restricted to the latent site(s).

    Applied to both model and guide it weights :math:`\log p(z) - \log q(z|x)`, i.e. the KL
    term of the ELBO, by ``scale`` and leaves :math:`\log p(x|z)` alone.
    """

    def __init__(self, scale: float, sites: frozenset[str] = frozenset({LATENT})):
        super().__init__(scale)
        self.sites = sites

    def _process_message(self, msg):
        if msg["name"] in self.sites:
            super()._process_message(msg)


def kl_weight(epoch: int, config: TrainConfig) -> float:
    """The KL weight during 1-based ``epoch``: rises linearly to ``beta`` over ``kl_warmup``."""
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


@torch.no_grad()
def evaluate_elbo(
    model: Callable,
    guide: Callable,
    data: Data,
    split: str = "test",
    batch_size: int = 1000,
    seed: int = 0,
    num_particles: int = 1,
) -> float:
    """The mean ELBO per data point (nats) on ``split``, at full KL weight.

    Draws (dynamic binarization and latents) come from ``seed`` in a forked RNG, so the figure
    is a deterministic function of the parameters and the caller's RNG stream is left alone.
    """
    elbo = TraceELBO(
        num_particles=num_particles, vectorize_particles=num_particles > 1, max_plate_nesting=1
    )
    devices = [data.device] if data.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        g = torch.Generator(device=data.device).manual_seed(seed)
        total = torch.zeros((), dtype=torch.float64, device=data.device)
        n = 0
        for x in data.batches(batch_size, split, shuffle=False, generator=g):
            total -= elbo.differentiable_loss(model, guide, x)
            n += x.shape[0]
    return float(total) / n


def _rng_state(generator: torch.Generator) -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "data": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    generator.set_state(state["data"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _replace_atomic(path: Path, write: Callable[[object], None], mode: str) -> None:
    """Writes through ``write(file)`` to a temporary file beside ``path``, then renames it.

    The temporary file is opened normally, so the result gets the usual permissions (umask).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_atomic(obj: dict, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename over it."""
    _replace_atomic(Path(path), lambda f: torch.save(obj, f), "wb")


def write_text_atomic(text: str, path: Path) -> None:
    """Writes ``text`` to a temporary file beside ``path``, then renames it over ``path``."""
    _replace_atomic(Path(path), lambda f: f.write(text), "w")


def make_output_dir(out_dir: str | os.PathLike) -> Path:
    """Creates ``out_dir`` (and parents); a clear error if it cannot be created or written."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create output directory {out}: {e.strerror}") from None
    if not os.access(out, os.W_OK):
        raise ValueError(f"output directory {out} is not writable; choose another --out")
    return out


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Reads a checkpoint written by :func:`train`; a clear error if it is unreadable."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; train a run there first")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(
            f"checkpoint {path} is unreadable or corrupt ({type(e).__name__}); "
            f"delete it and train again"
        ) from None
    if not isinstance(ckpt, dict) or not {"params", "epoch", "optimizer"} <= ckpt.keys():
        raise ValueError(f"{path} is not a ppl_vae checkpoint; delete it and train again")
    return ckpt


def restore_params(params: dict[str, Tensor], saved: dict[str, Tensor]) -> None:
    """Copies ``saved`` values into ``params`` in place; names must match exactly."""
    if params.keys() != saved.keys():
        missing, extra = params.keys() - saved.keys(), saved.keys() - params.keys()
        raise ValueError(
            f"checkpoint parameters do not match the model and guide (missing {sorted(missing)}, "
            f"unexpected {sorted(extra)}); was it written for another architecture?"
        )
    with torch.no_grad():
        for name, p in params.items():
            if p.shape != saved[name].shape:
                raise ValueError(
                    f"checkpoint parameter {name} has shape {tuple(saved[name].shape)}, the model "
                    f"has {tuple(p.shape)}; was it written for another architecture?"
                )
            p.copy_(saved[name])


def _progress(total: int, desc: str, quiet: bool):
    from tqdm.auto import tqdm

    disable = quiet or not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, disable=disable, leave=False, dynamic_ncols=True)


def svi_step(
    loss: Callable[..., Tensor], optimizer: torch.optim.Optimizer, *args, **kwargs
) -> Tensor:
    """One SVI step: ``loss(*args, **kwargs)``, its gradient, one optimizer step.

    ``loss`` returns a differentiable loss tensor, e.g.
    ``functools.partial(elbo.differentiable_loss, model, guide)`` or a
    :class:`~ppl_vae.capture.CapturedLoss`. One ``torch.optim`` optimizer over all parameters
    replaces Pyro's one-optimizer-per-parameter wrapper, and the loss comes back as a tensor, so
    a step makes no host synchronisation.
    """
    value = loss(*args, **kwargs)
    value.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return value.detach()


def step_loss(
    elbo: ELBO | IWAELoss,
    model: Callable,
    guide: Callable,
    params: dict[str, Tensor],
    capture: bool = True,
) -> Callable[..., Tensor]:
    """``elbo``'s differentiable loss of ``model`` and ``guide``, captured if ``capture``."""
    loss = partial(elbo.differentiable_loss, model, guide)
    return CapturedLoss(loss, params.values()) if capture else loss


def _diverged(epoch: int, out: Path | None) -> FloatingPointError:
    kept = f"; the last good checkpoint (epoch {epoch - 1}) is kept in {out}" if out else ""
    return FloatingPointError(
        f"the loss became NaN or infinite in epoch {epoch}{kept}; lower --lr or check the data"
    )


def train(
    model: Callable,
    guide: Callable,
    data: Data,
    config: TrainConfig,
    out_dir: str | os.PathLike | None = None,
    *,
    resume: bool = False,
    quiet: bool = False,
    extra: dict | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> list[dict]:
    r"""Trains ``model`` and ``guide`` on ``data`` by SVI and returns the per-epoch metrics.

    Each step evaluates the Pyro ELBO (``Trace_ELBO`` or ``TraceMeanField_ELBO``) of a
    mini-batch, scaled to the whole training set, and takes one Adam step on every parameter the
    two programs register. The mini-batch ELBO is differentiated through the reparameterized
    latent draws.

    ``model`` and ``guide`` are Pyro callables taking ``(x, num_data=None)``; the guide's
    latent sites must match the model's. Training clears Pyro's param store first.

    With ``config.capture`` (the default), the step's tensor operations are recorded once per
    batch shape and KL weight, checked against the program, and replayed
    (:class:`~ppl_vae.capture.CapturedLoss`); the numbers are those of running the program.
    Records are checked again at the start of every epoch and made afresh if the program
    changed; a program whose computation changes from step to step needs ``capture=False``.

    With ``out_dir``, each epoch appends a line to ``metrics.jsonl`` and writes
    ``checkpoint.pt`` atomically (parameters, optimizer, configuration, epoch and RNG states;
    ``extra`` is stored alongside). ``resume=True`` continues from that checkpoint and gives the
    same numbers as an uninterrupted run. A NaN or infinite loss raises ``FloatingPointError``
    and leaves the last good checkpoint in place.

    Arguments:
        model: The generative model, a Pyro program.
        guide: The amortized guide, a Pyro program.
        data: Training and test tensors (see :class:`~ppl_vae.data.Data`).
        config: Optimisation settings.
        out_dir: Run directory for metrics and checkpoints, or ``None``.
        resume: Continue from ``out_dir/checkpoint.pt``.
        quiet: Hide the progress bar (it is also hidden when stderr is not a terminal).
        extra: Picklable data stored in every checkpoint (e.g. the configuration to rebuild
            the networks).
        on_epoch: Called with each epoch's metrics.

    Returns:
        One dictionary per epoch with ``epoch``, ``train_elbo``, ``test_elbo``, ``kl_weight``
        and ``seconds``.
    """
    out = Path(out_dir) if out_dir is not None else None
    device = data.device
    num_data = data.train.shape[0]
    pyro.clear_param_store()
    pyro.set_rng_seed(config.seed)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    x0 = data.encode(
        data.train[: config.batch_size], generator=torch.Generator(device).manual_seed(0)
    )
    params = collect_params(model, guide, x0, num_data)
    if not params:
        raise ValueError(
            "the model and guide register no parameters; use pyro.module or pyro.param"
        )
    optimizer = torch.optim.Adam(params.values(), lr=config.lr)
    history: list[dict] = []
    start = 1
    if resume:
        if out is None:
            raise ValueError("resume needs the run directory")
        ckpt = load_checkpoint(out / CHECKPOINT)
        restore_params(params, ckpt["params"])
        optimizer.load_state_dict(ckpt["optimizer"])
        _set_rng_state(ckpt["rng"], generator)
        history = list(ckpt["metrics"])
        start = ckpt["epoch"] + 1
        write_text_atomic("".join(json.dumps(m) + "\n" for m in history), out / METRICS)
    elif out is not None:
        write_text_atomic("", out / METRICS)

    elbo = make_loss(config)
    losses: dict[float, Callable[..., Tensor]] = {}  # by KL weight
    steps = math.ceil(num_data / config.batch_size)
    for epoch in range(start, config.epochs + 1):
        t0 = time.perf_counter()
        weight = kl_weight(epoch, config)
        if weight not in losses:
            scaled = weight != 1.0
            step_model = scale_latent(weight)(model) if scaled else model
            step_guide = scale_latent(weight)(guide) if scaled else guide
            losses[weight] = step_loss(elbo, step_model, step_guide, params, config.capture)
        if isinstance(losses[weight], CapturedLoss):
            losses[weight].recheck()  # the program may have changed since (e.g. by on_epoch)
        total = torch.zeros((), device=device)
        bar = _progress(steps, f"epoch {epoch}/{config.epochs}", quiet)
        # The first trace (collect_params) validated every site; the hot loop skips validation.
        with pyro.validation_enabled(False):
            batches = data.batches(config.batch_size, "train", generator=generator)
            for i, x in enumerate(batches):
                total += svi_step(losses[weight], optimizer, x, num_data)
                if i % 50 == 49:  # one host sync per 50 steps: progress and an early NaN check
                    running = -total.item() / (i + 1) / num_data
                    if not math.isfinite(running):
                        raise _diverged(epoch, out)
                    bar.set_postfix(elbo=f"{running:.2f}", refresh=False)
                bar.update()
        bar.close()
        train_elbo = -float(total) / steps / num_data
        if not math.isfinite(train_elbo):
            raise _diverged(epoch, out)
        test_elbo = evaluate_elbo(model, guide, data, "test", config.eval_batch_size, config.seed)
        metrics = {
            "epoch": epoch,
            "train_elbo": train_elbo,
            "test_elbo": test_elbo,
            "kl_weight": weight,
            "seconds": time.perf_counter() - t0,
        }
        history.append(metrics)
        if out is not None:
            with open(out / METRICS, "a") as f:
                f.write(json.dumps(metrics) + "\n")
            save_atomic(
                {
                    "epoch": epoch,
                    "params": {k: v.detach().cpu() for k, v in params.items()},
                    "optimizer": optimizer.state_dict(),
                    "rng": _rng_state(generator),
                    "config": asdict(config),
                    "metrics": history,
                    "extra": extra,
                },
                out / CHECKPOINT,
            )
        if on_epoch is not None:
            on_epoch(metrics)
    return history
