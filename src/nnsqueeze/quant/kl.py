"""``kl`` observer: entropy calibration (TensorRT's KL-divergence threshold search).

Values are histogrammed (``bins`` bins over ``[0, absmax]`` of ``|x|``, or over ``[0, max]`` when
nothing is negative). For each candidate threshold ``i`` bins, the reference distribution ``P``
is the first ``i`` bins with the clipped tail added to the last one, and ``Q`` is ``P`` merged
into the ``levels`` quantization bins and spread back over the non-empty source bins; the
threshold with the smallest ``KL(P || Q)`` wins. ``levels`` is ``2**(bits-1)`` for a signed
(two-sided) range and ``2**bits`` for a one-sided one. Recipe: ``calibration: {method: kl}``. ::

    >>> import torch
    >>> from nnsqueeze.registry import OBSERVERS
    >>> obs = OBSERVERS.get("kl")(name="x")
    >>> x = torch.rand(50000, generator=torch.Generator().manual_seed(0))   # uniform: no clipping
    >>> obs.observe(x)
    >>> float(obs._range(8, False)[1]) > 0.97
    True
"""

from __future__ import annotations

import numpy as np
import torch

from ..registry import OBSERVERS
from .sampling import SampleObserver

Tensor = torch.Tensor


def kl_threshold(hist: np.ndarray, levels: int) -> int:
    """Number of leading bins whose clipped distribution has the least KL divergence after
    quantization into ``levels`` bins (TensorRT's entropy calibration)."""
    hist = hist.astype(np.float64)
    n = hist.size
    if n <= levels:
        return n
    best_i, best_kl = n, np.inf
    for i in range(levels, n + 1):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        nonzero = hist[:i] > 0
        # merge i bins into `levels` groups, spread each group's mass over its non-empty bins
        edges = np.linspace(0, i, levels + 1).astype(int)  # strictly increasing since i >= levels
        sums = np.add.reduceat(hist[:i], edges[:-1])
        counts = np.add.reduceat(nonzero.astype(np.float64), edges[:-1])
        q = np.repeat(sums / np.maximum(counts, 1.0), np.diff(edges)) * nonzero
        ps, qs = p.sum(), q.sum()
        if ps == 0 or qs == 0:
            continue
        p, q = p / ps, q / qs
        m = p > 0
        if np.any(q[m] == 0):
            kl = np.inf
        else:
            kl = float(np.sum(p[m] * np.log(p[m] / q[m])))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return best_i


@OBSERVERS.register("kl")
class KLObserver(SampleObserver):
    bins: int = 2048

    def _range(self, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
        x = self.samples
        one_sided = float(self.min_) >= 0.0 and not symmetric
        a = x.abs()
        top = float(a.max()) if a.numel() else 0.0
        if top == 0.0:
            return self.min_, self.max_
        hist = torch.histc(a, bins=self.bins, min=0.0, max=top).numpy()
        levels = (1 << bits) if one_sided else (1 << (bits - 1))
        i = kl_threshold(hist, levels)
        t = torch.tensor(top * i / self.bins, dtype=torch.float32)
        return (torch.zeros(()), t) if one_sided else (-t, t)
