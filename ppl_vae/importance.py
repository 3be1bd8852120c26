r"""Importance sampling: log p(x) per data point with the guide as proposal, and its weights."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from torch import Tensor

from ppl_vae.errors import InputError
from ppl_vae.sites import PLATE, log_density, sample_sites, trace_guide_and_model

__all__ = [
    "LogLikelihood",
    "WeightTerms",
    "default_chunk_size",
    "importance_log_weights",
    "log_likelihood",
    "log_weights",
]

PARTICLES = "_ll_particles"
# Default rows (points x draws) per vectorized pass. On a CPU, passes of 1,000 to 10,000 rows run
# at the same speed and larger ones slower, with more memory (benchmarks/evaluate_sizes.py,
# docs/BENCHMARKS.md); on a GPU larger passes amortise the kernel launches (not yet measured).
ROWS_PER_PASS_CPU, ROWS_PER_PASS_GPU = 10_000, 100_000


def default_chunk_size(num_points: int, device: torch.device | str) -> int:
    """Draws per pass when none is given: the device's rows per pass / N, at least 1."""
    cpu = torch.device(device).type == "cpu"
    return max(1, (ROWS_PER_PASS_CPU if cpu else ROWS_PER_PASS_GPU) // num_points)


def _device_of(args, kwargs) -> torch.device:
    for value in (*args, *kwargs.values()):
        if torch.is_tensor(value):
            return value.device
    return torch.device("cpu")


@dataclass
class LogLikelihood:
    """Per-data-point results of :func:`log_likelihood`, each of shape ``(N,)`` (float64).

    ``iwae`` maps each k to the IWAE bound averaged over ``num_samples // k`` disjoint groups
    of k consecutive draws, so that ``elbo <= iwae[k] <= log_px`` holds in expectation.
    """

    log_px: Tensor  # log (1/K) sum_k w_k, the importance-sampled estimate of log p(x_i)
    elbo: Tensor  # (1/K) sum_k log w_k, the Monte Carlo ELBO from the same draws
    ess: Tensor  # (sum_k w_k)^2 / sum_k w_k^2, the effective sample size, in [1, K]
    iwae: dict[int, Tensor]  # k -> IWAE_k bound from the same draws
    num_samples: int  # K, the number of draws used for every data point


def _latent_sites(trace) -> set[str]:
    return {site["name"] for site in sample_sites(trace) if not site["is_observed"]}


class _Sites:
    """Latent and observed sites of a model/guide pair, checked against the data plate."""

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
        self.max_plate_nesting = nesting


def _vectorized(fn: Callable, num_particles: int, dim: int) -> Callable:
    def run(*args, **kwargs):
        with pyro.plate(PARTICLES, num_particles, dim=dim):
            return fn(*args, **kwargs)

    return run


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


def log_weights(model_trace, guide_trace, keep_dims, scaled: bool) -> Tensor:
    r"""The log importance weight :math:`\sum \log p - \sum \log q` over every sample site.

    The one path from traces to weights, shared by :func:`log_likelihood`, the IWAE loss and the
    ELBOs: each site's log-density (:func:`ppl_vae.sites.log_density`) is masked as Pyro masks
    it (``poutine.mask``, ``obs_mask``: a masked element contributes 0) and, with ``scaled``,
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


def importance_log_weights(
    model: Callable,
    guide: Callable,
    num_particles: int,
    args: tuple,
    kwargs: dict,
    data_plate: str = PLATE,
    max_plate_nesting: int = 1,
    data_dim: int = -1,
) -> Tensor:
    r"""Log importance weights :math:`\log p(x_i, z_k) - \log q(z_k|x_i)`, shape ``(K, N)``.

    The guide is traced under an outer plate of ``num_particles`` draws and the model replayed
    against it (:func:`log_weights`): masks apply, scales do not (``poutine.scale`` weights a
    loss, not the density of a point), and every batch dimension other than the particle and
    the data plate's (``data_dim``) is summed.
    """
    particle_dim = -max_plate_nesting - 1
    model_tr, guide_tr = trace_guide_and_model(
        _vectorized(model, num_particles, particle_dim),
        _vectorized(guide, num_particles, particle_dim),
        args,
        kwargs,
    )
    lw = log_weights(model_tr, guide_tr, {particle_dim, data_dim}, scaled=False)
    lw = torch.as_tensor(lw)
    lw = lw.reshape((1,) * (max_plate_nesting + 1 - lw.dim()) + lw.shape)
    return _to_k_by_n(lw, particle_dim, data_dim, num_particles)


def _to_k_by_n(lw: Tensor, particle_dim: int, data_dim: int, num_particles: int) -> Tensor:
    """(..., K, ..., N, ...) with size-1 elsewhere to (K, N); a missing K broadcasts."""
    k_axis, n_axis = lw.dim() + particle_dim, lw.dim() + data_dim
    lw = lw.movedim((k_axis, n_axis), (0, 1)).reshape(lw.shape[k_axis], lw.shape[n_axis])
    return lw.expand(num_particles, -1)


def log_likelihood(
    model: Callable,
    guide: Callable,
    *args,
    num_samples: int = 5000,
    chunk_size: int | None = None,
    data_plate: str = PLATE,
    diagnostics: bool = False,
    iwae_ks: Sequence[int] = (),
    progress: Callable[[int], None] | None = None,
    **kwargs,
) -> Tensor | LogLikelihood:
    r"""Importance-sampled :math:`\log p(x_i)` for every data point, with the guide as proposal.

    .. math::
        \log p(x_i) \approx \log \frac{1}{K} \sum_{k=1}^K
            \frac{p(x_i, z_k)}{q(z_k | x_i)}, \qquad z_k \sim q(z | x_i)

    Draws are taken ``chunk_size`` at a time under an outer particle plate (trace the guide,
    replay the model) and combined with a log-sum-exp accumulated in float64, so peak memory
    depends on ``chunk_size`` and N but not on ``num_samples``; exactly ``num_samples`` draws are
    used for every point.

    Arguments:
        model: A Pyro model taking ``*args, **kwargs``; every sample site inside ``data_plate``.
        guide: A Pyro guide over the same latent sites (any family: Gaussian, flows, ...).
        num_samples: K, the number of importance samples per data point.
        chunk_size: Draws per vectorized pass (default :func:`default_chunk_size`: about
            10,000 / N on a CPU, 100,000 / N on a GPU, at least 1).
        data_plate: Name of the plate over data points.
        diagnostics: Also return the ELBO, the effective sample size and IWAE bounds.
        iwae_ks: The k of the IWAE bounds to compute with ``diagnostics`` (each k <= K).
        progress: Called with the number of draws done after each chunk.

    Returns:
        A float64 tensor of shape ``(N,)``, or a :class:`LogLikelihood` with ``diagnostics``.

    Example:
        >>> import pyro.distributions as dist
        >>> def model(x):
        ...     with pyro.plate("data", len(x)):
        ...         z = pyro.sample("z", dist.Normal(0.0, 1.0))
        ...         pyro.sample("x", dist.Normal(z, 1.0), obs=x)
        >>> def guide(x):
        ...     with pyro.plate("data", len(x)):
        ...         pyro.sample("z", dist.Normal(x / 2, 0.5**0.5))  # the exact posterior
        >>> log_likelihood(model, guide, torch.tensor([0.0, 2.0]), num_samples=10)
        tensor([-1.2655, -2.2655], dtype=torch.float64)
    """
    if num_samples < 1:
        raise InputError(f"num_samples must be a positive integer, got {num_samples}")
    if chunk_size is not None and chunk_size < 1:
        raise InputError(f"chunk_size must be a positive integer, got {chunk_size}")
    ks = sorted(set(iwae_ks))
    if ks and (ks[0] < 1 or ks[-1] > num_samples):
        raise InputError(f"every IWAE k must lie in [1, num_samples={num_samples}], got {ks}")

    with torch.no_grad(), poutine.block(hide_types=["param"]):
        sites = _Sites(model, guide, args, kwargs, data_plate)
        chunk = chunk_size or default_chunk_size(sites.size, _device_of(args, kwargs))
        chunk = min(num_samples, chunk)
        lse = lse2 = total = None
        groups = {k: _GroupedLSE(k) for k in ks}
        done = 0
        while done < num_samples:
            c = min(chunk, num_samples - done)
            lw = importance_log_weights(
                model, guide, c, args, kwargs, data_plate, sites.max_plate_nesting, sites.dim
            )
            lw = lw.to(torch.float64)
            if lw.shape[1] != sites.size:
                raise InputError(
                    f"log-weights have {lw.shape[1]} columns but the plate {data_plate!r} has "
                    f"size {sites.size}; is the plate subsampled?"
                )
            part, part2 = torch.logsumexp(lw, 0), torch.logsumexp(2 * lw, 0)
            if lse is None:
                lse, lse2, total = part, part2, lw.sum(0)
            else:
                lse, lse2 = torch.logaddexp(lse, part), torch.logaddexp(lse2, part2)
                total = total + lw.sum(0)
            for g in groups.values():
                g.add(lw)
            done += c
            if progress is not None:
                progress(done)
    log_px = lse - math.log(num_samples)
    if not diagnostics:
        return log_px
    return LogLikelihood(
        log_px=log_px,
        elbo=total / num_samples,
        ess=torch.exp(2 * lse - lse2),
        iwae={k: g.mean() for k, g in groups.items()},
        num_samples=num_samples,
    )


class _GroupedLSE:
    """Running mean over groups of k consecutive draws of log((1/k) sum_{group} w)."""

    def __init__(self, k: int):
        self.k, self.carry, self.carried, self.sum, self.groups = k, None, 0, None, 0

    def add(self, lw: Tensor) -> None:
        start = 0
        if self.carry is not None:  # finish the group the previous chunk left open
            take = min(self.k - self.carried, lw.shape[0])
            self.carry = torch.logaddexp(self.carry, torch.logsumexp(lw[:take], 0))
            self.carried += take
            start = take
            if self.carried == self.k:
                self._close(self.carry.unsqueeze(0))
                self.carry, self.carried = None, 0
        full = (lw.shape[0] - start) // self.k
        if full:
            block = lw[start : start + full * self.k].reshape(full, self.k, -1)
            self._close(torch.logsumexp(block, 1))
        rest = lw[start + full * self.k :]
        if rest.shape[0]:
            self.carry, self.carried = torch.logsumexp(rest, 0), rest.shape[0]

    def _close(self, group_lse: Tensor) -> None:
        s = (group_lse - math.log(self.k)).sum(0)
        self.sum = s if self.sum is None else self.sum + s
        self.groups += group_lse.shape[0]

    def mean(self) -> Tensor:
        return self.sum / self.groups
