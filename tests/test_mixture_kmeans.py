"""k-means and k-means++ seeding, against brute force and scikit-learn."""

import numpy as np
import pytest
import torch

from ppl_vae.mixture.kmeans import kmeans, kmeans_plusplus, nearest


def separated(n=900, d=5, k=6, seed=0):
    """``k`` tight, far-apart clusters of unequal sizes (float64) and their labels."""
    rng = np.random.default_rng(seed)
    centres = 50 * rng.normal(size=(k, d))
    labels = rng.choice(k, size=n, p=np.arange(1, k + 1) / (k * (k + 1) / 2))
    return centres[labels] + rng.normal(size=(n, d)), labels


def test_nearest_is_the_brute_force_argmin():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 4, generator=g, dtype=torch.float64)
    centres = torch.randn(7, 4, generator=g, dtype=torch.float64)
    assert torch.equal(nearest(x, centres), torch.cdist(x, centres).argmin(1))


@pytest.mark.parametrize("seed", range(5))
def test_kmeans_finds_the_partition_of_well_separated_blobs_as_sklearn(seed):
    cluster = pytest.importorskip("sklearn.cluster")
    metrics = pytest.importorskip("sklearn.metrics")
    x, truth = separated(seed=seed)
    sk = cluster.KMeans(6, n_init=10, random_state=seed).fit_predict(x)
    ours = kmeans(torch.from_numpy(x), 6, torch.Generator().manual_seed(seed))
    assert ours.shape == (900,) and ours.dtype == torch.int64
    assert metrics.adjusted_rand_score(sk, ours.numpy()) == 1.0
    assert metrics.adjusted_rand_score(truth, ours.numpy()) == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_kmeans_plusplus_returns_k_distinct_indices_one_per_separated_blob(seed):
    x, truth = separated(seed=seed)
    seeds = kmeans_plusplus(torch.from_numpy(x), 6, torch.Generator().manual_seed(seed))
    assert seeds.shape == (6,) and seeds.dtype == torch.int64
    assert len(set(seeds.tolist())) == 6 and seeds.min() >= 0 and seeds.max() < len(x)
    assert sorted(truth[seeds.numpy()].tolist()) == list(range(6))  # far apart: one per blob
    again = kmeans_plusplus(torch.from_numpy(x), 6, torch.Generator().manual_seed(seed))
    assert torch.equal(seeds, again)


def test_kmeans_plusplus_copes_with_fewer_distinct_points_than_seeds():
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0]]).repeat(10, 1)
    seeds = kmeans_plusplus(x, 3, torch.Generator().manual_seed(0))
    assert seeds.shape == (3,) and set(x[seeds].sum(1).tolist()) == {0.0, 2.0}
    labels = kmeans(x, 3, torch.Generator().manual_seed(0))
    assert torch.equal(labels[::2], labels[:1].expand(10)) and labels[0] != labels[1]


@pytest.mark.parametrize("seed", range(3))
def test_kmeans_runs_lloyd_like_sklearn_from_the_same_seeds(seed):
    cluster = pytest.importorskip("sklearn.cluster")
    metrics = pytest.importorskip("sklearn.metrics")
    # overlapping clusters: the seeds' partition is far from the converged one
    x = torch.randn(2000, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    seeds = kmeans_plusplus(x, 5, torch.Generator().manual_seed(seed))  # the seeds kmeans uses
    ours = kmeans(x, 5, torch.Generator().manual_seed(seed), max_iter=1000, tol=0)
    assert metrics.adjusted_rand_score(nearest(x, x[seeds]).numpy(), ours.numpy()) < 0.99
    sk = cluster.KMeans(5, init=x[seeds].numpy(), n_init=1, max_iter=1000, tol=0).fit(x.numpy())
    assert metrics.adjusted_rand_score(sk.labels_, ours.numpy()) == 1.0
    centres = torch.stack([x[ours == j].mean(0) for j in range(5)])  # a fixed point of Lloyd
    assert torch.equal(nearest(x, centres), ours)
