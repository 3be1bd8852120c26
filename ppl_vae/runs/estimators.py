r"""The estimators of ``ppl-vae evaluate --method``: importance sampling (``is``) and annealed
importance sampling (``ais``), each run on one batch of points and summarized over all.

:data:`METHODS` maps a method's name to a factory taking its own options (those of
:class:`~ppl_vae.runs.evaluate.EvaluateConfig` that it declares; another method's option is an
error) and returning an :class:`Estimator`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

from ppl_vae.ais import SCHEDULES as ANNEALING
from ppl_vae.ais import AnnealedLogLikelihood, annealed_log_likelihood
from ppl_vae.importance import LogLikelihood, log_likelihood_diagnostics
from ppl_vae.psis import tail_size
from ppl_vae.registry import Registry

__all__ = ["ANNEALING", "DEFAULTS", "DEFAULT_IWAE_KS", "METHODS", "Estimator", "iwae_ks"]

DEFAULT_IWAE_KS = (1, 10, 100)

# the options' values where not given, per method (the fields of EvaluateConfig default to None)
DEFAULTS = {
    "is": {"num_samples": 5000},
    "ais": {"num_chains": 16, "num_steps": 500, "leapfrog_steps": 5, "schedule": "sigmoid"},
}


@dataclass(frozen=True)
class Estimator:
    """One method: ``batch(model, guide, x, chunk_size, progress)`` estimates every point of
    ``x`` (``progress`` is called with the work done per point, in ``unit``s, ``work`` in
    all), and ``summary(results)`` gives the record's keys from all batches' results, whose
    ``log_px`` the caller joins."""

    unit: str  # what the progress counts, per point: draws, or chain steps
    work: int  # units per point
    batch: Callable[..., Any]
    summary: Callable[[list], dict]


def iwae_ks(num_samples: int, iwae_k: tuple[int, ...] | None) -> tuple[int, ...]:
    """The IWAE k to report: as given, or the defaults that do not exceed K."""
    if iwae_k is not None:
        return tuple(iwae_k)
    return tuple(k for k in DEFAULT_IWAE_KS if k <= num_samples)


def _on_cpu(result, **changes):
    """``result`` with its tensors on the CPU (to send to rank 0), and ``changes``."""
    moved = {f.name: getattr(result, f.name).cpu() for f in fields(result)
             if torch.is_tensor(getattr(result, f.name))}  # fmt: skip
    return replace(result, **moved, **changes)


def _mean(results: list, name: str) -> float:
    return torch.cat([getattr(r, name) for r in results]).mean().item()


def _pareto(k: Tensor, num_samples: int, worst: int = 10) -> dict | None:
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


METHODS: Registry[Estimator] = Registry("evaluation method")


@METHODS.register(
    "is",
    options=("num_samples", "iwae_k"),
    help="importance sampling with the guide as proposal, K draws per point (--num-samples)",
)
def _importance(num_samples: int, iwae_k: tuple[int, ...] | None) -> Estimator:
    ks = iwae_ks(num_samples, iwae_k)

    def batch(model, guide, x, chunk_size, progress) -> LogLikelihood:
        r = log_likelihood_diagnostics(
            model, guide, x, num_samples=num_samples, chunk_size=chunk_size, iwae_ks=ks,
            progress=progress,
        )  # fmt: skip
        return _on_cpu(r, iwae={k: v.cpu() for k, v in r.iwae.items()})

    def summary(results: list[LogLikelihood]) -> dict:
        return {
            "num_samples": num_samples,
            "elbo": _mean(results, "elbo"),
            "ess": _mean(results, "ess"),
            "iwae": {
                str(k): torch.cat([r.iwae[k] for r in results]).mean().item() for k in ks
            },  # fmt: skip
            "pareto_k": _pareto(torch.cat([r.pareto_k for r in results]), num_samples),
        }

    return Estimator("draw", num_samples, batch, summary)


@METHODS.register(
    "ais",
    options=("num_chains", "num_steps", "leapfrog_steps", "schedule"),
    help="annealed importance sampling from the guide's q(z|x) to the posterior with HMC "
    "transitions (ppl_vae.ais): C chains (--num-chains) of T steps (--num-steps) per point",
)
def _annealed(num_chains: int, num_steps: int, leapfrog_steps: int, schedule: str) -> Estimator:
    options = dict(num_chains=num_chains, num_steps=num_steps, leapfrog_steps=leapfrog_steps,
                   schedule=schedule)  # fmt: skip

    def batch(model, guide, x, chunk_size, progress) -> AnnealedLogLikelihood:
        r = annealed_log_likelihood(
            model, guide, x, **options, chunk_size=chunk_size, diagnostics=True,
            progress=lambda t: progress(t * num_chains),
        )  # fmt: skip
        return _on_cpu(r)

    def summary(results: list[AnnealedLogLikelihood]) -> dict:
        return {
            **options,
            "ais": {  # means over points
                "acceptance": _mean(results, "acceptance"),
                "log_weight_variance": _mean(results, "log_weight_variance"),
                "ess": _mean(results, "ess"),
                "step_size": _mean(results, "step_size"),
            },
        }

    return Estimator("chain step", num_chains * num_steps, batch, summary)
