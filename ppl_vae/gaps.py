r"""The inference gaps per data point: log p(x) − ELBO split into approximation and amortization.

Cremer, Li & Duvenaud (2018) split what an amortized guide loses on a point x into

.. math::
    \log p(x) - \mathcal{L}[q_\phi] =
    \underbrace{\log p(x) - \mathcal{L}[q^*]}_{\text{approximation gap}}
    + \underbrace{\mathcal{L}[q^*] - \mathcal{L}[q_\phi]}_{\text{amortization gap}}

where :math:`q_\phi(z|x)` is the encoder's output and :math:`q^*` the best member of the same
family for this x with the model fixed, found here by optimizing the family's parameters for
every point at once (:func:`fit_point_guide`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from ppl_vae.ais import annealed_log_likelihood
from ppl_vae.errors import InputError
from ppl_vae.importance import checked_inputs, default_chunk_size, log_weights_of_programs
from ppl_vae.sites import LATENT, PLATE, DataPlateLayout, data_plate

__all__ = [
    "ELBOEstimate",
    "PointFit",
    "check_family",
    "PointGuide",
    "elbo_per_point",
    "fit_point_guide",
    "inference_gaps",
]


class PointGuide(nn.Module):
    r"""q(z|x_i) = family(θ_i): one free row of parameters per data point, as a Pyro guide.

    Arguments:
        family: Maps parameters of shape ``(N, P)`` to a distribution over ``z`` with batch
            shape ``(N,)`` (an amortized guide's ``family``).
        params: The starting parameters, shape ``(N, P)`` (copied).
    """

    def __init__(self, family: Callable[[Tensor], Distribution], params: Tensor):
        super().__init__()
        self.family = family
        self.params = nn.Parameter(params.detach().clone())

    def distribution(self, x: Tensor | None = None) -> Distribution:
        return self.family(self.params)

    def forward(self, x: Tensor, num_data: int | None = None) -> Tensor:
        if x.shape[0] != self.params.shape[0]:
            raise InputError(
                f"this guide holds parameters of {self.params.shape[0]} points, got {x.shape[0]}"
            )
        with data_plate(x, num_data):
            return pyro.sample(LATENT, self.family(self.params))


@dataclass(frozen=True)
class PointFit:
    """How :func:`fit_point_guide` optimizes the per-point parameters, and when it stops."""

    lr: float = 0.02  # Adam's step; halved at every window without improvement
    num_particles: int = 16  # reparameterized draws per point and step
    window: int = 50  # steps averaged into one value of the objective
    tolerance: float = 1e-3  # nats per point: a window that gains less is no improvement
    patience: int = 3  # windows in a row without improvement that end the fit
    max_steps: int = 5000  # a cap: stopping there warns that the fit did not converge

    def __post_init__(self):
        for name in ("num_particles", "window", "patience", "max_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        for name in ("lr", "tolerance"):
            if not getattr(self, name) > 0:
                raise InputError(f"{name} must be positive, got {getattr(self, name)!r}")


def _layout(model, guide, x) -> DataPlateLayout:
    with torch.no_grad(), pyro.poutine.block(hide_types=["param"]):
        return DataPlateLayout(model, guide, (x,), {}, PLATE)


def fit_point_guide(
    model: Callable, guide: nn.Module, x: Tensor, fit: PointFit | None = None
) -> tuple[PointGuide, int, bool]:
    r"""The best q of ``guide``'s family for every point of ``x``, the model fixed.

    Starts from the guide's own parameters for each point (``guide.point_parameters(x)``) and
    ascends the sum over points of each point's ELBO, estimated from ``fit.num_particles``
    reparameterized draws, with Adam; the points share no parameter and Adam scales each
    element alone, so every point follows its own ELBO. Only the free parameters get
    gradients (the model's ``.grad`` are left alone).

    **Convergence.** Every ``fit.window`` steps, the objective averaged over the window's
    steps and over points is compared with the previous window's: a gain below
    ``fit.tolerance`` nats per point counts as no improvement and halves the learning rate
    (which also shrinks the jitter of the stochastic steps around the optimum);
    ``fit.patience`` such windows in a row end the fit. At ``fit.max_steps`` the fit stops
    and is reported as not converged. The test is on the mean over points (a slow point among
    many fast ones can still be gaining), and a window's mean is noisy by about
    sd(log w) / sqrt(num_particles · window · N): a tolerance far below that is never met.
    (On an MNIST-sized VAE, 20 points, the default stopped after 900 steps within 1e-4 nats
    of a fit run 20,000 steps.)

    Returns:
        The fitted :class:`PointGuide`, the number of steps taken, and whether it converged.
    """
    fit = fit or PointFit()
    check_family(guide)
    (x,), _ = checked_inputs(model, guide, (x,), {})
    layout = _layout(model, guide, x)
    with torch.no_grad():
        point = PointGuide(guide.family, guide.point_parameters(x))
    lr, quiet, previous, window_sum = fit.lr, 0, None, 0.0
    optimizer = torch.optim.Adam([point.params], lr=lr)
    with pyro.poutine.block(hide_types=["param"]):
        for step in range(1, fit.max_steps + 1):
            lw = log_weights_of_programs(
                model, point, x, num_particles=fit.num_particles, data_dim=layout.dim,
                max_plate_nesting=layout.max_plate_nesting,
            )  # fmt: skip
            objective = lw.mean(0).sum()
            (point.params.grad,) = torch.autograd.grad(-objective, [point.params])
            optimizer.step()
            window_sum += objective.item() / x.shape[0]
            if step % fit.window:
                continue
            mean, window_sum = window_sum / fit.window, 0.0
            if previous is not None:
                quiet = quiet + 1 if mean - previous < fit.tolerance else 0
                if quiet:
                    lr /= 2
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                if quiet >= fit.patience:
                    return point, step, True
            previous = mean
    return point, fit.max_steps, False


def check_family(guide) -> None:
    """An error unless ``guide`` has ``point_parameters(x)`` and ``family(params)`` (every
    guide of :mod:`ppl_vae.guides` has), which the best q of its family needs."""
    if not (callable(getattr(guide, "point_parameters", None)) and callable(guide.family)):
        raise InputError(
            f"the best q of the guide's family needs a guide with point_parameters(x) and "
            f"family(params), as every guide of ppl_vae.guides has; {type(guide).__name__} "
            f"does not"
        )


@dataclass
class ELBOEstimate:
    """Per-point Monte Carlo ELBO from :func:`elbo_per_point`, float64, shape ``(N,)``."""

    elbo: Tensor  # the mean of log w over the draws
    standard_error: Tensor  # the sample standard deviation of log w / sqrt(num_draws)
    num_draws: int  # draws per point, the same for every point


class _Moments:
    """Running sums of log w and of its square per point, shifted for precision."""

    def __init__(self):
        self.count, self.shift, self.sum, self.square = 0, None, None, None

    def add(self, lw: Tensor) -> None:
        if self.shift is None:
            self.shift = lw.mean(0)
            self.sum, self.square = torch.zeros_like(self.shift), torch.zeros_like(self.shift)
        centred = lw - self.shift
        self.sum, self.square = self.sum + centred.sum(0), self.square + centred.square().sum(0)
        self.count += lw.shape[0]

    def variance(self) -> Tensor:
        mean = self.sum / self.count
        return (self.square - self.count * mean.square()) / max(self.count - 1, 1)

    def mean(self) -> Tensor:
        return self.shift + self.sum / self.count


def elbo_per_point(
    model: Callable,
    guide: Callable,
    x: Tensor,
    *,
    standard_error: float = 0.01,
    pilot_draws: int = 100,
    max_draws: int = 100_000,
    chunk_size: int | None = None,
) -> ELBOEstimate:
    r"""The ELBO :math:`E_q[\log p(x, z) - \log q(z|x)]` of every point, to a standard error.

    ``pilot_draws`` draws per point measure the variance of :math:`\log w`; then every point
    gets K = max over points of variance / ``standard_error``² draws in all (the pilot's
    included), the variance measured again from all K draws and more drawn until it holds (at
    most ``max_draws``), so that every point's standard error is ``standard_error`` nats or
    less. Choosing K from the draws makes the estimate very slightly dependent on them (far
    below the standard error); a warning says when the cap leaves a point above the target.
    """
    if not standard_error > 0:
        raise InputError(f"standard_error must be positive, got {standard_error!r}")
    if not 2 <= pilot_draws <= max_draws:
        raise InputError(
            f"need 2 <= pilot_draws <= max_draws, got pilot_draws={pilot_draws}, "
            f"max_draws={max_draws}"
        )
    (x,), _ = checked_inputs(model, guide, (x,), {})
    layout = _layout(model, guide, x)
    chunk = chunk_size or default_chunk_size(layout.size, x.device)
    moments = _Moments()

    def draw(count: int) -> None:
        while count > 0:
            c = min(chunk, count)
            lw = log_weights_of_programs(
                model, guide, x, num_particles=c, data_dim=layout.dim,
                max_plate_nesting=layout.max_plate_nesting,
            )  # fmt: skip
            moments.add(lw.to(torch.float64))
            count -= c

    with torch.no_grad(), pyro.poutine.block(hide_types=["param"]):
        draw(pilot_draws)
        while moments.count < max_draws:
            need = math.ceil(moments.variance().max().item() / standard_error**2)
            if need <= moments.count:
                break
            draw(min(need, max_draws) - moments.count)
    se = (moments.variance() / moments.count).sqrt()
    if se.max() > standard_error:
        warnings.warn(
            f"the ELBO's standard error reaches {se.max().item():.3g} nats on some point "
            f"(target {standard_error}) at max_draws={max_draws}; raise max_draws",
            stacklevel=2,
        )
    return ELBOEstimate(moments.mean(), se, moments.count)


def _log_px(log_px, model, guide, x, ais: dict) -> Tensor:
    """log p(x) per point: as given (a tensor, or a function of model, guide, x), else AIS."""
    if log_px is None:
        log_px = annealed_log_likelihood(model, guide, x, **ais)
    elif callable(log_px):
        log_px = log_px(model, guide, x)
    log_px = torch.as_tensor(log_px)
    if log_px.shape != x.shape[:1]:
        raise InputError(f"log_px must have shape ({x.shape[0]},), got {tuple(log_px.shape)}")
    return log_px.to(torch.float64)


def inference_gaps(
    model: Callable,
    guide: nn.Module,
    x: Tensor,
    *,
    log_px: Tensor | Callable | None = None,
    standard_error: float = 0.01,
    max_draws: int = 100_000,
    chunk_size: int | None = None,
    fit: PointFit | None = None,
    num_chains: int | None = None,
    num_steps: int | None = None,
) -> dict[str, Tensor]:
    r"""Where the nats go on every point of ``x``: log p(x), the amortized and the optimal ELBO,
    and the approximation and amortization gaps.

    The amortized ELBO is ``guide``'s, the optimal one that of :func:`fit_point_guide`'s q* (the
    guide's family, parameters free per point), each estimated by :func:`elbo_per_point` from
    fresh draws to ``standard_error`` nats (their standard errors are returned too). The fit
    warns if it stops at ``fit.max_steps`` before converging. Guides with ``point_parameters``
    and ``family`` are supported: every guide of :mod:`ppl_vae.guides`. For a flow guide q*
    frees the base Gaussian and the steps' context per point, the steps' weights fixed: the
    best q those weights allow for the point (the amortized q is one of them).

    Arguments:
        model: The generative model, e.g. a :class:`~ppl_vae.model.VAEModel` (held fixed).
        guide: An amortized guide with ``point_parameters`` and ``family``.
        x: The points, shape ``(N, ...)``.
        log_px: log p(x) per point: a tensor of shape ``(N,)``, a function ``(model, guide, x)
            -> (N,)``, or ``None`` for ``ppl_vae.ais.annealed_log_likelihood`` (with
            ``num_chains`` and ``num_steps`` where given, else its defaults).
        standard_error: The Monte Carlo standard error aimed at for each ELBO, in nats.
        max_draws: At most this many draws per point for each ELBO.
        chunk_size: Draws per vectorized pass (default: about 10,000 / N on a CPU).
        fit: The per-point optimization's settings (:class:`PointFit`).

    Returns:
        Float64 tensors of shape ``(N,)``: ``log_px``, ``elbo``, ``elbo_optimal``,
        ``approximation_gap`` (log_px − elbo_optimal), ``amortization_gap`` (elbo_optimal −
        elbo), ``elbo_standard_error`` and ``elbo_optimal_standard_error``.

    References:
        Cremer, Li & Duvenaud (2018), "Inference Suboptimality in Variational Autoencoders".
    """
    check_family(guide)
    (x,), _ = checked_inputs(model, guide, (x,), {})
    ais = {k: v for k, v in (("num_chains", num_chains), ("num_steps", num_steps)) if v}
    estimate = {"standard_error": standard_error, "max_draws": max_draws, "chunk_size": chunk_size}
    lpx = _log_px(log_px, model, guide, x, ais)
    amortized = elbo_per_point(model, guide, x, **estimate)
    point, steps, converged = fit_point_guide(model, guide, x, fit)
    if not converged:
        warnings.warn(
            f"the per-point fit of q* stopped at max_steps={steps} before converging; "
            f"elbo_optimal may be low: raise PointFit.max_steps",
            stacklevel=2,
        )
    optimal = elbo_per_point(model, point, x, **estimate)
    return {
        "log_px": lpx,
        "elbo": amortized.elbo,
        "elbo_optimal": optimal.elbo,
        "approximation_gap": lpx - optimal.elbo,
        "amortization_gap": optimal.elbo - amortized.elbo,
        "elbo_standard_error": amortized.standard_error,
        "elbo_optimal_standard_error": optimal.standard_error,
    }
