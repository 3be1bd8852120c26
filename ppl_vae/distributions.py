r"""Normal densities in few tensor operations: the standard-normal prior and the guides' head."""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import Tensor
from torch.distributions import constraints, register_kl

__all__ = ["HALF_LOG_2PI", "DiagonalNormal", "StandardNormal"]

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class StandardNormal(dist.TorchDistribution):
    r"""N(0, 1) with a batch shape: ``dist.Normal(0., 1.).expand(batch_shape)`` without parameters.

    .. math:: \log p(z) = -\tfrac12 z^2 - \tfrac12 \log 2\pi

    It has no location or scale to differentiate in, so its log-density takes fewer tensor
    operations than ``Normal``'s, which matters in a training step where every operation is
    recorded for the backward pass (docs/BENCHMARKS.md). The KL divergence from ``Normal`` to
    it is registered, so ``TraceMeanField_ELBO`` uses the closed form.
    """

    arg_constraints: dict = {}
    support = constraints.real
    has_rsample = True

    def __init__(self, batch_shape=(), dtype=torch.float32, device=None, validate_args=None):
        self.dtype, self.device = dtype, device
        super().__init__(torch.Size(batch_shape), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(StandardNormal, _instance)
        new.dtype, new.device = self.dtype, self.device
        super(StandardNormal, new).__init__(torch.Size(batch_shape), validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def mean(self) -> Tensor:
        return torch.zeros(self.batch_shape, dtype=self.dtype, device=self.device)

    @property
    def variance(self) -> Tensor:
        return torch.ones(self.batch_shape, dtype=self.dtype, device=self.device)

    def rsample(self, sample_shape=()) -> Tensor:
        shape = self._extended_shape(sample_shape)
        return torch.randn(shape, dtype=self.dtype, device=self.device)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        log_p = value.square().mul(-0.5).sub(HALF_LOG_2PI)
        shape = torch.broadcast_shapes(value.shape, self.batch_shape + self.event_shape)
        return log_p if log_p.shape == shape else log_p.expand(shape)

    def entropy(self) -> Tensor:
        entropy = 0.5 + HALF_LOG_2PI
        return torch.full(self.batch_shape, entropy, dtype=self.dtype, device=self.device)


@register_kl(torch.distributions.Normal, StandardNormal)
def _kl_normal_standard_normal(q: torch.distributions.Normal, p: StandardNormal) -> Tensor:
    return 0.5 * (q.loc.square() + q.scale.square() - 1) - q.scale.log()


class DiagonalNormal(dist.Normal):
    r"""``pyro.distributions.Normal`` whose log-density takes fewer tensor operations.

    .. math:: \log q(z) = -\tfrac12 \left(\frac{z - \mu}{\sigma}\right)^2 - \log\sigma
        - \tfrac12 \log 2\pi

    Each operation is recorded for the backward pass of every training step.
    """

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        u = (value - self.loc) / self.scale
        return -0.5 * u.square() - self.scale.log() - HALF_LOG_2PI
