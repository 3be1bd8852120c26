r"""SVI losses: Pyro's trace ELBOs without host reads, the IWAE bound, and the loss table.

``pyro.infer.Trace_ELBO`` and ``TraceMeanField_ELBO`` read every site's log-density sum back
with ``.item()`` to report the loss as a float, which on a GPU waits for the device three times
per step. The two classes here run the same programs under the same Pyro handlers (the guide
traced, the model replayed against it, plates, scales and masks) and return the value and
gradient as a tensor; they agree with Pyro's to rounding (the differential test
``tests/test_losses_against_pyro.py``; the measured deviations are in docs/RESULTS.md), and
raise a clear error in the two cases where Pyro's mean-field ELBO fails with a bare
``KeyError``/``AssertionError``. They also sum the log-densities of sites that share a scale
before applying it, one multiplication per scale instead of one per site.

Guides whose latent sites are all reparameterized take this path. Any other guide gets Pyro's
own estimator, score-function terms included. :class:`IWAELoss` is the importance-weighted
bound of Burda et al. (2015), and :data:`LOSSES` names the three for configurations.
"""

# Pyro internals relied on here, verified with pyro-ppl 1.9.0, 1.9.1 and 1.9.2 (pyproject.toml
# bounds pyro-ppl to >=1.9,<1.10; check them again before widening it): the private methods
# Trace_ELBO._differentiable_loss_particle and TraceMeanField_ELBO._differentiable_loss_particle
# (the score-function path), ELBO._get_traces calling self._get_trace(model, guide, args, kwargs)
# (overridden here), pyro.infer.trace_mean_field_elbo._check_mean_field_requirement,
# ScaleMessenger._process_message, Distribution.score_parts left alone as the mark of a draw
# without a score-function term (ExpandedDistribution and MaskedDistribution delegating it to
# .base_dist), and the trace site fields "scale", "mask", "cond_indep_stack" and
# "unscaled_log_prob" (read in ppl_vae.sites).

from __future__ import annotations

import math

import torch
from pyro import poutine
from pyro.distributions import (
    Distribution,
    Independent,
    LowRankMultivariateNormal,
    MultivariateNormal,
    Normal,
)
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

from ppl_vae.compat import ignored_keyword
from ppl_vae.distributions import StandardNormal
from ppl_vae.errors import InputError
from ppl_vae.registry import Registry
from ppl_vae.sites import (
    LATENT,
    WeightTerms,
    log_density,
    log_weights_of_traces,
    pad_to_rank,
    plate_dims,
    plate_frames,
    sample_sites,
    trace_guide_and_model,
    under_particle_plate,
)

__all__ = [
    "LOSSES",
    "IWAELoss",
    "LatentScaleMessenger",
    "TraceELBO",
    "TraceMeanFieldELBO",
    "gaussian_kl_or_pyros",
    "scale_latent",
]


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


def _validate(model_trace, guide_trace, max_plate_nesting: int) -> None:
    """Pyro's checks of a model/guide pair (``get_importance_trace`` under validation)."""
    check_model_guide_match(model_trace, guide_trace, max_plate_nesting)
    check_if_enumerated(guide_trace)
    model_trace.compute_log_prob(site_filter=_not_subsample)  # warns on NaN
    prune_subsample_sites(guide_trace).compute_score_parts()  # same site dicts
    for site in sample_sites(model_trace) + sample_sites(guide_trace):
        check_site_shape(site, max_plate_nesting)


class _HostFree:
    """Traces without Pyro's copies and log-density bookkeeping; the loss as a tensor."""

    def _get_trace(self, model, guide, args, kwargs):
        model_trace, guide_trace = trace_guide_and_model(model, guide, args, kwargs)
        if is_validation_enabled():
            _validate(model_trace, guide_trace, self.max_plate_nesting)
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
        return log_weights_of_traces(model_trace, guide_trace, scaled=True)


def _diagonal_normal(d: Distribution) -> tuple[Tensor, Tensor] | None:
    """loc and scale of a diagonal Gaussian vector (``Independent(Normal, 1)``), else None."""
    while isinstance(d, ExpandedDistribution):
        d = d.base_dist
    if not (isinstance(d, Independent) and d.reinterpreted_batch_ndims == 1):
        return None
    base = d.base_dist
    while isinstance(base, ExpandedDistribution):
        base = base.base_dist
    if not isinstance(base, (Normal, StandardNormal)):
        return None
    shape = d.batch_shape + d.event_shape
    return base.mean.expand(shape), base.variance.sqrt().expand(shape)


def gaussian_kl_or_pyros(q: Distribution, p: Distribution) -> Tensor:
    r""":math:`\mathrm{KL}(q \| p)` as Pyro's ``kl_divergence`` gives it, and also in closed form
    for a full- or low-rank Gaussian ``q`` against a diagonal Gaussian ``p`` (the prior N(0, I)
    written as ``Independent(Normal, 1)``), a pair neither torch nor Pyro registers: ``p`` is
    rewritten as the ``MultivariateNormal`` with the same density. Raises
    ``NotImplementedError`` for other unregistered pairs."""
    try:
        return kl_divergence(q, p)
    except NotImplementedError:
        diagonal = _diagonal_normal(p)
        if diagonal is None or not isinstance(q, (MultivariateNormal, LowRankMultivariateNormal)):
            raise
        loc, scale = diagonal
        return kl_divergence(q, MultivariateNormal(loc, scale_tril=torch.diag_embed(scale)))


class TraceMeanFieldELBO(_HostFree, TraceMeanField_ELBO):
    r"""``pyro.infer.TraceMeanField_ELBO``: the KL term in closed form where one is registered.

    For each latent site, :math:`-\mathrm{KL}(q \| p)` replaces
    :math:`\log p(z) - \log q(z|x)` when ``kl_divergence`` knows the pair; otherwise both
    log-densities are taken at the draw, as in Pyro. With ``gaussian_kl=True`` (the
    ``meanfield`` loss of :data:`LOSSES`) a full- or low-rank Gaussian guide against a
    diagonal Gaussian prior gets the closed form too (:func:`gaussian_kl`), where Pyro's
    takes the draw: the same expectation, without the draw's noise.
    """

    _pyro_particle = TraceMeanField_ELBO._differentiable_loss_particle

    def __init__(self, *args, gaussian_kl: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.kl = gaussian_kl_or_pyros if gaussian_kl else kl_divergence

    def _get_trace(self, model, guide, args, kwargs):
        model_trace, guide_trace = super()._get_trace(model, guide, args, kwargs)
        if is_validation_enabled():
            # on the traces without the plates' subsample sites, as Pyro's checks them
            _check_mean_field_requirement(
                prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)
            )
            for site in sample_sites(guide_trace):
                check_fully_reparametrized(site)
        return model_trace, guide_trace

    def _elbo_particle(self, model_trace, guide_trace) -> Tensor:
        terms = WeightTerms()
        for site in sample_sites(model_trace):
            name = site["name"]
            if site["is_observed"]:
                terms.add(log_density(site), site["scale"], site["mask"])
                continue
            if name not in guide_trace.nodes:  # Pyro's raises a KeyError here
                raise InputError(
                    f"the model's latent site {name!r} is not in the guide; the mean-field ELBO "
                    f"needs the guide to draw every latent site of the model"
                )
            guide_site = guide_trace.nodes[name]
            try:
                kl = self.kl(guide_site["fn"], site["fn"])
            except NotImplementedError:
                terms.add(log_density(site), site["scale"], site["mask"])
                terms.add(log_density(guide_site), guide_site["scale"], guide_site["mask"], -1.0)
            else:
                if torch.is_tensor(kl):
                    terms.add(kl, guide_site["scale"], guide_site["mask"], sign=-1.0)
                else:  # a number for the whole batch, e.g. 0 for a site masked off
                    kl = scale_and_mask(kl, guide_site["scale"], guide_site["mask"])
                    terms.rest.append(-kl * guide_site["fn"].batch_shape.numel())
        for site in sample_sites(guide_trace):  # auxiliary guide sites
            if site["name"] not in model_trace.nodes:
                if not site["infer"].get("is_auxiliary"):  # Pyro's asserts it
                    raise InputError(
                        f"the guide site {site['name']!r} is not in the model; the mean-field "
                        f"ELBO needs it marked infer={{'is_auxiliary': True}}"
                    )
                terms.add(log_density(site), site["scale"], site["mask"], sign=-1.0)
        return terms.total()


class IWAELoss:
    r"""The importance-weighted bound of Burda et al. (2015) as a loss.

    .. math::
        \mathcal{L}_k(x_i) = \log \frac{1}{k} \sum_{j=1}^k \frac{p(x_i, z_j)}{q(z_j|x_i)},
        \qquad z_j \sim q(z|x_i)

    The k draws are vectorized under an outer particle plate, and the log-weights come from
    :func:`ppl_vae.sites.log_weights_of_traces`, so masks count as in Pyro. Which bound:

    - **Per point** when every model site lies in some plate (the data plate, at any dim): the
      log-sum-exp is taken per element of the plates common to all model sites, as in Pyro's
      ``RenyiELBO(alpha=0)``. If every site has one and the same scale (the mini-batch scale
      ``num_data / N``, say; a Python number), it is applied after the log-sum-exp: the bound
      of the full data set under subsampling. Pyro scales the log-weights before it instead;
      that is the one place where the two differ, on purpose. Sites with different or tensor
      scales are scaled before the log-sum-exp, as in Pyro.
    - **Joint** when a model site lies outside every plate (a global latent): one bound for the
      whole batch, Pyro's.

    With reparameterized guides the gradient is that of Burda et al.: the normalized weights
    times the gradients of the log-weights. A guide site without a reparameterized draw is an
    error (Pyro's ``RenyiELBO(alpha=0)`` gives such sites no score-function term).
    ``num_particles=1`` gives the ELBO.

    Arguments:
        num_particles: k.
        max_plate_nesting: Plates nested in the model, as in Pyro's ELBOs; ``None`` finds it
            from a first run of the model and guide.
    """

    def __init__(self, num_particles: int = 5, max_plate_nesting: int | None = None, **legacy):
        if "data_plate" in legacy:  # ppl_vae.compat: 0.1 took the data plate's name
            legacy.pop("data_plate")
            ignored_keyword("IWAELoss", "data_plate", "the kept plates come from the trace")
        if legacy:
            raise TypeError(f"IWAELoss got unexpected keywords {sorted(legacy)}")
        if (
            isinstance(num_particles, bool)
            or not isinstance(num_particles, int)
            or num_particles < 1
        ):
            raise InputError(f"num_particles must be a positive integer, got {num_particles}")
        self.num_particles, self.max_plate_nesting = num_particles, max_plate_nesting

    def _nesting(self, model, guide, args, kwargs) -> int:
        if self.max_plate_nesting is None:
            with poutine.block(), torch.random.fork_rng(_cuda_devices(args)):  # draws unchanged
                traces = trace_guide_and_model(model, guide, args, kwargs)
            dims = [-d for tr in traces for site in sample_sites(tr) for d in plate_dims(site)]
            self.max_plate_nesting = max(dims, default=0)
        return self.max_plate_nesting

    def differentiable_loss(self, model, guide, *args, **kwargs) -> Tensor:
        """The negative bound as a tensor whose gradient is the bound's gradient."""
        k = self.num_particles
        particle_dim = -self._nesting(model, guide, args, kwargs) - 1
        model_trace, guide_trace = trace_guide_and_model(
            under_particle_plate(model, k, particle_dim),
            under_particle_plate(guide, k, particle_dim),
            args,
            kwargs,
        )
        if is_validation_enabled():
            _validate(model_trace, guide_trace, -particle_dim)
        guide_sites, model_sites = sample_sites(guide_trace), sample_sites(model_trace)
        for site in guide_sites:
            if not _reparameterized(site["fn"]):
                raise InputError(
                    f"IWAELoss needs reparameterized guide sites, but {site['name']!r} is drawn "
                    f"from {type(site['fn']).__name__}; use TraceELBO for score-function guides"
                )
        # the plates common to all model sites (Pyro's rule), the particles' included
        common = set.intersection(*map(plate_frames, model_sites)) if model_sites else set()
        scales = [site["scale"] for site in model_sites + guide_sites]
        shared = scales[0] if _all_same(scales) and len(common) > 1 else None
        keep = {f.dim for f in common}
        lw = log_weights_of_traces(model_trace, guide_trace, keep_dims=keep, scaled=shared is None)
        lw = pad_to_rank(lw, -particle_dim)
        bound = torch.logsumexp(lw, lw.dim() + particle_dim) - math.log(k)
        if lw.shape[lw.dim() + particle_dim] == 1:  # no site depends on the draws
            bound = bound + math.log(k)
        total = bound.sum()
        return -(total * shared if shared is not None else total)

    def loss(self, model, guide, *args, **kwargs) -> float:
        """The negative bound as a float."""
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))


def _cuda_devices(args: tuple) -> list[int]:
    return sorted({a.device.index or 0 for a in args if torch.is_tensor(a) and a.is_cuda})


def _all_same(scales: list) -> bool:
    """Whether every scale is the same Python number (or the same tensor object)."""
    first = scales[0]
    if torch.is_tensor(first):
        return all(s is first for s in scales)
    return all(not torch.is_tensor(s) and s == first for s in scales)


LOSSES: Registry = Registry("loss")


@LOSSES.register("elbo", options=("num_particles",), help="Trace_ELBO")
def _trace_elbo(num_particles: int = 1) -> TraceELBO:
    return TraceELBO(
        num_particles=num_particles, vectorize_particles=num_particles > 1, max_plate_nesting=1
    )


@LOSSES.register(
    "meanfield",
    options=("num_particles",),
    help="TraceMeanField_ELBO (analytic KL; also for lowrank/fullrank)",
)
def _trace_mean_field_elbo(num_particles: int = 1) -> TraceMeanFieldELBO:
    return TraceMeanFieldELBO(
        num_particles=num_particles, vectorize_particles=num_particles > 1, max_plate_nesting=1,
        gaussian_kl=True,
    )  # fmt: skip


@LOSSES.register("iwae", options=("num_particles",), help="the IWAE bound, k = --num-particles")
def _iwae(num_particles: int = 1) -> IWAELoss:
    return IWAELoss(num_particles=num_particles, max_plate_nesting=1)  # the VAE's one plate


class LatentScaleMessenger(ScaleMessenger):
    r"""``pyro.poutine.scale`` restricted to the latent site(s).

    Applied to both model and guide it weights :math:`\log p(z) - \log q(z|x)`, i.e. the KL
    term of the ELBO, by ``scale`` and leaves :math:`\log p(x|z)` alone.
    """

    def __init__(self, scale: float, sites: frozenset[str] = frozenset({LATENT})):
        # ScaleMessenger refuses 0; a KL weight of 0 (``TrainConfig.kl_delay``) is meant
        super().__init__(1.0)
        self.scale = scale
        self.sites = sites

    def _process_message(self, msg):
        if msg["name"] in self.sites:
            super()._process_message(msg)


def scale_latent(scale: float, sites: frozenset[str] = frozenset({LATENT})) -> LatentScaleMessenger:
    """A handler scaling the log-densities of the latent ``sites`` by ``scale`` (the KL weight).

    Example: ``scale_latent(0.5)(model)`` is ``model`` with its KL term halved.
    """
    return LatentScaleMessenger(scale, sites)
