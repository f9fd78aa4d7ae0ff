"""1-D k-means: exact k, sorted centroids that are member means, every initialisation."""

from __future__ import annotations

import pytest
import torch

from nnsqueeze.ops.kmeans import assign, kmeans1d


@pytest.mark.parametrize("init", ["linear", "density", "random", "kmeans++"])
def test_kmeans_exact_k_and_member_means(init):
    x = torch.randn(2000, generator=torch.Generator().manual_seed(1))
    c, idx = kmeans1d(x, 16, init=init, iterations=1000)  # run to convergence (a fixed point)
    assert c.numel() == 16 and torch.all(c[1:] > c[:-1])
    assert idx.shape == x.shape and int(idx.unique().numel()) == 16
    for j in range(16):
        assert torch.allclose(x[idx == j].double().mean().float(), c[j], atol=1e-6)
    assert torch.equal(idx, assign(x, c))  # nearest centroid


def test_kmeans_separates_obvious_clusters():
    x = torch.tensor([0.0, 0.1, 0.2, 5.0, 5.1, 5.2, -3.0])
    c, idx = kmeans1d(x, 3)
    assert torch.allclose(c, torch.tensor([-3.0, 0.1, 5.1]), atol=1e-6)
    assert idx.tolist() == [1, 1, 1, 2, 2, 2, 0]


def test_kmeans_fewer_distinct_values_than_k():
    x = torch.tensor([1.0, 1.0, 2.0, 2.0])
    c, idx = kmeans1d(x, 8)
    assert c.tolist() == [1.0, 2.0] and idx.tolist() == [0, 0, 1, 1]
    c, idx = kmeans1d(torch.zeros(0), 4)
    assert c.numel() == 0 and idx.numel() == 0
