r"""Importance sampling: log p(x) per data point with the guide as proposal, and its weights.

:func:`log_likelihood` returns the estimate, :func:`log_likelihood_diagnostics` the estimate
with the ELBO, the effective sample size and IWAE bounds from the same draws, and
:func:`log_weights_of_programs` the log-weights of one pass of draws (the weights of a pair of
traces are :func:`ppl_vae.sites.log_weights_of_traces`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from pyro import poutine
from torch import Tensor

from ppl_vae.compat import legacy_diagnostics
from ppl_vae.errors import InputError
from ppl_vae.psis import LargestLogWeights, pareto_k_of_largest, tail_size
from ppl_vae.sites import (
    PLATE,
    DataPlateLayout,
    check_points,
    log_weights_of_traces,
    per_draw_and_point,
    trace_guide_and_model,
    under_particle_plate,
)

__all__ = [
    "LogLikelihood",
    "checked_inputs",
    "default_chunk_size",
    "log_likelihood",
    "log_likelihood_diagnostics",
    "log_weights_of_programs",
    "module_parameter",
]

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


def module_parameter(*programs) -> Tensor | None:
    """A floating-point parameter of the programs that are modules: their dtype and device."""
    for program in programs:
        if isinstance(program, torch.nn.Module):
            for p in program.parameters():
                if p.is_floating_point():
                    return p
    return None


def checked_inputs(model: Callable, guide: Callable, args: tuple, kwargs: dict):
    """The programs' arguments with NumPy arrays as tensors, checked against the programs'
    parameters where they are modules: points present, and the parameters' dtype and device.

    A floating-point NumPy array becomes a tensor of the parameters' dtype (else the default
    dtype) on their device; a tensor of another dtype or device is an error that names both.
    Integer and boolean tensors after ``x`` (labels, masks) keep their dtype: only their
    device is checked.
    """
    ref = module_parameter(model, guide)
    names = [("x" if i == 0 else f"argument {i + 1}", v) for i, v in enumerate(args)]

    def check(name: str, value):
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
            if value.is_floating_point():
                dtype = ref.dtype if ref is not None else torch.get_default_dtype()
                value = value.to(dtype)
            if ref is not None:
                value = value.to(ref.device)
        if not torch.is_tensor(value):
            return value
        if value.numel() == 0:
            raise InputError(
                f"{name} is empty (shape {tuple(value.shape)}); pass at least one data point"
            )
        exact = name == "x" or value.is_floating_point() or value.is_complex()
        if ref is not None and exact and value.dtype != ref.dtype:
            raise InputError(
                f"{name} has dtype {value.dtype}, the model's parameters {ref.dtype}; pass "
                f"{name}.to({ref.dtype})"
            )
        if ref is not None and value.device != ref.device:
            raise InputError(
                f"{name} is on {value.device}, the model's parameters on {ref.device}; pass "
                f"{name}.to({str(ref.device)!r}) or move the model and guide with .to(device)"
            )
        return value

    args = tuple(check(name, value) for name, value in names)
    kwargs = {key: check(key, value) for key, value in kwargs.items()}
    if args:
        check_points(args[0], model, guide)
    return args, kwargs


@dataclass
class LogLikelihood:
    """Per-data-point results of :func:`log_likelihood_diagnostics`, each of shape ``(N,)``
    (float64).

    ``iwae`` maps each k to the IWAE bound from the K draws (see
    :func:`log_likelihood_diagnostics`): ``elbo <= iwae[k] <= log_px`` for every point.
    """

    log_px: Tensor  # log (1/K) sum_k w_k, the importance-sampled estimate of log p(x_i)
    elbo: Tensor  # (1/K) sum_k log w_k, the Monte Carlo ELBO from the same draws
    ess: Tensor  # (sum_k w_k)^2 / sum_k w_k^2, the effective sample size, in [1, K]
    iwae: dict[int, Tensor]  # k -> IWAE_k bound from the same draws
    num_samples: int  # K, the number of draws used for every data point
    pareto_k: Tensor | None = None  # PSIS k-hat of each point's weights (ppl_vae.psis)


def log_weights_of_programs(
    model: Callable,
    guide: Callable,
    *args,
    num_particles: int,
    max_plate_nesting: int = 1,
    data_dim: int = -1,
    **kwargs,
) -> Tensor:
    r"""Log importance weights :math:`\log p(x_i, z_k) - \log q(z_k|x_i)`, shape ``(K, N)``,
    from running the programs ``model(*args, **kwargs)`` and ``guide(*args, **kwargs)``.

    The guide is traced under an outer plate of ``num_particles`` draws, left of the
    ``max_plate_nesting`` plates of the programs, and the model replayed against it; the
    weights of the two traces are :func:`ppl_vae.sites.log_weights_of_traces`: masks apply,
    scales do not (``poutine.scale`` weights a loss, not the density of a point), and every
    batch dimension other than the particles' and the data plate's (``data_dim``) is summed.
    """
    particle_dim = -max_plate_nesting - 1
    model_tr, guide_tr = trace_guide_and_model(
        under_particle_plate(model, num_particles, particle_dim),
        under_particle_plate(guide, num_particles, particle_dim),
        args,
        kwargs,
    )
    lw = log_weights_of_traces(model_tr, guide_tr, keep_dims={particle_dim, data_dim}, scaled=False)
    return per_draw_and_point(lw, num_particles, particle_dim, data_dim)


def _draw(model, guide, args, kwargs, *, num_samples, chunk_size, data_plate, progress, sinks):
    """Draws ``num_samples`` log-weights per point, ``chunk_size`` at a time, and hands each
    pass's ``(c, N)`` float64 log-weights, in order, to every sink's ``add``."""
    if num_samples < 1:
        raise InputError(f"num_samples must be a positive integer, got {num_samples}")
    if chunk_size is not None and chunk_size < 1:
        raise InputError(f"chunk_size must be a positive integer, got {chunk_size}")
    args, kwargs = checked_inputs(model, guide, args, kwargs)
    with torch.no_grad(), poutine.block(hide_types=["param"]):
        sites = DataPlateLayout(model, guide, args, kwargs, data_plate)
        chunk = chunk_size or default_chunk_size(sites.size, _device_of(args, kwargs))
        chunk, done = min(num_samples, chunk), 0
        while done < num_samples:
            c = min(chunk, num_samples - done)
            lw = log_weights_of_programs(
                model, guide, *args, num_particles=c, data_dim=sites.dim,
                max_plate_nesting=sites.max_plate_nesting, **kwargs,
            ).to(torch.float64)  # fmt: skip
            if lw.shape[1] != sites.size:
                raise InputError(
                    f"log-weights have {lw.shape[1]} columns but the plate {data_plate!r} has "
                    f"{sites.size} points; does the model's plate change size between runs?"
                )
            for sink in sinks:
                sink.add(lw)
            done += c
            if progress is not None:
                progress(done)


class _LogSumExp:
    """Running log of the sum over draws of exp(power * log w), per point."""

    def __init__(self, power: float = 1.0):
        self.power, self.value = power, None

    def add(self, lw: Tensor) -> None:
        part = torch.logsumexp(self.power * lw, 0)
        self.value = part if self.value is None else torch.logaddexp(self.value, part)


class _Sum:
    """Running sum over draws of log w, per point."""

    def __init__(self):
        self.value = None

    def add(self, lw: Tensor) -> None:
        self.value = lw.sum(0) if self.value is None else self.value + lw.sum(0)


def log_likelihood(
    model: Callable,
    guide: Callable,
    *args,
    num_samples: int = 5000,
    chunk_size: int | None = None,
    data_plate: str = PLATE,
    progress: Callable[[int], None] | None = None,
    **kwargs,
) -> Tensor:
    r"""Importance-sampled :math:`\log p(x_i)` for every data point, with the guide as proposal.

    .. math::
        \log p(x_i) \approx \log \frac{1}{K} \sum_{k=1}^K
            \frac{p(x_i, z_k)}{q(z_k | x_i)}, \qquad z_k \sim q(z | x_i)

    Draws are taken ``chunk_size`` at a time under an outer particle plate (trace the guide,
    replay the model: :func:`log_weights_of_programs`) and combined with a log-sum-exp
    accumulated in float64, so peak memory depends on ``chunk_size`` and N but not on
    ``num_samples``; exactly ``num_samples`` draws are used for every point. The ELBO, the
    effective sample size and IWAE bounds from the same draws are
    :func:`log_likelihood_diagnostics`.

    Arguments:
        model: A Pyro model taking ``*args, **kwargs``; every sample site inside ``data_plate``,
            which must not be subsampled (every pass of draws scores the same points).
        guide: A Pyro guide over the same latent sites (any family: Gaussian, flows, ...).
        num_samples: K, the number of importance samples per data point.
        chunk_size: Draws per vectorized pass (default :func:`default_chunk_size`: about
            10,000 / N on a CPU, 100,000 / N on a GPU, at least 1).
        data_plate: Name of the plate over data points.
        progress: Called with the number of draws done after each chunk.

    Returns:
        A float64 tensor of shape ``(N,)``.

    Example:
        >>> import pyro, pyro.distributions as dist
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
    legacy = legacy_diagnostics(kwargs)  # ppl_vae.compat: 0.1's diagnostics=True, iwae_ks=
    if legacy is not None and legacy[0]:
        return log_likelihood_diagnostics(
            model, guide, *args, num_samples=num_samples, chunk_size=chunk_size,
            data_plate=data_plate, iwae_ks=legacy[1], progress=progress, **kwargs,
        )  # fmt: skip
    lse = _LogSumExp()
    _draw(
        model, guide, args, kwargs, num_samples=num_samples, chunk_size=chunk_size,
        data_plate=data_plate, progress=progress, sinks=[lse],
    )  # fmt: skip
    return lse.value - math.log(num_samples)


def log_likelihood_diagnostics(
    model: Callable,
    guide: Callable,
    *args,
    num_samples: int = 5000,
    chunk_size: int | None = None,
    data_plate: str = PLATE,
    iwae_ks: Sequence[int] = (),
    progress: Callable[[int], None] | None = None,
    **kwargs,
) -> LogLikelihood:
    r""":func:`log_likelihood` with the ELBO, the effective sample size and the IWAE bounds
    of the given k, all from the same K = ``num_samples`` draws per point.

    ``iwae[k]`` averages :math:`\log \frac{1}{k} \sum_{j \in G} w_j` over windows G of k
    consecutive draws read cyclically (the last draws followed by the first), one window
    starting at every multiple of g = gcd(K, k). When k divides K these are the K/k disjoint
    groups; otherwise no draw is left out, and every draw lies in k/g windows. Each window
    holds k distinct independent draws, so the average is an unbiased estimate of the IWAE_k
    bound; and since every draw counts equally, Jensen's inequality gives
    ``elbo <= iwae[k] <= log_px`` for every point and every set of draws, not only in
    expectation. The windows cost k/g log-sum-exps of k terms per draw (one when k divides K).

    ``pareto_k`` is each point's PSIS k̂ from the same draws
    (:func:`ppl_vae.psis.pareto_k_of_largest`: above 0.7, distrust that point's ``log_px``;
    ``inf`` when K < 50 leaves fewer than 10 weights in the tail).

    Arguments are those of :func:`log_likelihood`, and ``iwae_ks``: the k of the IWAE bounds
    (each 1 <= k <= K; IWAE_1 is the ELBO).
    """
    ks = sorted(set(iwae_ks))
    if ks and (ks[0] < 1 or ks[-1] > num_samples):
        raise InputError(f"every IWAE k must lie in [1, num_samples={num_samples}], got {ks}")
    lse, lse2, total = _LogSumExp(), _LogSumExp(2.0), _Sum()
    windows = {k: _IWAEWindows(k, num_samples) for k in ks}
    largest = LargestLogWeights(tail_size(num_samples) + 1)
    _draw(
        model, guide, args, kwargs, num_samples=num_samples, chunk_size=chunk_size,
        data_plate=data_plate, progress=progress,
        sinks=[lse, lse2, total, largest, *windows.values()],
    )  # fmt: skip
    return LogLikelihood(
        log_px=lse.value - math.log(num_samples),
        elbo=total.value / num_samples,
        ess=torch.exp(2 * lse.value - lse2.value),
        iwae={k: w.mean() for k, w in windows.items()},
        num_samples=num_samples,
        pareto_k=pareto_k_of_largest(largest.value, num_samples),
    )


class _IWAEWindows:
    """Running mean of log((1/k) sum_{j in G} w_j) over the cyclic windows G of k draws that
    start at every multiple of gcd(K, k) (see :func:`log_likelihood_diagnostics`)."""

    def __init__(self, k: int, num_samples: int):
        self.k, self.num_samples, self.step = k, num_samples, math.gcd(k, num_samples)
        self.head = None  # the first k - 1 draws, for the windows that wrap around
        self.pending = None  # the draws from the next window's start on
        self.start = 0  # the index of that start
        self.sum, self.count = 0.0, 0

    def add(self, lw: Tensor) -> None:
        if self.head is None:
            self.head = lw[: self.k - 1]
        elif self.head.shape[0] < self.k - 1:
            self.head = torch.cat([self.head, lw[: self.k - 1 - self.head.shape[0]]])
        rows = lw if self.pending is None else torch.cat([self.pending, lw])
        done = self._windows(rows)
        self.pending, self.start = rows[done:], self.start + done

    def _windows(self, rows: Tensor) -> int:
        """Adds every window that starts at a multiple of step in ``rows``; the rows used up."""
        if rows.shape[0] < self.k:
            return 0
        count = (rows.shape[0] - self.k) // self.step + 1
        windows = rows[: (count - 1) * self.step + self.k].unfold(0, self.k, self.step)
        self.sum = self.sum + (torch.logsumexp(windows, -1) - math.log(self.k)).sum(0)
        self.count += count
        return count * self.step

    def mean(self) -> Tensor:
        if self.start < self.num_samples:  # the windows that wrap around to the first draws
            self._windows(torch.cat([self.pending, self.head]))
            self.start = self.num_samples
        return self.sum / self.count
