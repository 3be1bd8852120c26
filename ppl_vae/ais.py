r"""Annealed importance sampling: log p(x) per data point from the guide's q(z|x) to the posterior
p(z|x) through Hamiltonian Monte Carlo transitions, and bidirectional Monte Carlo bounds.

:func:`annealed_log_likelihood` estimates :math:`\log p(x_i)` for every point (a stochastic lower
bound: its expectation is at most the true value); :func:`bdmc` simulates points from the model
and brackets their :math:`\log p(x)` between forward AIS and reverse AIS started at the simulated
latents (Grosse et al., 2015; Wu et al., 2017). The latents are moved as one tensor of shape
(chains, points, D) in unconstrained space (:mod:`ppl_vae.hmc`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from pyro import poutine
from torch import Tensor

from ppl_vae.basespace import in_base_space, is_flow_guide, to_base
from ppl_vae.errors import InputError
from ppl_vae.hmc import Latents, State, Target, hmc_step
from ppl_vae.importance import checked_inputs, default_chunk_size, module_parameter
from ppl_vae.sites import LATENT, PLATE, DataPlateLayout, sample_sites, under_particle_plate

__all__ = [
    "SCHEDULES",
    "AnnealedLogLikelihood",
    "BDMC",
    "annealed_log_likelihood",
    "annealing_schedule",
    "bdmc",
]

SIGMOID_SHARPNESS = 4.0  # delta of the sigmoid schedule (Wu et al., 2017)
GEOMETRIC_START = 1e-3  # the first positive beta of the geometric schedule
ADAPT_RATE = 0.5  # step size *= exp(rate * (mean acceptance - target)) after every transition


def _sigmoid(num_steps: int) -> Tensor:
    t = torch.linspace(-1.0, 1.0, num_steps + 1, dtype=torch.float64)
    s = torch.sigmoid(SIGMOID_SHARPNESS * t)
    return (s - s[0]) / (s[-1] - s[0])


def _geometric(num_steps: int) -> Tensor:
    if num_steps == 1:
        return torch.tensor([0.0, 1.0], dtype=torch.float64)
    exponents = torch.linspace(1.0, 0.0, num_steps, dtype=torch.float64)
    return torch.cat([torch.zeros(1, dtype=torch.float64), GEOMETRIC_START**exponents])


SCHEDULES = {"sigmoid": _sigmoid, "geometric": _geometric}


def annealing_schedule(schedule: str, num_steps: int) -> Tensor:
    r"""The inverse temperatures :math:`0 = \beta_0 < \dots < \beta_T = 1`, float64, shape
    ``(num_steps + 1,)``: ``"sigmoid"`` spaces them as :math:`\sigma(4(2t/T - 1))` rescaled to
    [0, 1] (dense at both ends), ``"geometric"`` as :math:`10^{-3(T-t)/(T-1)}` for t >= 1."""
    if schedule not in SCHEDULES:
        raise InputError(f"schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}")
    return SCHEDULES[schedule](num_steps)


@dataclass
class AnnealedLogLikelihood:
    """Per-point results of :func:`annealed_log_likelihood` with ``diagnostics=True``; every
    tensor but ``log_weights`` has shape ``(N,)``."""

    log_px: Tensor  # log of the mean over chains of exp(log w), float64: the AIS estimate
    log_weights: Tensor  # (C, N) float64: each chain's log w
    log_weight_variance: Tensor  # variance over chains of log w (0 when q is the posterior)
    ess: Tensor  # (sum_c w_c)^2 / sum_c w_c^2, the chains' effective sample size, in [1, C]
    acceptance: Tensor  # mean HMC acceptance probability over chains and transitions
    step_size: Tensor  # the leapfrog step size after adaptation
    num_chains: int  # C
    num_steps: int  # T, the annealing steps (T - 1 transitions)


@dataclass
class BDMC:
    """Bidirectional Monte Carlo on points simulated from the model (:func:`bdmc`)."""

    x: Tensor  # (N, ...) the simulated points, x ~ p(x | z)
    latents: dict[str, Tensor]  # each latent site's simulated value, z ~ p(z)
    lower: Tensor  # (N,) forward AIS from q(z|x): E[lower] <= log p(x)
    upper: Tensor  # (N,) minus reverse AIS from z: E[upper] >= log p(x)
    forward_log_weights: Tensor  # (C, N) float64: each forward chain's log w
    reverse_log_weights: Tensor  # (C, N) float64: each reverse chain's log w' (lower is better)

    @property
    def gap(self) -> Tensor:
        """``upper - lower`` per point: an upper bound (in expectation) on either's error."""
        return self.upper - self.lower


@dataclass
class _Run:
    log_weights: Tensor  # (C, N) float64
    acceptance: Tensor  # (N,)
    step_sizes: Tensor  # (T - 1, N): the step size of each transition
    step_size: Tensor  # (N,) after the last adaptation


def _check_options(num_chains, num_steps, leapfrog_steps, step_size, target_acceptance, chunk):
    for name, value in (
        ("num_chains", num_chains), ("num_steps", num_steps),
        ("leapfrog_steps", leapfrog_steps), ("chunk_size", 1 if chunk is None else chunk),
    ):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    if not (isinstance(step_size, (int, float)) and 0 < step_size < math.inf):
        raise InputError(f"step_size must be a positive number, got {step_size!r}")
    if target_acceptance is not None and not 0 < target_acceptance < 1:
        raise InputError(
            f"target_acceptance must lie in (0, 1), or be None to keep step_size fixed, got "
            f"{target_acceptance!r}"
        )


def _chunks(total: int, size: int) -> list[int]:
    return [min(size, total - start) for start in range(0, total, size)]


def _target(model, guide, args, kwargs, data_plate, num_chains, chunk_size, capture=True):
    """The annealing target of the programs, checked, and the chains per pass."""
    layout = DataPlateLayout(model, guide, args, kwargs, data_plate)
    particle_dim = -layout.max_plate_nesting - 1
    target = Target(model, guide, args, kwargs, particle_dim, layout.dim, capture=capture)
    device = args[0].device if args and torch.is_tensor(args[0]) else torch.device("cpu")
    chunk = min(num_chains, chunk_size or default_chunk_size(layout.size, device))
    return target, _chunks(num_chains, chunk)


def _from_guide(target: Target, chunks: list[int]) -> list[State]:
    """Every pass's chains drawn from the guide, z ~ q(z|x), in order."""
    states = []
    for c in chunks:
        guide = under_particle_plate(target.guide, c, target.particle_dim)
        trace = poutine.trace(guide).get_trace(*target.args, **target.kwargs)
        if target.latents is None:
            model = under_particle_plate(target.model, c, target.particle_dim)
            replayed = poutine.trace(poutine.replay(model, trace=trace))
            model_trace = replayed.get_trace(*target.args, **target.kwargs)
            target.latents = Latents(model_trace, trace, target.particle_dim, target.data_dim)
        values = {s["name"]: s["value"] for s in sample_sites(trace) if not s["is_observed"]}
        states.append(target.evaluate(target.latents.flatten(values), first=not states))
    return states


def _from_values(target: Target, values: dict, chunks: list[int]) -> list[State]:
    """Every pass's chains started at the same latent values (one per point, no particles)."""
    return [target.evaluate(target.latents.flatten(values, chains=c)) for c in chunks]


def _anneal(
    target: Target, states: list[State], betas: Tensor, *, leapfrog_steps: int,
    step_size: Tensor, target_acceptance: float | None, step_sizes: Tensor | None = None,
    progress: Callable[[int], None] | None = None, done: int = 0,
) -> _Run:  # fmt: skip
    r"""AIS along ``betas`` (ascending: forward; descending: reverse) from ``states``:
    :math:`\log w \mathrel{+}= (\beta_t - \beta_{t-1})(\log p(x, z) - \log q(z|x))` at the
    current state, then an HMC transition leaving :math:`q^{1-\beta_t} p(x, z)^{\beta_t}`
    invariant, for t < T. The transitions take ``step_sizes[t - 1]`` when given, else the
    step size adapted per point from the mean acceptance of its chains."""
    sizes = [s.u.shape[0] for s in states]
    first = states[0].u
    num_points = first.shape[1]
    log_w = torch.zeros(sum(sizes), num_points, dtype=torch.float64, device=first.device)
    accepted = torch.zeros(num_points, dtype=torch.float64, device=first.device)
    used, num_steps = [], betas.shape[0] - 1
    for t in range(1, num_steps + 1):
        ratio = torch.cat([(s.log_p - s.log_q).double() for s in states])
        log_w += (betas[t] - betas[t - 1]).item() * ratio
        if t < num_steps:
            eps = step_size if step_sizes is None else step_sizes[t - 1]
            momentum = torch.randn((log_w.shape[0], *first.shape[1:]), dtype=first.dtype,
                                   device=first.device)  # fmt: skip
            log_u = torch.rand(log_w.shape, dtype=torch.float64, device=first.device).log()
            moved = [
                hmc_step(target, s, p, lu, beta=betas[t].item(), step_size=eps,
                         leapfrog_steps=leapfrog_steps)
                for s, p, lu in zip(states, momentum.split(sizes), log_u.split(sizes), strict=True)
            ]  # fmt: skip
            states = [s for s, _ in moved]
            rate = torch.cat([a for _, a in moved]).mean(0)
            accepted += rate
            used.append(eps)
            if step_sizes is None and target_acceptance is not None:
                step_size = step_size * torch.exp(ADAPT_RATE * (rate - target_acceptance))
        if progress is not None:
            progress(done + t)
    return _Run(
        log_weights=log_w,
        acceptance=accepted / max(num_steps - 1, 1),
        step_sizes=torch.stack(used) if used else log_w.new_zeros(0, num_points),
        step_size=step_size,
    )


def _log_mean_exp(log_w: Tensor) -> Tensor:
    return torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])


def annealed_log_likelihood(
    model: Callable,
    guide: Callable,
    *args,
    num_chains: int = 16,
    num_steps: int = 500,
    schedule: str = "sigmoid",
    leapfrog_steps: int = 5,
    step_size: float = 0.1,
    target_acceptance: float | None = 0.65,
    chunk_size: int | None = None,
    data_plate: str = PLATE,
    progress: Callable[[int], None] | None = None,
    diagnostics: bool = False,
    base_space: bool | None = None,
    capture: bool = True,
    **kwargs,
) -> Tensor | AnnealedLogLikelihood:
    r"""Annealed importance sampling (Neal, 2001) of :math:`\log p(x_i)` for every data point,
    from the guide's :math:`q(z|x_i)` to the posterior through the targets
    :math:`\gamma_t(z) = q(z|x_i)^{1-\beta_t}\, p(x_i, z)^{\beta_t}`.

    .. math::
        \log w = \sum_{t=1}^{T} (\beta_t - \beta_{t-1})
            \left[\log p(x_i, z_{t-1}) - \log q(z_{t-1} | x_i)\right], \qquad
        \hat p(x_i) = \frac{1}{C} \sum_{c=1}^{C} w_c

    with :math:`z_0 \sim q(z|x_i)` and :math:`z_t` an HMC transition (``leapfrog_steps``
    leapfrog steps, identity mass, a Metropolis test per chain) from :math:`z_{t-1}` leaving
    :math:`\gamma_t` invariant. Latent sites with a constrained support move in unconstrained
    space (``biject_to`` and its log-Jacobian). The step size is per point; after every
    transition it is multiplied by :math:`\exp(0.5(\bar a_i - a^*))`, :math:`\bar a_i` the mean
    acceptance probability of the point's chains and :math:`a^*` = ``target_acceptance``.
    (Adapting from the chains' own past makes the estimate not exactly unbiased, as in Wu et
    al., 2017; ``target_acceptance=None`` keeps ``step_size`` fixed.) Log-weights accumulate
    in float64. With ``num_steps=1`` this is importance sampling with K = ``num_chains``.

    The programs are those of :func:`ppl_vae.importance.log_likelihood` (every sample site in
    the data plate, not subsampled), with continuous latents only, and a guide whose density
    can be evaluated at any z. A flow guide (``guide.distribution(x)`` a
    ``TransformedDistribution``) is annealed in its base space instead
    (:func:`ppl_vae.basespace.in_base_space`: the same log p(x), and no inverse of the flow,
    which planar, radial and Sylvester steps lack and autoregressive ones take one pass per
    dimension to compute). The programs are run conditioned on the
    chains' values (``poutine.condition``) under an outer plate of ``chunk_size`` chains, so
    memory grows with ``chunk_size`` x N, not with ``num_chains``. The passes move in lockstep
    and take the random numbers in the order one pass would, so for one seed ``chunk_size``
    changes the result only where torch draws differently for tensors of other sizes (its CPU
    normal sampler works in blocks of 16 numbers).

    Arguments:
        model: A Pyro model taking ``*args, **kwargs`` (``x`` first).
        guide: A Pyro guide over the same latent sites: the start of the annealing (the prior,
            written as a guide, gives AIS from the prior).
        num_chains: C, independent chains per point.
        num_steps: T, the annealing steps (T - 1 HMC transitions).
        schedule: ``"sigmoid"`` or ``"geometric"`` (:func:`annealing_schedule`).
        leapfrog_steps: Leapfrog steps per transition (one gradient of both programs each).
        step_size: The initial leapfrog step size.
        target_acceptance: The acceptance the step size adapts toward, or None.
        chunk_size: Chains per vectorized pass (default: about 10,000 / N on a CPU).
        data_plate: Name of the plate over data points.
        progress: Called with the number of annealing steps done after each step.
        diagnostics: Return an :class:`AnnealedLogLikelihood` instead of the estimate alone.
        base_space: Anneal in a flow guide's base space; None (default): where the guide is
            a flow.
        capture: Record each pass's evaluation of both programs with their gradients once
            and replay it (:meth:`ppl_vae.hmc.Target.evaluate`): the same numbers, without
            Pyro's handlers at every leapfrog step (``benchmarks/ais_capture.py``); False
            runs the programs every time.

    Returns:
        A float64 tensor of shape ``(N,)``, or the record.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> def model(x):
        ...     with pyro.plate("data", len(x)):
        ...         z = pyro.sample("z", dist.Normal(0.0, 1.0))
        ...         pyro.sample("x", dist.Normal(z, 1.0), obs=x)
        >>> def guide(x):
        ...     with pyro.plate("data", len(x)):
        ...         pyro.sample("z", dist.Normal(x / 2, 0.5**0.5))  # the exact posterior
        >>> annealed_log_likelihood(model, guide, torch.tensor([0.0, 2.0]), num_steps=10)
        tensor([-1.2655, -2.2655], dtype=torch.float64)
    """
    _check_options(num_chains, num_steps, leapfrog_steps, step_size, target_acceptance, chunk_size)
    betas = annealing_schedule(schedule, num_steps)
    args, kwargs = checked_inputs(model, guide, args, kwargs)
    if base_space is None:
        base_space = bool(args) and torch.is_tensor(args[0]) and is_flow_guide(guide, args[0])
    if base_space:
        model, guide = in_base_space(model, guide)
    with torch.no_grad(), poutine.block(hide_types=["param"]):
        target, chunks = _target(
            model, guide, args, kwargs, data_plate, num_chains, chunk_size, capture
        )
        states = _from_guide(target, chunks)
        eps = torch.full_like(states[0].log_q[0], step_size, dtype=torch.float64)
        run = _anneal(
            target, states, betas, leapfrog_steps=leapfrog_steps, step_size=eps,
            target_acceptance=target_acceptance, progress=progress,
        )  # fmt: skip
    log_px = _log_mean_exp(run.log_weights)
    if not diagnostics:
        return log_px
    lw = run.log_weights
    return AnnealedLogLikelihood(
        log_px=log_px,
        log_weights=lw,
        log_weight_variance=lw.var(0, correction=0),
        ess=torch.exp(2 * torch.logsumexp(lw, 0) - torch.logsumexp(2 * lw, 0)),
        acceptance=run.acceptance,
        step_size=run.step_size,
        num_chains=num_chains,
        num_steps=num_steps,
    )


def _simulate(model: Callable, like: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """x ~ p(x|z), z ~ p(z): the model run on ``like`` with its observed site sampled."""
    observed = [
        s["name"]
        for s in sample_sites(poutine.trace(model).get_trace(like))
        if s["is_observed"] and s["value"].shape == like.shape
    ]
    if len(observed) != 1:
        raise InputError(
            f"bdmc simulates x from the model's one observed site of the shape of x "
            f"{tuple(like.shape)}, found {len(observed)}: {observed}; simulate the points "
            f"yourself and bound log p(x) with annealed_log_likelihood"
        )
    trace = poutine.trace(poutine.uncondition(model)).get_trace(like)
    latents = {s["name"]: s["value"] for s in sample_sites(trace) if s["name"] not in observed}
    return trace.nodes[observed[0]]["value"], latents


def bdmc(
    model: Callable,
    guide: Callable,
    num_points: int,
    *,
    like: Tensor | None = None,
    num_chains: int = 16,
    num_steps: int = 500,
    schedule: str = "sigmoid",
    leapfrog_steps: int = 5,
    step_size: float = 0.1,
    target_acceptance: float | None = 0.65,
    chunk_size: int | None = None,
    data_plate: str = PLATE,
    progress: Callable[[int], None] | None = None,
    base_space: bool | None = None,
    capture: bool = True,
) -> BDMC:
    r"""Bidirectional Monte Carlo (Grosse et al., 2015): ``num_points`` points simulated from the
    model, :math:`z \sim p(z)`, :math:`x \sim p(x|z)`, and two stochastic bounds on each
    :math:`\log p(x)`.

    ``lower`` is :func:`annealed_log_likelihood` from the guide. ``upper`` is reverse AIS: the
    chains start at the simulated z, an exact draw from :math:`p(z|x)`, and anneal from
    :math:`\beta = 1` to 0 through the same transitions in reverse order (the forward run's
    step sizes, reversed); their weights :math:`w'` have :math:`E[w'] = 1/p(x)`, so
    :math:`-\log \frac{1}{C}\sum_c w'_c` is at least :math:`\log p(x)` in expectation. The gap
    between the two bounds bounds the error of either (Wu et al., 2017).

    Arguments:
        model: A Pyro model taking the points ``x`` only, one observed site with x's shape.
        guide: A Pyro guide taking ``x``, as for :func:`annealed_log_likelihood`.
        num_points: N, the points to simulate.
        like: A tensor whose shape after its first dimension, dtype and device the points take
            (default: the model's ``event_shape``, the dtype and device of its parameters).
        progress: Called with the annealing steps done, forward then reverse (2T in all).

    The other arguments are those of :func:`annealed_log_likelihood`; in a flow guide's base
    space the reverse chains start at :math:`T_x^{-1}(z)`, so the flow needs an inverse.
    """
    _check_options(num_chains, num_steps, leapfrog_steps, step_size, target_acceptance, chunk_size)
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 1:
        raise InputError(f"num_points must be a positive integer, got {num_points!r}")
    betas = annealing_schedule(schedule, num_steps)
    like = _template(model, guide, num_points, like)
    with torch.no_grad(), poutine.block(hide_types=["param"]):
        x, latents = _simulate(model, like)
        start = latents
        if base_space is None:
            base_space = is_flow_guide(guide, x)
        if base_space:
            start = {LATENT: to_base(guide, x, latents[LATENT])}
            model, guide = in_base_space(model, guide)
        target, chunks = _target(
            model, guide, (x,), {}, data_plate, num_chains, chunk_size, capture
        )
        states = _from_guide(target, chunks)
        eps = torch.full_like(states[0].log_q[0], step_size, dtype=torch.float64)
        forward = _anneal(
            target, states, betas, leapfrog_steps=leapfrog_steps, step_size=eps,
            target_acceptance=target_acceptance, progress=progress,
        )  # fmt: skip
        reverse = _anneal(
            target, _from_values(target, start, chunks), betas.flip(0),
            leapfrog_steps=leapfrog_steps, step_size=eps, target_acceptance=None,
            step_sizes=forward.step_sizes.flip(0), progress=progress, done=num_steps,
        )  # fmt: skip
    return BDMC(
        x=x,
        latents=latents,
        lower=_log_mean_exp(forward.log_weights),
        upper=-_log_mean_exp(reverse.log_weights),
        forward_log_weights=forward.log_weights,
        reverse_log_weights=reverse.log_weights,
    )


def _template(model, guide, num_points: int, like: Tensor | None) -> Tensor:
    if like is not None:
        if not torch.is_tensor(like) or like.dim() == 0:
            raise InputError("like must be a tensor of shape (M, ...) with the points' shape")
        return torch.zeros((num_points, *like.shape[1:]), dtype=like.dtype, device=like.device)
    shape = getattr(model, "event_shape", None)
    if shape is None:
        raise InputError(
            "bdmc cannot tell the shape of a point from this model (it has no event_shape); "
            "pass like=<a tensor of points>, whose shape, dtype and device the points take"
        )
    ref = module_parameter(model, guide)
    dtype = ref.dtype if ref is not None else torch.get_default_dtype()
    device = ref.device if ref is not None else torch.device("cpu")
    return torch.zeros((num_points, *shape), dtype=dtype, device=device)
