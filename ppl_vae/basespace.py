r"""A flow guide's model/guide pair moved to the flow's base space, for annealing.

A flow guide draws :math:`z = T_x(\varepsilon)`, :math:`\varepsilon \sim b(\varepsilon|x)`, and its
density at any other :math:`z` needs :math:`T_x^{-1}`: none for planar, radial and Sylvester
steps, and one sequential pass per latent dimension for autoregressive steps. Annealing moves
the chains to points the guide did not draw, so it works in :math:`\varepsilon` instead, with

.. math::
    q'(\varepsilon|x) = b(\varepsilon|x), \qquad
    p'(x, \varepsilon) = p(x, T_x(\varepsilon))\,
        \left|\det \partial T_x / \partial \varepsilon\right|

whose marginal :math:`\int p'(x, \varepsilon)\, d\varepsilon = p(x)` is the model's own (a change
of variables), so :math:`\log p(x)` is unchanged, and every density is a forward pass of the flow.
The tempered targets :math:`q'^{1-\beta} p'^{\beta}` are those of :math:`z` space pushed through
:math:`T_x^{-1}`.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import torch
from pyro import poutine
from torch import Tensor
from torch.distributions import TransformedDistribution
from torch.distributions.utils import _sum_rightmost

from ppl_vae.errors import InputError
from ppl_vae.sites import LATENT, PLATE, sample_sites

__all__ = ["in_base_space", "is_flow_guide", "to_base"]

FACTOR = "base_space_log_density"  # the model's site holding log p(x, T(eps)) + log |det| - log b


def _flow(guide, x: Tensor) -> TransformedDistribution | None:
    distribution = getattr(guide, "distribution", None)
    if not callable(distribution):
        return None
    d = distribution(x)
    return d if isinstance(d, TransformedDistribution) and d.transforms else None


def is_flow_guide(guide, x: Tensor) -> bool:
    """Whether ``guide.distribution(x)`` is a flow (a ``TransformedDistribution`` with steps)."""
    with torch.no_grad(), poutine.block():
        return _flow(guide, x) is not None


def to_base(guide, x: Tensor, z: Tensor) -> Tensor:
    r""":math:`\varepsilon = T_x^{-1}(z)`, the base draw of the flow guide that gives ``z``; an
    error for steps without an inverse."""
    flow = _flow(guide, x)
    try:
        for t in reversed(flow.transforms):
            z = t.inv(z)
    except (NotImplementedError, KeyError):  # Pyro's planar/radial: only cached values
        raise InputError(
            f"the flow guide's steps have no inverse ({type(t).__name__}), which starting at a "
            f"given z needs (bdmc's reverse chains): use a guide with invertible steps (iaf, "
            f"spline) or a Gaussian guide"
        ) from None
    return z


def _push(flow: TransformedDistribution, eps: Tensor) -> tuple[Tensor, Tensor]:
    """``z = T(eps)`` and log |det dz/deps|, summed over the event, shape ``eps.shape[:-1]``."""
    z, log_det, event_dim = eps, 0.0, len(flow.event_shape)
    for t in flow.transforms:
        y = t(z)
        j = t.log_abs_det_jacobian(z, y)
        log_det = log_det + _sum_rightmost(j, event_dim - t.domain.event_dim)
        z = y
    return z, log_det


def in_base_space(model: Callable, guide) -> tuple[Callable, Callable]:
    r"""``(model', guide')`` over the base draw :math:`\varepsilon` of the flow guide ``guide``
    (module docstring): same ``log p(x)``, and densities that need no inverse of the flow.

    ``guide`` is an amortized guide whose ``distribution(x)`` is a ``TransformedDistribution``
    sampled at the site ``"z"`` in the ``"data"`` plate (the flow guides of
    :mod:`ppl_vae.guides`); ``model`` is a Pyro model with that one latent site, called as
    ``model(x, ...)``. In ``model'`` the site ``"z"`` holds :math:`\varepsilon` and a factor
    holds :math:`\log p(x, T(\varepsilon)) + \log|\det| - \log b(\varepsilon)`; ``model`` itself
    runs hidden (``poutine.block``) with ``"z"`` conditioned on :math:`T(\varepsilon)`.
    Nothing is trained through the pair: it is for estimators that hold both programs fixed
    (the log-densities are unscaled: ``num_data`` is not applied).
    """

    def checked_flow(x):
        flow = _flow(guide, x)
        if flow is None:
            raise InputError(
                f"in_base_space needs a flow guide (distribution(x) a TransformedDistribution), "
                f"got {type(guide).__name__}"
            )
        return flow

    def base_guide(x, *args, **kwargs):
        flow = checked_flow(x)
        with pyro.plate(PLATE, x.shape[0], dim=-1):
            return pyro.sample(LATENT, flow.base_dist)

    def base_model(x, *args, **kwargs):
        flow = checked_flow(x)
        plate = pyro.plate(PLATE, x.shape[0], dim=-1)  # entered twice: one plate, one site
        with plate:
            eps = pyro.sample(LATENT, flow.base_dist)
        z, log_det = _push(flow, eps)
        with poutine.block():
            inner = poutine.trace(poutine.condition(model, data={LATENT: z}))
            trace = inner.get_trace(x, *args, **kwargs)
        if any(not s["is_observed"] and s["name"] != LATENT for s in sample_sites(trace)):
            raise InputError("in_base_space takes a model whose only latent site is 'z'")
        log_p = sum(s["fn"].log_prob(s["value"]) for s in sample_sites(trace))
        with plate:
            pyro.factor(FACTOR, log_p + log_det - flow.base_dist.log_prob(eps))
        return z

    return base_model, base_guide
