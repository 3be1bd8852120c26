r"""EM shared by the mixtures: the fused E/M pass, initialisation, fit and prediction."""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from sklearn.base import BaseEstimator, DensityMixin
from sklearn.exceptions import ConvergenceWarning
from torch import Tensor

from ppl_vae.errors import InputError, NotFittedError
from ppl_vae.mixture import native
from ppl_vae.mixture.checks import (
    as_float,
    check_bool,
    check_finite,
    check_integer,
    check_means_init,
    check_number,
    check_seed,
    check_verbose,
    check_weights_init,
)
from ppl_vae.mixture.chunks import ChunkedStatistics, PassSpace, affine_joint
from ppl_vae.mixture.inits import INITS
from ppl_vae.mixture.rows import Rows

LOG2_E = 1 / math.log(2)  # exp(y) = exp2(y log2(e))

__all__ = ["ConvergenceWarning", "Mixture"]

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning name the first caller outside this package."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level


@contextmanager
def subnormals_flushed(device: torch.device) -> Iterator[bool]:
    """On a CPU, runs the block with subnormal floats read and made as zero in this thread, and
    puts the mode back after. ``exp2`` of the log-responsibilities takes two thirds of its time
    so (float32, one thread), and a subnormal responsibility (below 1.2e-38 in float32, 2.2e-308
    in float64) changes no sum of the M-step. torch can set the mode (``set_flush_denormal``)
    but not read it; a subnormal number multiplied by one reads it.

    Yields whether ``exp2`` may still meet subnormal results on its slow path (a CPU that cannot
    flush them), so that :func:`_shifted_exp` must floor its argument."""
    if device.type != "cpu":
        yield False
        return
    was = torch.full((1,), 1e-39, dtype=torch.float32).mul_(1.0).item() == 0.0
    if not was and not torch.set_flush_denormal(True):  # False: the CPU cannot
        yield True
        return
    try:
        yield False
    finally:
        torch.set_flush_denormal(was)


def _shifted_exp(joint: Tensor, space: PassSpace, floor: bool) -> tuple[Tensor, Tensor, Tensor]:
    """exp(joint - top) written over a chunk's joint (K, n), its per-point maximum ``top`` and
    the column sums ``norm`` (both (1, n), in ``space``): log p(x_n) = top + log norm.

    The exponential is ``exp2`` of (joint - top) log2(e): torch's ``exp2`` is 2.7 times as fast
    as its ``exp`` on a CPU (float32; 1.9 times in float64), and the product's rounding changes
    a float32 responsibility r by at most 5e-8 |log r| relative. With ``floor`` (a CPU that
    cannot flush subnormals; :func:`subnormals_flushed`), its argument is floored just above
    the smallest normal number first, which keeps ``exp2`` off its slow path for subnormal
    results; a responsibility below 1e-37 (float32) or 1e-307 (float64) changes no sum. Where
    they are flushed, ``exp2`` is faster without the floor (79 against 99 us for a (16, 16,384)
    float32 chunk).
    """
    n = joint.shape[1]
    top = torch.amax(joint, 0, keepdim=True, out=space.row(0, n))
    # (joint - top) log2(e) in one pass: -top log2(e) + log2(e) joint
    shift = torch.mul(top, -LOG2_E, out=space.row(1, n))
    e = torch.add(shift, joint, alpha=LOG2_E, out=joint)
    if floor:
        e.clamp_(min=math.log2(torch.finfo(joint.dtype).tiny) + 2)
    e.exp2_()
    return e, top, torch.sum(e, 0, keepdim=True, out=shift)


class Mixture(DensityMixin, BaseEstimator):
    r"""EM for a mixture of exponential-family components, shared by the concrete mixtures.

    A component's log-density is linear in sufficient statistics :math:`T(x)`, so the joint
    :math:`\log w_k + \log p(x \mid \theta_k) = T(x)^\top a_k + b_k` of all points and components
    is one matrix product, and the E- and M-steps of one iteration take a single pass over the
    data: each chunk's responsibilities :math:`r` are folded at once into :math:`r^\top T(x)`,
    :math:`\sum_n r_{nk}` and :math:`\sum_n \log p(x_n)`.
    """

    _flat_means = False  # means_init may come in the shape of the points (Bernoulli: images)
    _what = "features"  # what a point's D values are called in messages
    _fix = "raise max_iter or tol"  # what the ConvergenceWarning suggests
    objective = "log-likelihood"  # what lower_bound_ is, per point
    # Called after every EM iteration as on_iteration(init, n_iter, lower_bound), init counting
    # from 1; set it on an instance to follow a long fit. Not a constructor argument, so
    # get_params and clone leave it out.
    on_iteration: Callable[[int, int, float], None] | None = None
    # Under torchrun: the points given to fit are this rank's contiguous shard (in rank order)
    # of one training set, and every sum over points is reduced over the process group
    # (ppl_vae.mixture.rows). Not a constructor argument either.
    sharded: bool = False
    _rows = None  # the Rows of the fit in progress

    def __init__(
        self,
        n_components: int,
        tol: float,
        max_iter: int,
        n_init: int,
        init: str,
        seed: int | None,
        warm_start: bool,
        verbose: int,
        verbose_interval: int,
    ):
        # as scikit-learn, the arguments are kept as given (so that get_params and clone return
        # them unchanged); they are checked here, by set_params and again by fit
        self.n_components, self.tol, self.max_iter = n_components, tol, max_iter
        self.n_init, self.init, self.seed, self.warm_start = n_init, init, seed, warm_start
        self.verbose, self.verbose_interval = verbose, verbose_interval
        self._check_settings()

    # -- settings, scikit-learn's convention -------------------------------------------------------

    def _check_settings(self) -> None:
        """An InputError naming the first constructor argument that is not valid now."""
        check_integer("n_components", self.n_components, 1)
        check_number("tol", self.tol)
        check_integer("max_iter", self.max_iter, 0)
        check_integer("n_init", self.n_init, 1)
        INITS.check(self.init)
        check_seed(self.seed)
        check_bool("warm_start", self.warm_start)
        check_verbose(self.verbose)
        check_integer("verbose_interval", self.verbose_interval, 1)

    def set_params(self, **params) -> Mixture:
        """Sets constructor arguments by name (as scikit-learn's ``set_params``); returns ``self``.

        An unknown name or an invalid value is an InputError and changes nothing. New settings
        apply to the next :meth:`fit`.
        """
        names = self._get_param_names()
        for name in params:
            if name not in names:
                raise InputError(
                    f"{name!r} is not a parameter of {type(self).__name__}; its parameters are "
                    f"{', '.join(names)}"
                )
        before = {name: getattr(self, name) for name in params}
        super().set_params(**params)
        try:
            self._check_settings()
        except InputError:
            for name, value in before.items():
                setattr(self, name, value)
            raise
        return self

    # -- hooks of the concrete mixtures ----------------------------------------------------------

    def _check_input(self, x: Tensor, fitting: bool) -> Tensor:
        raise NotImplementedError

    def _check_points(self, x: Tensor, fitting: bool) -> Tensor:
        """Checks an (N, D) tensor against the fitted D, the number of points, finiteness.

        As scikit-learn: a fit needs at least 2 points and ``n_components``; everything else at
        least one point; a warm start continues only on points with the fitted D.
        """
        what = self._what
        continuing = fitting and self.warm_start and self._fitted
        if (continuing or not fitting) and x.shape[1] != self.means_.shape[1]:
            d = self.means_.shape[1]
            if continuing:
                raise InputError(
                    f"x has D={x.shape[1]} {what} but warm_start continues the mixture fitted on "
                    f"D={d}; pass points with D={d} {what}, or set warm_start=False to fit afresh"
                )
            raise InputError(
                f"x has D={x.shape[1]} {what} but the mixture was fitted on "
                f"D={d}; pass points with the same {what}"
            )
        n = self._rows.total if fitting else x.shape[0]  # fitting a shard: all the shards'
        if not fitting and n == 0:
            raise InputError(f"x has no points (shape {tuple(x.shape)}); pass at least one")
        if fitting and n < 2:
            raise InputError(f"x has {n} point(s); fitting needs at least 2")
        if fitting and n < self.n_components:
            raise InputError(
                f"x has {n} points but n_components={self.n_components}; use at most "
                f"{n} components or more data"
            )
        return check_finite(x, "x", "; clean or drop those rows")

    def _check_inits(self, inits: dict, x: Tensor) -> dict:
        """The initial parameters given to fit, as finite tensors like ``x``, shapes checked.

        The concrete mixtures add the checks of their own parameters.
        """
        k, d = self.n_components, x.shape[1]
        out = {}
        for name, value in inits.items():
            if value is not None:
                value = check_finite(as_float(value, f"{name}_init").to(x), f"{name}_init")
            out[name] = value
        if out["weights"] is not None:
            check_weights_init(out["weights"], k)
        if out["means"] is not None:
            out["means"] = check_means_init(out["means"], k, d, flatten=self._flat_means)
        return out

    def _override(self, inits: dict, x: Tensor) -> None:
        """Replaces initial parameters by the ones given to fit (scikit-learn's order)."""
        if inits["weights"] is not None:
            self.weights_ = inits["weights"].clone()
        if inits["means"] is not None:
            self.means_ = inits["means"].clone()

    def _start(self, x: Tensor) -> None:
        """Called with the points (checked) when a fit starts afresh, not on a warm start."""

    def _statistics(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """Sufficient statistics T(x), shape (n, F), of prepared (e.g. centred) points; ``out``:
        a flat work space of at least n F values they may be written into, or None."""
        raise NotImplementedError

    def _natural(self) -> tuple[Tensor, ...]:
        """A (K, F) and b (K,) with log w_k + log p(x | k) = A @ T(x) + b."""
        raise NotImplementedError

    def _joint(
        self, feats: Tensor, natural: tuple[Tensor, ...], out: Tensor | None = None
    ) -> Tensor:
        """log w_k + log p(x_n | k) for a chunk, shape (K, n); ``out``, if given, a flat work
        space of at least K n values it is written into."""
        return affine_joint(*natural, feats, out)

    def _sums(self, resp: Tensor, feats: Tensor) -> Tensor:
        """The M-step's sums over a chunk, r^T T(x), from responsibilities (K, n)."""
        return resp @ feats

    def _whole_pass(self, x: Tensor) -> Callable[..., tuple[Tensor, Tensor, float]] | None:
        """A compiled pass over all the prepared points ``x`` that takes :meth:`_natural`'s
        tensors and gives (r^T T(x), sum_n r, sum_n log p(x_n)), or None: the pass goes chunk by
        chunk."""
        return None

    def _work_width(self, x: Tensor) -> int | None:
        return None

    def _cache_statistics(self) -> bool:
        """Whether to keep the training set's statistics between passes (if they fit)."""
        return True

    def _centre_on(self, resp: Tensor, x: Tensor) -> None:
        """Called with the initial responsibilities before the first M-step."""

    def _m_step(self, stats: Tensor, nk: Tensor) -> None:
        """Updates the parameters from r^T T(x) (K, F) and sum_n r (K,)."""
        raise NotImplementedError

    def _log_prior(self) -> float:
        return 0.0

    def _prepare(self, x: Tensor) -> Tensor:
        return x

    def _parameters(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def _n_parameters(self) -> int:
        """The number of free parameters of the fitted mixture, for :meth:`bic` and :meth:`aic`."""
        raise NotImplementedError

    # -- EM --------------------------------------------------------------------------------------

    @property
    def _fitted(self) -> bool:
        return hasattr(self, "weights_")

    def __sklearn_is_fitted__(self) -> bool:
        """What ``sklearn.utils.validation.check_is_fitted`` asks."""
        return self._fitted

    def _require_fitted(self, method: str) -> None:
        if not self._fitted:
            raise NotFittedError(
                f"this {type(self).__name__} is not fitted yet; call fit(x) before {method}"
            )

    def _generator(self) -> torch.Generator:
        g = torch.Generator()
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(int(self.seed))
        return g

    def _say(self, level: int, text: str) -> None:
        if self.verbose >= level:
            print(text, flush=True)

    def _pass(self, source: ChunkedStatistics) -> tuple[Tensor, Tensor, Tensor]:
        """One E-step fused with the M-step's sums: (r^T T(x), sum_n r, sum_n log p(x_n)).

        Components run along rows, (K, n), so that the product is ``A @ T^T`` (the layout is
        chosen for speed on CPU; see docs/BENCHMARKS.md); responsibilities from
        :func:`_shifted_exp`, or on a CPU from a compiled kernel that normalises each chunk in
        one loop (:mod:`ppl_vae.mixture.native`, for passes large enough to pay for its build).
        Where the mixture has a compiled whole pass (:meth:`_whole_pass`), that runs instead. On
        a CPU the pass runs with subnormal numbers flushed to zero (:func:`subnormals_flushed`).
        """
        natural = self._natural()
        whole = self._whole_pass(source.x)
        with subnormals_flushed(source.x.device) as floor:
            if whole is not None:
                stats, nk, total = whole(*natural)
            else:
                stats, nk, total = self._chunked_pass(source, natural, floor)
        total = torch.as_tensor(total, dtype=stats.dtype, device=stats.device)
        reduce = self._rows.reduce
        return reduce(stats), reduce(nk), reduce(total)

    def _chunked_pass(
        self, source: ChunkedStatistics, natural: tuple[Tensor, ...], floor: bool
    ) -> tuple[Tensor, Tensor, float]:
        """:meth:`_pass` chunk by chunk on torch's products (``floor``: :func:`_shifted_exp`)."""
        space = source.pass_space(self.n_components)
        normalise = native.kernel(source.x, self.n_components * source.x.shape[0])
        stats, nk, total = None, source.x.new_zeros(self.n_components), 0.0
        for _, feats in source.chunks():
            joint = self._joint(feats, natural, space.joint)  # (K, n)
            if normalise is not None:
                total += normalise(joint, nk)  # the joint is now p(k | x_n)
                resp = joint
            else:
                resp, top, norm = _shifted_exp(joint, space, floor)
                total += top.sum()
                resp.mul_(torch.reciprocal(norm, out=top))  # p(k | x_n) (dividing: 2.7x)
                total += norm.log_().sum()  # sum_n log sum_k exp(joint)
                nk.add_(resp.sum(1))
            sums = self._sums(resp, feats)
            stats = sums if stats is None else stats.add_(sums)
        return stats, nk, total

    def _em(
        self, source: ChunkedStatistics, n: int, lower_bound: float, run: int
    ) -> tuple[list[float], bool, int]:
        history, converged, n_iter = [], False, 0
        clock = time.perf_counter()
        for n_iter in range(1, int(self.max_iter) + 1):
            previous = lower_bound
            stats, nk, total = self._pass(source)
            lower_bound = (total.item() + self._log_prior()) / n
            if not math.isfinite(lower_bound):
                raise InputError(
                    f"EM reached a non-finite log-likelihood at iteration {n_iter}; increase "
                    f"reg_covar, scale the data, or fit in float64"
                )
            history.append(lower_bound)
            self._m_step(stats, nk)
            if self.on_iteration is not None:
                self.on_iteration(run, n_iter, lower_bound)
            change = lower_bound - previous
            if self.verbose and n_iter % self.verbose_interval == 0:
                if self.verbose >= 2:
                    now = time.perf_counter()
                    self._say(
                        2,
                        f"  iteration {n_iter}: {now - clock:.3f} s since the last line, "
                        f"change {change:.5g}",
                    )
                    clock = now
                else:
                    self._say(1, f"  iteration {n_iter}")
            if abs(change) < self.tol:
                converged = True
                break
        return history, converged, n_iter

    def _initial_resp(self, x: Tensor, g: torch.Generator) -> Tensor:
        """Initial responsibilities (N, K) from ``init``, drawn from the CPU generator ``g``."""
        if self._rows.sharded:
            return INITS[self.init].factory(x, self.n_components, g, rows=self._rows)
        return INITS[self.init].factory(x, self.n_components, g)

    def _initialize(self, source: ChunkedStatistics, x: Tensor, g: torch.Generator) -> None:
        """Parameters from one M-step on the initial responsibilities."""
        resp = self._initial_resp(x, g)
        self._centre_on(resp, x)
        stats = nk = None
        for start, feats in source.chunks():
            r = resp[start : start + feats.shape[0]].T
            if stats is None:
                stats, nk = self._sums(r, feats), r.sum(1)
            else:
                stats += self._sums(r, feats)
                nk += r.sum(1)
        self._m_step(self._rows.reduce(stats), self._rows.reduce(nk))

    def _fit(self, x, inits: dict) -> Mixture:
        state = dict(self.__dict__)
        try:
            self._fit_or_raise(x, inits)
        except BaseException:  # a failed fit leaves the estimator as it was
            self.__dict__.clear()
            self.__dict__.update(state)
            raise
        if not self.converged_ and self.max_iter > 0:  # scikit-learn's rule; 0: the start is kept
            warnings.warn(
                f"EM stopped after max_iter={self.max_iter} iterations with the change per "
                f"iteration still at least tol={self.tol:g} (converged_ is False); "
                f"{self._fix}, or try another init or seed",
                ConvergenceWarning,
                stacklevel=_caller_stacklevel(),
            )
        return self

    def _fit_or_raise(self, x, inits: dict) -> None:
        self._check_settings()  # attributes may have been assigned since construction
        x = as_float(x)
        self._rows = Rows(x, self.sharded)
        x = self._check_input(x, fitting=True)
        do_init = not (self.warm_start and self._fitted)
        if not do_init:  # continue in the dtype and on the device of the fitted parameters
            x = x.to(self.weights_)
        inits = self._check_inits(inits, x)
        if do_init:
            self._start(x)
        xc = self._prepare(x)
        source = ChunkedStatistics(
            self._statistics, xc, self._work_width(xc), cache=self._cache_statistics()
        )
        g = self._generator()
        best = None
        runs = int(self.n_init) if do_init else 1
        for run in range(runs):
            self._say(1, f"initialisation {run + 1} of {runs}" + ("" if do_init else " (warm)"))
            clock = time.perf_counter()
            if do_init:
                if any(v is None for v in inits.values()):
                    self._initialize(source, xc, g)
                self._override(inits, x)
            start = -math.inf if do_init else self.lower_bound_
            history, converged, n_iter = self._em(source, self._rows.total, start, run + 1)
            final = history[-1] if history else -math.inf
            if self.verbose and self.max_iter > 0:
                line = f"initialisation {run + 1}: " + (
                    f"converged after {n_iter} iterations" if converged else "did not converge"
                )
                if self.verbose >= 2:
                    line += f", {time.perf_counter() - clock:.3f} s, lower bound {final:.5f}"
                self._say(1, line)
            if best is None or final > best[0]:
                best = (final, self._parameters(), history, converged, n_iter)
        final, params, history, converged, n_iter = best
        for name, value in params.items():
            setattr(self, name, value)
        self.lower_bound_, self.history_, self.lower_bounds_ = final, history, list(history)
        self.converged_, self.n_iter_ = converged, n_iter
        self.n_features_in_ = x.shape[1]

    # -- prediction ------------------------------------------------------------------------------

    def fit_predict(self, x, y=None, **kwargs) -> Tensor:
        """Fits the mixture to ``x`` (arguments as :meth:`fit`); returns the labels of ``x``.

        As scikit-learn's ``fit_predict``: the labels come from an E-step with the fitted
        parameters (after the last M-step), so they equal ``fit(x, ...).predict(x)`` for any
        ``max_iter`` and ``tol``.
        """
        return self.fit(x, y, **kwargs).predict(x)

    def joint_log_prob(self, x) -> Tensor:
        r""":math:`\log w_k + \log p(x_n \mid \theta_k)` for all points and components, (N, K)."""
        return self._joint_log_prob(x, "joint_log_prob")

    def _scoring(self, x, method: str) -> tuple[ChunkedStatistics, tuple[Tensor, ...]]:
        """The chunked statistics of checked points ``x`` to score, and the natural parameters
        (``method`` names the caller in the not-fitted error)."""
        self._require_fitted(method)
        x = self._check_input(as_float(x).to(self.weights_), fitting=False)
        source = ChunkedStatistics(
            self._statistics, self._prepare(x), self._work_width(x), cache=False
        )
        return source, self._natural()

    def _joint_log_prob(self, x, method: str) -> Tensor:
        source, natural = self._scoring(x, method)
        return torch.cat([self._joint(feats, natural).T for _, feats in source.chunks()])

    def _log_density(self, x, method: str) -> Tensor:
        """log p(x_n) of every point, (N,): the pass's log-sum-exp, chunk by chunk (torch's
        ``logsumexp`` of the whole (N, K) joint took 4-5 passes' time, float32 diag)."""
        source, natural = self._scoring(x, method)
        space = source.pass_space(self.n_components)
        log_p = self.weights_.new_empty(source.x.shape[0])
        with subnormals_flushed(source.x.device) as floor:
            for start, feats in source.chunks():
                joint = self._joint(feats, natural, space.joint)
                _, top, norm = _shifted_exp(joint, space, floor)
                torch.add(top, norm.log_(), out=log_p[start : start + top.shape[1]][None])
        return log_p

    def score_samples(self, x) -> Tensor:
        r"""The log-density :math:`\log p(x_n)` of every point, shape ``(N,)``, in nats."""
        return self._log_density(x, "score_samples")

    def score(self, x, y=None) -> float:
        """The mean log-density of the points ``x`` (nats per point).

        ``y`` is ignored; it is there for scikit-learn's scorers, which call ``score(x, y)``.
        """
        return self._log_density(x, "score").mean().item()

    def predict(self, x) -> Tensor:
        """The most probable component of every point, shape ``(N,)``."""
        return self._joint_log_prob(x, "predict").argmax(1)

    def predict_proba(self, x) -> Tensor:
        """The responsibilities p(component k | x_n), shape ``(N, K)``; rows sum to 1."""
        return torch.softmax(self._joint_log_prob(x, "predict_proba"), 1)

    def bic(self, x) -> float:
        r"""The Bayesian information criterion of the fitted mixture on ``x``; lower is better.

        :math:`-2 \sum_n \log p(x_n) + P \log N` with ``P`` free parameters, as scikit-learn's.
        """
        log_p = self._log_density(x, "bic")
        return -2 * log_p.sum().item() + self._n_parameters() * math.log(log_p.shape[0])

    def aic(self, x) -> float:
        r"""Akaike's information criterion on ``x``, :math:`-2 \sum_n \log p(x_n) + 2 P`."""
        log_p = self._log_density(x, "aic")
        return -2 * log_p.sum().item() + 2 * self._n_parameters()

    def _labels(
        self, n_samples: int, generator: torch.Generator | None
    ) -> tuple[Tensor, torch.Generator]:
        n_samples = check_integer("n_samples", n_samples, 1)
        g = generator if generator is not None else self._generator()
        z = torch.multinomial(self.weights_.cpu(), n_samples, replacement=True, generator=g)
        return z.to(self.weights_.device), g
