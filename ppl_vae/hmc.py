r"""Hamiltonian Monte Carlo on the tempered targets of annealed importance sampling,
:math:`q(z|x)^{1-\beta} p(x, z)^\beta`, vectorized over chains and data points.

:class:`Latents` holds the latent sites of a model/guide pair as one tensor of unconstrained
values of shape (chains, points, D); :class:`Target` evaluates both programs there (conditioned
on the values) with the gradients; :func:`hmc_step` is one transition of every chain.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields

import pyro
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.distributions.transforms import biject_to
from pyro.poutine import Trace
from torch import Tensor
from torch.fx.experimental.proxy_tensor import make_fx

from ppl_vae.capture import _agree
from ppl_vae.errors import InputError
from ppl_vae.sites import (
    log_weights_of_traces,
    per_draw_and_point,
    sample_sites,
    under_particle_plate,
)

__all__ = ["Latents", "State", "Target", "hmc_step", "record_state"]


def record_state(
    fn: Callable[[Tensor], tuple[Tensor, ...]], u: Tensor, state: State
) -> Callable[[Tensor], tuple[Tensor, ...]] | None:
    """``fn`` recorded at ``u`` (its tensor operations, ``autograd.grad`` included), if the
    record gives ``state``'s values there (float rounding, as a recorded SVI step); else None,
    with a warning, and ``fn``'s programs run at every evaluation."""
    want = (state.log_q, state.log_p, state.log_jacobian, state.grad_q, state.grad_p)
    try:

        def outputs(u: Tensor) -> tuple[Tensor, ...]:  # a plain function for make_fx
            return fn(u)

        with pyro.validation_enabled(False):
            record = make_fx(outputs)(u)
        record.graph.eliminate_dead_code()
        record.recompile()
        with torch.no_grad():
            got = record(u)
        agrees = all(map(_agree, want, got))
    except Exception as e:  # any failure to trace means: run the programs
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        agrees, why = False, f"it could not be traced ({reason})"
    else:
        why = "its record gave different values"
    if agrees:
        return record
    warnings.warn(
        f"annealing evaluates the model and guide through Pyro at every step: {why}",
        RuntimeWarning,
        stacklevel=4,
    )
    return None


def _is_real(support) -> bool:
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


@dataclass
class _Site:
    name: str
    transform: object  # biject_to(the model's support), or None for a real support
    rank: int  # batch dims of the site's value under the particle plate
    particle: int  # the particle plate's position among them
    data: int  # the data plate's position among them
    rest: torch.Size  # the other dims of the unconstrained value, in order

    @property
    def size(self) -> int:
        return math.prod(self.rest)


class Latents:
    """The latent sites of a pair of traces drawn under a particle plate, as the columns of one
    ``(chains, points, D)`` tensor of unconstrained values; continuous sites only."""

    def __init__(self, model_trace: Trace, guide_trace: Trace, particle_dim: int, data_dim: int):
        self.sites = []
        for site in sample_sites(guide_trace):
            if site["is_observed"]:
                continue
            name, fn = site["name"], model_trace.nodes[site["name"]]["fn"]
            for who, f in (("model", fn), ("guide", site["fn"])):
                if f.support.is_discrete:
                    raise InputError(
                        f"the {who}'s latent site {name!r} is discrete ({type(f).__name__}); "
                        f"annealed importance sampling moves latents by Hamiltonian Monte "
                        f"Carlo, so sum it out of the model or use importance.log_likelihood"
                    )
            transform = None if _is_real(fn.support) else biject_to(fn.support)
            value = site["value"]
            rank = value.dim() - len(site["fn"].event_shape)
            u = value if transform is None else transform.inv(value)
            particle, data = rank + particle_dim, rank + data_dim
            rest = u.movedim((particle, data), (0, 1)).shape[2:]
            self.sites.append(_Site(name, transform, rank, particle, data, rest))

    def flatten(self, values: dict[str, Tensor], chains: int | None = None) -> Tensor:
        """The ``(chains, points, D)`` unconstrained values of the sites' ``values``; with
        ``chains``, values without the particle plate (one per point), repeated per chain."""
        parts = []
        for s in self.sites:
            v = values[s.name]
            if s.transform is not None:
                v = s.transform.inv(v)
            if chains is not None:
                v = v.reshape((1,) * (len(s.rest) + 2 - v.dim()) + v.shape)
                v = v.expand(*v.shape[: s.particle], chains, *v.shape[s.particle + 1 :])
            v = v.movedim((s.particle, s.data), (0, 1))
            parts.append(v.reshape(v.shape[0], v.shape[1], -1))
        return torch.cat(parts, -1)

    def constrain(self, u: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Each site's value at the unconstrained ``u`` and the log-Jacobian of the map,
        shape ``(chains, points)``."""
        values, log_jacobian = {}, u.new_zeros(u.shape[:2])
        for s, part in zip(self.sites, u.split([s.size for s in self.sites], -1), strict=True):
            v = part.reshape(*u.shape[:2], *s.rest).movedim((0, 1), (s.particle, s.data))
            if s.transform is not None:
                z = s.transform(v)
                j = s.transform.log_abs_det_jacobian(v, z)
                j = j.reshape(*j.shape[: s.rank], -1).sum(-1) if j.dim() > s.rank else j
                j = j.movedim((s.particle, s.data), (0, 1))
                log_jacobian = log_jacobian + j.reshape(*u.shape[:2], -1).sum(-1)
                v = z
            values[s.name] = v
        return values, log_jacobian


@dataclass
class State:
    """Chains at ``u`` (chains, points, D): the log-densities there, shape (chains, points),
    and their gradients with respect to ``u``."""

    u: Tensor
    log_q: Tensor  # log q(z|x)
    log_p: Tensor  # log p(x, z)
    log_jacobian: Tensor  # log |dz/du|
    grad_q: Tensor  # d (log q + log |dz/du|) / du
    grad_p: Tensor  # d (log p + log |dz/du|) / du

    def log_target(self, beta: float) -> Tensor:
        """The tempered log-density of ``u`` (of z, times the Jacobian), float64."""
        log_q, log_p = self.log_q.double(), self.log_p.double()
        return (1 - beta) * log_q + beta * log_p + self.log_jacobian.double()

    def grad(self, beta: float) -> Tensor:
        return (1 - beta) * self.grad_q + beta * self.grad_p

    def where(self, take: Tensor, other: State) -> State:
        """This state where ``take`` (chains, points) holds, ``other`` elsewhere."""
        pick = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            pick[f.name] = torch.where(take.reshape(take.shape + (1,) * (a.dim() - 2)), a, b)
        return State(**pick)


class Target:
    """The model and guide of ``args, kwargs``, evaluated at chains of latent values."""

    def __init__(
        self, model: Callable, guide: Callable, args, kwargs, particle_dim, data_dim,
        capture: bool = True,
    ):  # fmt: skip
        self.model, self.guide, self.args, self.kwargs = model, guide, args, kwargs
        self.particle_dim, self.data_dim = particle_dim, data_dim
        self.latents: Latents | None = None  # set from the first draws
        self.capture = capture
        self.records: dict[tuple, Callable | None] = {}  # per shape of u; None: not recorded

    def _per_point(self, model_trace: Trace, guide_trace: Trace, chains: int) -> Tensor:
        lw = log_weights_of_traces(
            model_trace, guide_trace, keep_dims={self.particle_dim, self.data_dim}, scaled=False
        )
        return per_draw_and_point(lw, chains, self.particle_dim, self.data_dim)

    def _trace(self, program: Callable, values: dict, chains: int) -> Trace:
        conditioned = poutine.condition(program, data=values)
        run = under_particle_plate(conditioned, chains, self.particle_dim)
        return poutine.trace(run).get_trace(*self.args, **self.kwargs)

    def evaluate(self, u: Tensor, first: bool = False) -> State:
        """Both programs at ``u``, with the gradients. ``first``: an error saying so when
        the guide cannot give its density at a point it did not draw.

        With ``capture``, the first evaluation at each shape of ``u`` runs the programs and
        records their tensor operations, gradients included (``make_fx``, as
        :class:`~ppl_vae.capture.CapturedLoss` records a step: the model's and guide's
        parameters and the data are constants of the record), checked against the programs'
        values there; later evaluations at that shape replay the record, without Pyro's
        handlers. A pair that cannot be recorded runs itself, with a warning."""
        key = (tuple(u.shape), u.dtype, u.device)
        record = self.records.get(key)
        if record is not None:
            with torch.no_grad():
                return State(u.detach(), *record(u.detach()))
        state = self._evaluate(u, first)
        if self.capture and key not in self.records:
            self.records[key] = record_state(self._outputs, u.detach(), state)
        return state

    def _outputs(self, u: Tensor) -> tuple[Tensor, ...]:
        state = self._evaluate(u)
        return state.log_q, state.log_p, state.log_jacobian, state.grad_q, state.grad_p

    def _evaluate(self, u: Tensor, first: bool = False) -> State:
        chains = u.shape[0]
        with torch.enable_grad():
            u = u.detach().requires_grad_(True)
            values, log_jacobian = self.latents.constrain(u)
            try:
                log_q = -self._per_point(Trace(), self._trace(self.guide, values, chains), chains)
            except (NotImplementedError, KeyError) as e:
                if not first:
                    raise
                raise InputError(
                    f"the guide's density cannot be evaluated at latents it did not draw "
                    f"({type(e).__name__}: {e}), which annealing needs: a flow without an "
                    f"inverse (planar, radial, sylvester) is annealed in its base space "
                    f"(base_space=True, the default for flow guides)"
                ) from e
            log_p = self._per_point(self._trace(self.model, values, chains), Trace(), chains)
            log_qj, log_pj = (log_q + log_jacobian).sum(), (log_p + log_jacobian).sum()
            grad_q = torch.autograd.grad(log_qj, u, retain_graph=True, allow_unused=True)[0]
            grad_p = torch.autograd.grad(log_pj, u, allow_unused=True)[0]
        zero = torch.zeros_like(u)
        return State(
            u.detach(), log_q.detach(), log_p.detach(), log_jacobian.detach(),
            zero if grad_q is None else grad_q, zero if grad_p is None else grad_p,
        )  # fmt: skip


def hmc_step(
    target: Target, state: State, momentum: Tensor, log_u: Tensor, *, beta: float,
    step_size: Tensor, leapfrog_steps: int,
) -> tuple[State, Tensor]:  # fmt: skip
    """One HMC transition of every chain, leaving :math:`q^{1-\\beta} p^\\beta` invariant:
    ``leapfrog_steps`` leapfrog steps of ``step_size`` (one per point) from ``state`` with
    ``momentum``, accepted where ``log_u`` (log-uniforms, chains x points) falls below the
    log acceptance ratio. Returns the new state and the acceptance probabilities."""
    eps = step_size.to(state.u.dtype)[:, None]
    p = momentum + 0.5 * eps * state.grad(beta)
    new = state
    for step in range(leapfrog_steps):
        new = target.evaluate(new.u + eps * p)
        p = p + (eps if step < leapfrog_steps - 1 else 0.5 * eps) * new.grad(beta)
    h_old = -state.log_target(beta) + 0.5 * momentum.double().pow(2).sum(-1)
    h_new = -new.log_target(beta) + 0.5 * p.double().pow(2).sum(-1)
    log_ratio = torch.nan_to_num(h_old - h_new, nan=-math.inf)  # a diverged proposal: rejected
    accept = log_u < log_ratio
    return new.where(accept, state), log_ratio.clamp(max=0.0).exp()
