"""1-D k-means (Lloyd) for weight sharing, with the initialisations of Deep Compression. Pure torch.

    >>> import torch
    >>> from nnsqueeze.ops.kmeans import kmeans1d
    >>> x = torch.tensor([0.0, 0.1, 0.2, 5.0, 5.1, 5.2])
    >>> c, idx = kmeans1d(x, 2, init="linear")
    >>> c.tolist(), idx.tolist()
    ([0.10000000149011612, 5.099999904632568], [0, 0, 0, 1, 1, 1])

``init``: ``linear`` (evenly spaced over [min, max]; the paper's best, keeps the rare large weights),
``density`` (evenly spaced in the CDF), ``random`` (k distinct samples), ``kmeans++`` (D^2 sampling).
Centroids are returned sorted, as the means of their members under the last assignment (a fixed
point of Lloyd's iteration once converged); ``k`` is reduced to the number of distinct values when
there are fewer, and emptied clusters are re-seeded by splitting the widest one. 1-D assignment is
a ``searchsorted`` against the midpoints, which is exact nearest-centroid assignment.
"""

from __future__ import annotations

from typing import Literal

import torch

Init = Literal["linear", "density", "random", "kmeans++"]


def _init(x: torch.Tensor, k: int, init: str, gen: torch.Generator) -> torch.Tensor:
    lo, hi = x[0], x[-1]  # x is sorted
    if init == "linear":
        return torch.linspace(float(lo), float(hi), k, dtype=x.dtype)
    if init == "density":
        q = (torch.arange(k, dtype=torch.float64) + 0.5) / k
        return torch.quantile(x.double(), q).to(x.dtype)
    if init == "random":
        u = torch.unique(x)
        return u[torch.randperm(u.numel(), generator=gen)[:k]]
    if init == "kmeans++":
        c = [x[torch.randint(x.numel(), (1,), generator=gen)]]
        d2 = (x - c[0]) ** 2
        for _ in range(1, k):
            p = d2.double()
            if float(p.sum()) <= 0:
                break
            nxt = x[torch.multinomial(p / p.sum(), 1, generator=gen)]
            c.append(nxt)
            d2 = torch.minimum(d2, (x - nxt) ** 2)
        return torch.cat(c)
    raise ValueError(f"unknown init {init!r}; use linear, density, random or kmeans++")


def assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted ``centroids`` for every value of ``x`` (int64)."""
    mid = (centroids[1:] + centroids[:-1]) / 2
    return torch.searchsorted(mid.contiguous(), x.contiguous(), right=False)


def kmeans1d(values: torch.Tensor, k: int, init: Init = "linear", iterations: int = 50,
             seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster ``values`` (any shape) into at most ``k`` centroids. Returns (sorted centroids, index)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    flat = values.detach().reshape(-1).float()
    if flat.numel() == 0:
        return torch.zeros(0), torch.zeros(values.shape, dtype=torch.int64)
    xs = torch.sort(flat).values
    k = min(k, int(torch.unique(xs).numel()))
    gen = torch.Generator().manual_seed(seed)
    c = torch.sort(torch.unique(_init(xs, k, init, gen))).values
    for _ in range(iterations):
        idx = assign(xs, c)
        counts = torch.bincount(idx, minlength=c.numel())
        sums = torch.zeros(c.numel(), dtype=torch.float64).index_add_(0, idx, xs.double())
        new = torch.where(counts > 0, sums / counts.clamp(min=1), c.double()).float()
        new = torch.sort(torch.unique(new[counts > 0])).values
        if new.numel() == c.numel() and torch.equal(new, c):
            break
        c = new
    # top up to k centroids when some emptied or merged: split the widest clusters
    while c.numel() < k:
        idx = assign(xs, c)
        spread = torch.zeros(c.numel()).scatter_reduce_(0, idx, (xs - c[idx]).abs(), "amax", include_self=False)
        j = int(spread.argmax())
        members = xs[idx == j]
        extra = members[(members - c[j]).abs().argmax()]
        c = torch.sort(torch.unique(torch.cat([c, extra.reshape(1)]))).values
    # final centroids are the member means, so every centroid owns its members
    idx = assign(xs, c)
    counts = torch.bincount(idx, minlength=c.numel())
    sums = torch.zeros(c.numel(), dtype=torch.float64).index_add_(0, idx, xs.double())
    c = torch.where(counts > 0, sums / counts.clamp(min=1), c.double()).float()
    return c, assign(flat, c).reshape(values.shape)
