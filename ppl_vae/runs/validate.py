r"""Damaged run files as one line: every field of a checkpoint and of ``metrics.jsonl`` checked
before it is used, with a message naming the file, the field and what repairs it."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ppl_vae.errors import InputError

__all__ = ["check_checkpoint", "check_metrics"]

REQUIRED = ("epoch", "params", "optimizer", "rng", "metrics")
RNG_KEYS = ("torch", "python", "numpy", "data")
NUMPY_KEYS = {"name", "keys", "pos", "has_gauss", "cached_gaussian"}
REPAIR = "delete it and train again, or restore the file from a copy"


def _damaged(path: Path, what: str) -> InputError:
    return InputError(f"{path} is damaged: {what}; {REPAIR}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_metrics(lines: object, path: Path) -> list[dict]:
    """``lines`` (a checkpoint's ``metrics`` or ``metrics.jsonl``'s records) if every one is an
    epoch's record: ``epoch`` 1, 2, ... and finite numbers ``train_elbo``/``test_elbo`` (training
    stops at a non-finite ELBO before its epoch is saved)."""
    if not isinstance(lines, list):
        raise _damaged(path, f"its metrics are a {type(lines).__name__}, not a list of epochs")
    for i, m in enumerate(lines, 1):
        if not isinstance(m, dict):
            raise _damaged(path, f"metrics record {i} is a {type(m).__name__}, not an object")
        if m.get("epoch") != i or not _is_int(m.get("epoch")):
            raise _damaged(path, f"metrics record {i} has epoch {m.get('epoch')!r}, not {i}")
        for key in ("train_elbo", "test_elbo"):
            if not (_is_number(m.get(key)) and math.isfinite(m[key])):
                raise _damaged(path, f"metrics record {i} has {key} {m.get(key)!r}, not a number")
    return lines


def _check_rng(rng: object, path: Path) -> None:
    streams = rng.get("ranks") if isinstance(rng, dict) and "ranks" in rng else [rng]
    if not isinstance(streams, list) or not streams:
        raise _damaged(path, "its random streams are not a list of ranks' streams")
    for s in streams:
        missing = [k for k in RNG_KEYS if not isinstance(s, dict) or k not in s]
        if missing:
            raise _damaged(path, f"its random streams lack {', '.join(missing)}")
        for key in ("torch", "data"):
            if not (isinstance(s[key], torch.Tensor) and s[key].dtype == torch.uint8):
                raise _damaged(path, f"its random stream {key!r} is not a byte tensor")
        python, numpy = s["python"], s["numpy"]
        if not (isinstance(python, dict) and {"version", "state", "gauss"} <= python.keys()):
            raise _damaged(path, "its Python random stream lacks version, state or gauss")
        if not isinstance(python["state"], torch.Tensor) or not _is_int(python["version"]):
            raise _damaged(path, "its Python random stream's state is not a tensor")
        if not (isinstance(numpy, dict) and numpy.keys() >= NUMPY_KEYS):
            raise _damaged(path, f"its NumPy random stream lacks one of {sorted(NUMPY_KEYS)}")
        if not isinstance(numpy["keys"], torch.Tensor) or not isinstance(numpy["name"], str):
            raise _damaged(path, "its NumPy random stream's keys are not a tensor")


def _check_params(params: object, path: Path) -> None:
    if not isinstance(params, dict) or not params:
        raise _damaged(path, f"its parameters are a {type(params).__name__}, not named tensors")
    for name, value in params.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise _damaged(path, f"parameter {name!r} is not a tensor")
        if not torch.is_floating_point(value):
            raise _damaged(path, f"parameter {name} holds {value.dtype}, not floating point")
        if not torch.isfinite(value).all():
            raise InputError(
                f"{path} holds non-finite values (NaN or infinity) in parameter {name}: the run "
                f"diverged before this checkpoint was written; train again (a lower --lr), or "
                f"restore an earlier copy of the file"
            )


def check_checkpoint(ckpt: object, path: Path) -> dict:
    """``ckpt`` if every field a run reads is there with its type: the epoch, the parameters
    (finite floating-point tensors by name), the optimizer state, the random streams, the
    metrics (one record per finished epoch) and the untrained ELBO; else a one-line error."""
    if not isinstance(ckpt, dict) or not {"params", "epoch", "optimizer"} <= ckpt.keys():
        raise InputError(f"{path} is not a ppl_vae checkpoint; delete it and train again")
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise _damaged(path, f"it lacks {', '.join(missing)}")
    epoch = ckpt["epoch"]
    if not _is_int(epoch) or epoch < 0:
        raise _damaged(path, f"its epoch is {epoch!r}, not a count of finished epochs")
    _check_params(ckpt["params"], path)
    optimizer = ckpt["optimizer"]
    if not isinstance(optimizer, dict) or not {"state", "param_groups"} <= optimizer.keys():
        raise _damaged(path, "its optimizer state is not an Adam state dict")
    groups = optimizer["param_groups"]
    if not isinstance(optimizer["state"], dict) or not isinstance(groups, list):
        raise _damaged(path, "its optimizer state is not an Adam state dict")
    if not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        raise _damaged(path, "its optimizer's parameter groups are not lists of parameters")
    for slot in optimizer["state"].values():
        if not isinstance(slot, dict) or not all(
            isinstance(v, torch.Tensor) for v in slot.values()
        ):
            raise _damaged(path, "its optimizer state holds values that are not tensors")
    _check_rng(ckpt["rng"], path)
    check_metrics(ckpt["metrics"], path)
    if len(ckpt["metrics"]) != epoch:
        raise _damaged(path, f"it holds {len(ckpt['metrics'])} epochs' metrics for epoch {epoch}")
    fingerprint = ckpt.get("data_fingerprint")
    if fingerprint is not None and not isinstance(fingerprint, str):
        raise _damaged(path, f"its data_fingerprint is {fingerprint!r}, not a hex digest")
    untrained = ckpt.get("untrained_elbo")
    if untrained is not None and not (_is_number(untrained) and not math.isinf(untrained)):
        raise _damaged(path, f"its untrained_elbo is {untrained!r}, not a number")
    return ckpt
