r"""SVI losses: Pyro's trace ELBOs without host reads, the IWAE bound, and the loss table.

``pyro.infer.Trace_ELBO`` and ``TraceMeanField_ELBO`` read every site's log-density sum back
with ``.item()`` to report the loss as a float, which on a GPU waits for the device three times
per step. The two classes here run the same programs under the same Pyro handlers (the guide
traced, the model replayed against it, plates, scales and masks) and return the same value and
gradient as a tensor. They also sum the log-densities of sites that share a scale before
applying it, one multiplication per scale instead of one per site.

Guides whose latent sites are all reparameterized take this path. Any other guide gets Pyro's
own estimator, score-function terms included. :class:`IWAELoss` is the importance-weighted
bound of Burda et al. (2015), and :data:`LOSSES` names the three for configurations.
"""

from __future__ import annotations

import math

import torch
from pyro.distributions import Distribution
from pyro.distributions.kl import kl_divergence
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from pyro.distributions.util import scale_and_mask
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.trace_mean_field_elbo import _check_mean_field_requirement
from pyro.infer.util import check_fully_reparametrized, is_validation_enabled
from pyro.poutine.scale_messenger import ScaleMessenger
from pyro.poutine.util import prune_subsample_sites, site_is_subsample
from pyro.util import check_if_enumerated, check_model_guide_match, check_site_shape
from torch import Tensor

from ppl_vae.errors import InputError
from ppl_vae.importance import importance_log_weights
from ppl_vae.registry import Registry
from ppl_vae.sites import LATENT, PLATE, sample_sites, trace_guide_and_model

__all__ = [
    "LOSSES",
    "IWAELoss",
    "LatentScaleMessenger",
    "TraceELBO",
    "TraceMeanFieldELBO",
    "scale_latent",
]


def _log_prob(site: dict) -> Tensor:
    if "unscaled_log_prob" in site:  # computed already, for validation
        return site["unscaled_log_prob"]
    return site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])


def _not_subsample(name: str, site: dict) -> bool:
    return not site_is_subsample(site)


_DELEGATING = (ExpandedDistribution.score_parts, MaskedDistribution.score_parts)


def _reparameterized(fn) -> bool:
    """Whether Pyro's estimator has no score-function term at a guide site with ``fn``.

    That is the case for a reparameterized distribution that keeps Pyro's default
    ``score_parts``; some (e.g. ``pyro.distributions.Rejector``) override it to add a
    score-function term to their reparameterized draws.
    """
    while type(fn).score_parts in _DELEGATING:
        fn = fn.base_dist
    return fn.has_rsample and type(fn).score_parts is Distribution.score_parts


class _Terms:
    r"""A sum of per-site log-density terms, grouped by the scale they share.

    ``add(term, scale, mask)`` adds ``scale * term`` (masked); terms of one shape and one scale
    are added before the scale is applied, and ``total()`` sums what is left.
    """

    def __init__(self):
        self.groups: dict[tuple, list] = {}
        self.rest: list[Tensor] = []

    def add(self, term: Tensor, scale, mask=None, sign: float = 1.0) -> None:
        if mask is not None or (torch.is_tensor(scale) and scale.dim() > 0):
            self.rest.append(sign * scale_and_mask(term, scale, mask).sum())
            return
        key = (scale if not torch.is_tensor(scale) else id(scale), term.shape)
        if key in self.groups:
            group = self.groups[key]
            group[1] = group[1] + term if sign > 0 else group[1] - term
        else:
            self.groups[key] = [scale, term if sign > 0 else -term]

    def total(self) -> Tensor:
        sums = [scale_and_mask(term.sum(), scale) for scale, term in self.groups.values()]
        return sum(sums[1:] + self.rest, start=sums[0]) if sums else sum(self.rest)


class _HostFree:
    """Traces without Pyro's copies and log-density bookkeeping; the loss as a tensor."""

    def _get_trace(self, model, guide, args, kwargs):
        model_trace, guide_trace = trace_guide_and_model(model, guide, args, kwargs)
        if is_validation_enabled():
            check_model_guide_match(model_trace, guide_trace, self.max_plate_nesting)
            check_if_enumerated(guide_trace)
            model_trace.compute_log_prob(site_filter=_not_subsample)  # warns on NaN
            prune_subsample_sites(guide_trace).compute_score_parts()  # same site dicts
            for site in sample_sites(model_trace) + sample_sites(guide_trace):
                check_site_shape(site, self.max_plate_nesting)
        return model_trace, guide_trace

    def differentiable_loss(self, model, guide, *args, **kwargs) -> Tensor:
        """The negative ELBO estimate as a tensor whose gradient is the ELBO's gradient."""
        elbos = []
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            if all(_reparameterized(site["fn"]) for site in sample_sites(guide_trace)):
                elbo = self._elbo_particle(model_trace, guide_trace)
            else:  # score-function terms: Pyro's own estimator
                model_trace = prune_subsample_sites(model_trace)
                guide_trace = prune_subsample_sites(guide_trace)
                model_trace.compute_log_prob()
                guide_trace.compute_score_parts()
                loss, surrogate = self._pyro_particle(model_trace, guide_trace)
                elbo = -surrogate + (surrogate.detach() - loss)  # the ELBO's value
            elbos.append(elbo)
        elbo = torch.as_tensor(elbos[0] if len(elbos) == 1 else sum(elbos) / len(elbos))
        if self.vectorize_particles and self.num_particles > 1:
            elbo = elbo / self.num_particles  # one trace, its sites summed over the particles
        return -elbo

    def loss(self, model, guide, *args, **kwargs) -> float:
        """The negative ELBO estimate as a float."""
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """The negative ELBO estimate as a float; its gradient is accumulated in ``.grad``."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward()
        return float(loss.detach())


class TraceELBO(_HostFree, Trace_ELBO):
    r"""``pyro.infer.Trace_ELBO``: :math:`\log p(x, z) - \log q(z|x)` at a draw from the guide."""

    _pyro_particle = Trace_ELBO._differentiable_loss_particle

    def _elbo_particle(self, model_trace, guide_trace) -> Tensor:
        terms = _Terms()
        for site in sample_sites(model_trace):
            terms.add(_log_prob(site), site["scale"], site["mask"])
        for site in sample_sites(guide_trace):
            terms.add(_log_prob(site), site["scale"], site["mask"], sign=-1.0)
        return terms.total()


class TraceMeanFieldELBO(_HostFree, TraceMeanField_ELBO):
    r"""``pyro.infer.TraceMeanField_ELBO``: the KL term in closed form where one is registered.

    For each latent site, :math:`-\mathrm{KL}(q \| p)` replaces
    :math:`\log p(z) - \log q(z|x)` when ``kl_divergence`` knows the pair; otherwise both
    log-densities are taken at the draw, as in Pyro.
    """

    _pyro_particle = TraceMeanField_ELBO._differentiable_loss_particle

    def _get_trace(self, model, guide, args, kwargs):
        model_trace, guide_trace = super()._get_trace(model, guide, args, kwargs)
        if is_validation_enabled():
            _check_mean_field_requirement(model_trace, guide_trace)
            for site in sample_sites(guide_trace):
                check_fully_reparametrized(site)
        return model_trace, guide_trace

    def _elbo_particle(self, model_trace, guide_trace) -> Tensor:
        terms = _Terms()
        for site in sample_sites(model_trace):
            name = site["name"]
            if site["is_observed"] or name not in guide_trace.nodes:
                terms.add(_log_prob(site), site["scale"], site["mask"])
                continue
            guide_site = guide_trace.nodes[name]
            try:
                kl = kl_divergence(guide_site["fn"], site["fn"])
            except NotImplementedError:
                terms.add(_log_prob(site), site["scale"], site["mask"])
                terms.add(_log_prob(guide_site), guide_site["scale"], guide_site["mask"], -1.0)
            else:
                if torch.is_tensor(kl):
                    terms.add(kl, guide_site["scale"], guide_site["mask"], sign=-1.0)
                else:  # a number for the whole batch, e.g. 0 for a site masked off
                    kl = scale_and_mask(kl, guide_site["scale"], guide_site["mask"])
                    terms.rest.append(-kl * guide_site["fn"].batch_shape.numel())
        for site in sample_sites(guide_trace):  # auxiliary guide sites
            if site["name"] not in model_trace.nodes:
                terms.add(_log_prob(site), site["scale"], site["mask"], sign=-1.0)
        return terms.total()


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
            raise InputError(f"num_particles must be a positive integer, got {num_particles}")
        self.num_particles, self.max_plate_nesting = num_particles, max_plate_nesting
        self.data_plate = data_plate

    def differentiable_loss(self, model, guide, *args, **kwargs) -> Tensor:
        """The negative bound as a tensor whose gradient is the bound's gradient."""
        log_w, scale = importance_log_weights(
            model, guide, self.num_particles, args, kwargs, self.data_plate, self.max_plate_nesting
        )
        bound = torch.logsumexp(log_w, 0) - math.log(self.num_particles)
        return -(bound.sum() * scale)

    def loss(self, model, guide, *args, **kwargs) -> float:
        """The negative bound as a float."""
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))


LOSSES: Registry = Registry("loss")


@LOSSES.register("elbo", options=("num_particles",), help="Trace_ELBO")
def _trace_elbo(num_particles: int = 1) -> TraceELBO:
    return TraceELBO(
        num_particles=num_particles, vectorize_particles=num_particles > 1, max_plate_nesting=1
    )


@LOSSES.register("meanfield", options=("num_particles",), help="TraceMeanField_ELBO (analytic KL)")
def _trace_mean_field_elbo(num_particles: int = 1) -> TraceMeanFieldELBO:
    return TraceMeanFieldELBO(
        num_particles=num_particles, vectorize_particles=num_particles > 1, max_plate_nesting=1
    )


@LOSSES.register("iwae", options=("num_particles",), help="the IWAE bound, k = --num-particles")
def _iwae(num_particles: int = 1) -> IWAELoss:
    return IWAELoss(num_particles=num_particles, max_plate_nesting=1)


class LatentScaleMessenger(ScaleMessenger):
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


def scale_latent(scale: float, sites: frozenset[str] = frozenset({LATENT})) -> LatentScaleMessenger:
    """A handler scaling the log-densities of the latent ``sites`` by ``scale`` (the KL weight).

    Example: ``scale_latent(0.5)(model)`` is ``model`` with its KL term halved.
    """
    return LatentScaleMessenger(scale, sites)
