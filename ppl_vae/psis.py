r"""Per-point Pareto k̂ of importance weights (PSIS), as Pyro's ``psis_diagnostic`` computes it
for the one joint weight of a batch.

For each point, the largest M = ⌈min(K/5, 3√K)⌉ of its K weights, less the (M+1)-th largest,
are fitted with a generalized Pareto distribution (Zhang & Stephens 2009, with the prior of
Vehtari et al.); its shape k̂ says how heavy the weights' tail is: below 0.5 the importance
estimate is reliable, above 0.7 it is not to be trusted (Yao et al. 2018).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["LargestLogWeights", "pareto_k", "pareto_k_of_largest", "tail_size"]


def tail_size(num_samples: int) -> int:
    """M, the number of largest weights the Pareto fit uses out of K = ``num_samples``."""
    return int(math.ceil(min(0.2 * num_samples, 3.0 * math.sqrt(num_samples))))


class LargestLogWeights:
    """Running largest ``count`` log-weights of each point, over passes of ``(c, N)`` draws."""

    def __init__(self, count: int):
        self.count, self.value = count, None

    def add(self, lw: Tensor) -> None:
        rows = lw if self.value is None else torch.cat([self.value, lw])
        self.value = rows.topk(min(self.count, rows.shape[0]), dim=0).values


def pareto_k(log_weights: Tensor) -> Tensor:
    """k̂ of every column of ``log_weights``, shape ``(K, N)``: float64, shape ``(N,)``."""
    num_samples = log_weights.shape[0]
    largest = LargestLogWeights(tail_size(num_samples) + 1)
    largest.add(log_weights)
    return pareto_k_of_largest(largest.value, num_samples)


def pareto_k_of_largest(largest: Tensor, num_samples: int) -> Tensor:
    r"""k̂ per point from its M + 1 largest log-weights (``largest``, shape ``(M + 1, N)``, any
    order) out of ``num_samples``: ``inf`` where fewer than 10 weights exceed the cutoff, as
    in Pyro (K < 50, or ties).

    The cutoff is the (M+1)-th largest weight, but at least 1e-15 of the largest; the tail is
    the weights above it, each less the cutoff, scaled by the largest weight.
    """
    if largest.shape[0] <= 10:  # at most 10 weights above the cutoff: no fit (K < 50)
        return torch.full(largest.shape[1:], math.inf, dtype=torch.float64, device=largest.device)
    lw = largest.to(torch.float64).sort(0).values.T  # (N, M + 1), ascending
    lw = lw - lw[:, -1:]
    cutoff = lw[:, :1].clamp(min=math.log(1e-15))
    valid = lw[:, 1:] > cutoff  # ascending: the weights left out come first
    x = torch.where(valid, lw[:, 1:].exp() - cutoff.exp(), torch.zeros_like(lw[:, 1:]))
    k = _fit_shape(x, valid)
    return torch.where(valid.sum(1) < 10, torch.full_like(k, math.inf), k)


def _fit_shape(x: Tensor, valid: Tensor) -> Tensor:
    r"""The generalized Pareto shape of each row's valid (trailing) entries of ``x``, as
    ``pyro.ops.stats.fit_generalized_pareto`` fits one sample, with a row of n valid entries
    using 30 + ⌊√n⌋ candidate values of b = k / σ."""
    rows, width = x.shape
    n = valid.sum(1).clamp(min=1)
    nf = n.to(x.dtype)
    m = 30 + nf.sqrt().floor()  # candidates per row
    j = torch.arange(1, int(m.max().item()) + 1, dtype=x.dtype, device=x.device)
    candidate = j <= m[:, None]  # (N, J)
    quarter = (width - n) + (nf / 4 - 0.5).trunc().long()
    bs = 1.0 - m[:, None].sqrt() / (j - 0.5).sqrt()
    bs = bs / (3.0 * x.gather(1, quarter[:, None])) + 1 / x[:, -1:]
    logs = torch.log1p(-bs[:, :, None] * x[:, None, :]) * valid[:, None, :]  # (N, J, width)
    ks = logs.sum(-1) / nf[:, None]
    ls = nf[:, None] * (torch.log(-bs / ks) - (ks + 1.0))
    ls = torch.where(candidate, ls, torch.full_like(ls, -math.inf))
    weights = 1.0 / torch.exp(ls[:, None, :] - ls[:, :, None]).sum(-1)  # (N, J)
    keep = candidate & (weights > 1e-30)
    weights = torch.where(keep, weights, torch.zeros_like(weights))
    b = (bs * weights).sum(1) / weights.sum(1)
    k = (torch.log1p(-b[:, None] * x) * valid).sum(1) / nf
    return k * nf / (nf + 10.0) + 5.0 / (nf + 10.0)
