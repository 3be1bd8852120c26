r"""The model–guide contract: site and plate names, the data plate, one trace/replay helper."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pyro
from pyro import poutine
from pyro.poutine import Trace
from pyro.poutine.util import site_is_subsample
from torch import Tensor

__all__ = [
    "LATENT",
    "OBSERVED",
    "PLATE",
    "data_plate",
    "log_density",
    "plate_dims",
    "plate_frames",
    "sample_sites",
    "trace_guide_and_model",
]

LATENT = "z"  # the latent site shared by the model and every guide
OBSERVED = "x"  # the observation site
PLATE = "data"  # the plate over the leading dimension of x


@contextmanager
def data_plate(x, num_data: int | None = None) -> Iterator[pyro.plate]:
    r"""The ``"data"`` plate over the leading dimension of ``x``, as a context manager.

    With ``num_data``, every site inside is also scaled by ``num_data / len(x)`` so that a
    mini-batch loss estimates the loss on the whole data set.
    """
    with pyro.plate(PLATE, x.shape[0], dim=-1) as plate:
        if num_data is None or num_data == x.shape[0]:
            yield plate
        else:
            with poutine.scale(scale=num_data / x.shape[0]):
                yield plate


def sample_sites(trace: Trace) -> list[dict]:
    """The sample sites of ``trace``, without the plates' subsample sites."""
    return [
        site
        for site in trace.nodes.values()
        if site["type"] == "sample" and not site_is_subsample(site)
    ]


def log_density(site: dict) -> Tensor:
    """A sample site's log-density at its value, before its scale and mask are applied."""
    if "unscaled_log_prob" in site:  # computed already, for validation
        return site["unscaled_log_prob"]
    return site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])


def plate_frames(site: dict) -> set:
    """The vectorized plates a site lies in (frames of ``cond_indep_stack``, with their dims)."""
    return {f for f in site["cond_indep_stack"] if f.vectorized and f.dim is not None}


def plate_dims(site: dict) -> set[int]:
    """The dimensions of the vectorized plates a site lies in."""
    return {f.dim for f in plate_frames(site)}


def trace_guide_and_model(
    model: Callable, guide: Callable, args: tuple, kwargs: dict
) -> tuple[Trace, Trace]:
    """Runs the guide, then the model replayed against its draws; returns both traces.

    Every estimator here (the ELBOs, the IWAE bound, importance sampling) starts from these
    two traces, as Pyro's do (``pyro.infer.enum.get_importance_trace``).
    """
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    replayed = poutine.replay(model, trace=guide_trace)
    model_trace = poutine.trace(replayed).get_trace(*args, **kwargs)
    return model_trace, guide_trace
