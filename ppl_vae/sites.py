r"""The model–guide contract: site and plate names, the data plate, one trace/replay helper,
the one path from a pair of traces to log importance weights, the particle plate, and the
checks a pair must pass for a per-point log p(x)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine import Trace
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from ppl_vae.errors import InputError

__all__ = [
    "LATENT",
    "OBSERVED",
    "PARTICLES",
    "PLATE",
    "DataPlateLayout",
    "WeightTerms",
    "check_batch",
    "check_points",
    "data_plate",
    "log_density",
    "log_weights_of_traces",
    "pad_to_rank",
    "per_draw_and_point",
    "plate_dims",
    "plate_frames",
    "sample_sites",
    "trace_guide_and_model",
    "under_particle_plate",
]

LATENT = "z"  # the latent site shared by the model and every guide
OBSERVED = "x"  # the observation site
PLATE = "data"  # the plate over the leading dimension of x
PARTICLES = "_particles"  # the outer plate of vectorized draws (IWAE, importance sampling)


def check_batch(x, event_shape: torch.Size, who: str) -> None:
    """An error unless ``x`` is a tensor of shape ``(N, *event_shape)`` with N > 0."""
    if not torch.is_tensor(x):
        raise InputError(
            f"{who} takes a torch tensor of shape (N, {', '.join(map(str, event_shape))}), got "
            f"{type(x).__name__}; convert it with torch.as_tensor(x, dtype=torch.float32)"
        )
    if x.shape[1:] != event_shape or x.dim() == 0:
        shape = ", ".join(map(str, event_shape))
        one = " (one point? pass x.unsqueeze(0))" if x.shape == event_shape else ""
        raise InputError(
            f"{who} takes a batch of shape (N, {shape}), got shape {tuple(x.shape)}{one}"
        )


def check_points(x, *programs) -> None:
    """:func:`check_batch` of ``x`` against every program that states the shape of one point
    (a model's ``event_shape``, a guide's ``encoder.event_shape``), before any is traced: an
    error raised inside a Pyro trace gets the trace's shapes appended to its message."""
    for program, who in zip(programs, ("the model", "the guide", "the program"), strict=False):
        shape = getattr(program, "event_shape", None)
        if shape is None:
            shape = getattr(getattr(program, "encoder", None), "event_shape", None)
        if shape is not None:
            check_batch(x, torch.Size(shape), who)


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


def under_particle_plate(fn: Callable, num_particles: int, dim: int) -> Callable:
    """``fn`` run inside an outer plate of ``num_particles`` draws at ``dim`` (left of every
    plate of ``fn``), so that each of its sample sites is drawn that many times at once."""

    def run(*args, **kwargs):
        with pyro.plate(PARTICLES, num_particles, dim=dim):
            return fn(*args, **kwargs)

    return run


def pad_to_rank(value: Tensor | float, rank: int) -> Tensor:
    """``value`` as a tensor of at least ``rank`` dims, size-1 dims put in front (a weight
    that depends on no draw or plate is a number, or has fewer dims than the plates)."""
    value = torch.as_tensor(value)
    return value.reshape((1,) * (rank - value.dim()) + value.shape)


def per_draw_and_point(
    value: Tensor | float, num_particles: int, particle_dim: int, data_dim: int
) -> Tensor:
    """A per-site sum kept over the particle and data plates (:func:`log_weights_of_traces`
    with ``keep_dims={particle_dim, data_dim}``) as a ``(K, N)`` tensor, one row per draw; a
    value that depends on no draw is broadcast to every row."""
    value = pad_to_rank(value, -particle_dim)
    k_axis, n_axis = value.dim() + particle_dim, value.dim() + data_dim
    value = value.movedim((k_axis, n_axis), (0, 1))
    return value.reshape(value.shape[0], value.shape[1]).expand(num_particles, -1)


class WeightTerms:
    r"""A sum of per-site terms :math:`\pm\,\mathrm{scale} \cdot \mathrm{mask} \cdot \log p`,
    reduced over every batch dimension but ``keep_dims``.

    Terms of one shape and one scale (a Python number or one tensor) are added before the scale
    is applied, so a loss costs one multiplication per scale rather than one per site; masked
    terms and per-element scales are scaled and masked one by one, with Pyro's
    ``scale_and_mask``. With no ``keep_dims`` the result is a scalar: the ELBO of one particle.
    """

    def __init__(self, keep_dims=()):
        self.keep = set(keep_dims)
        self.groups: dict[tuple, list] = {}
        self.rest: list[Tensor] = []

    def _reduce(self, t: Tensor) -> Tensor:
        if not self.keep:
            return t.sum()
        dims = [d for d in range(-t.dim(), 0) if d not in self.keep]
        return t.sum(dims, keepdim=True) if dims else t

    def add(self, term: Tensor, scale=1.0, mask=None, sign: float = 1.0) -> None:
        """Adds ``sign * scale * term``, masked where ``mask`` is False."""
        if mask is not None or (torch.is_tensor(scale) and scale.dim() > 0):
            self.rest.append(sign * self._reduce(scale_and_mask(term, scale, mask)))
            return
        key = (scale if not torch.is_tensor(scale) else id(scale), term.shape)
        if key in self.groups:
            group = self.groups[key]
            group[1] = group[1] + term if sign > 0 else group[1] - term
        else:
            self.groups[key] = [scale, term if sign > 0 else -term]

    def total(self) -> Tensor:
        sums = [scale_and_mask(self._reduce(term), scale) for scale, term in self.groups.values()]
        return sum(sums[1:] + self.rest, start=sums[0]) if sums else sum(self.rest)


def log_weights_of_traces(
    model_trace: Trace, guide_trace: Trace, *, keep_dims=(), scaled: bool
) -> Tensor:
    r"""The log importance weight :math:`\sum \log p - \sum \log q` of a pair of traces
    (:func:`trace_guide_and_model`), over every sample site.

    The one path from traces to weights, shared by the ELBOs, the IWAE loss and importance
    sampling (:func:`ppl_vae.importance.log_weights_of_programs` runs the programs and calls
    this): each site's log-density (:func:`log_density`) is masked as Pyro masks it
    (``poutine.mask``, ``obs_mask``: a masked element contributes 0) and, with ``scaled``,
    multiplied by its scale (``poutine.scale``, subsampling) as in Pyro's ELBOs. Batch
    dimensions not in ``keep_dims`` (negative) are summed; the kept ones stay, aligned from the
    right. With no ``keep_dims`` and ``scaled``, this is the ELBO of one particle.
    """
    terms = WeightTerms(keep_dims)
    for sign, trace in ((1.0, model_trace), (-1.0, guide_trace)):
        for site in sample_sites(trace):
            scale = site["scale"] if scaled else 1.0
            terms.add(log_density(site), scale, site["mask"], sign)
    return terms.total()


def _latent_sites(trace) -> set[str]:
    return {site["name"] for site in sample_sites(trace) if not site["is_observed"]}


class DataPlateLayout:
    """Where the data plate of a model/guide pair lies (``size`` points at ``dim``) and how
    deep its plates nest (``max_plate_nesting``), checked for a per-point log p(x): every
    sample site in the one data plate, not subsampled, and the same latent sites in both."""

    def __init__(self, model, guide, args, kwargs, data_plate: str):
        model_tr, guide_tr = trace_guide_and_model(model, guide, args, kwargs)
        self.size, self.dim, nesting = None, None, 1
        for role, tr in (("model", model_tr), ("guide", guide_tr)):
            for site in sample_sites(tr):
                name = site["name"]
                frames = [f for f in site["cond_indep_stack"] if f.vectorized]
                plate = [f for f in frames if f.name == data_plate]
                if not plate:
                    raise InputError(
                        f"{role} sample site {name!r} lies outside the plate {data_plate!r}; "
                        f"put every sample site of the model and guide inside "
                        f"pyro.plate({data_plate!r}, N), or pass data_plate=<its name>"
                    )
                _refuse_subsampling(plate[0])
                if self.size is None:
                    self.size, self.dim = plate[0].size, plate[0].dim
                elif (plate[0].size, plate[0].dim) != (self.size, self.dim):
                    raise InputError(
                        f"site {name!r} has plate {data_plate!r} of size {plate[0].size} at dim "
                        f"{plate[0].dim}, others {self.size} at dim {self.dim}"
                    )
                nesting = max(nesting, *(-f.dim for f in frames))
        latent_model, latent_guide = _latent_sites(model_tr), _latent_sites(guide_tr)
        if latent_model != latent_guide:
            raise InputError(
                f"the guide's latent sites {sorted(latent_guide)} do not match the model's "
                f"{sorted(latent_model)}; the guide must sample every latent site of the model"
            )
        if self.size is None:
            raise InputError("the model has no sample sites")
        if not any(site["is_observed"] for site in sample_sites(model_tr)):
            raise InputError(
                "the model observes nothing (no pyro.sample(..., obs=x) site), so there is no "
                "log p(x) to estimate; condition the model on the data passed to it"
            )
        self.max_plate_nesting = nesting


def _refuse_subsampling(frame) -> None:
    """A subsampled data plate scores other points on every pass of draws: refused."""
    if frame.full_size is not None and frame.size != frame.full_size:
        raise InputError(
            f"the plate {frame.name!r} is subsampled ({frame.size} of its {frame.full_size} "
            f"points), so every pass of draws would score other points; log p(x) is per point: "
            f"pass the points to score as the data, in pyro.plate({frame.name!r}, len(x)) with "
            f"no subsample_size or subsample"
        )
