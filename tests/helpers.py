"""Test data shared by the mixture tests."""

import numpy as np

__all__ = ["blobs"]


def blobs(n=600, d=3, k=4, seed=0):
    """Four anisotropic, offset clusters (float64), with shared initial parameters."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    x += 5 * rng.normal(size=(k, d))[rng.integers(k, size=n)] + 10
    weights = np.full(k, 1 / k)
    means = x[rng.choice(n, k, replace=False)]
    a = rng.normal(size=(k, d, d))
    precisions = {
        "full": np.eye(d) + 0.1 * a @ a.transpose(0, 2, 1),
        "tied": np.eye(d) + 0.1 * a[0] @ a[0].T,
        "diag": 0.5 + rng.random((k, d)),
        "spherical": 0.5 + rng.random(k),
    }
    return x, weights, means, precisions
