"""Magnitude-sparsity math: exact-count masks, a global threshold, and the cubic schedule.

Pure tensor functions, no module walking. A *mask* here is a ``torch.bool`` tensor shaped like the
weight, ``True`` = keep, ``False`` = pruned. Every function hits the exact count
``round(sparsity * numel)`` (Python ``round``: halves go to the even integer) even when many
magnitudes tie, because ties are broken by flat index: among equal scores the lower index
(in row-major order; in concatenation order across tensors) is pruned first. ::

    >>> import torch
    >>> from nnsqueeze.ops.sparsity import magnitude_mask, global_magnitude_masks, cubic_sparsity
    >>> w = torch.tensor([[0.1, -3.0], [2.0, 0.1]])
    >>> magnitude_mask(w, 0.5)                      # the two 0.1s go
    tensor([[False,  True],
            [ True, False]])
    >>> [int(m.sum()) for m in global_magnitude_masks([w, 10 * w], 0.25)]   # both from w
    [2, 4]
    >>> round(cubic_sparsity(50, final=0.8, begin=0, end=100), 6)   # Zhu & Gupta 2017, halfway
    0.7

The schedule is Zhu & Gupta, "To prune, or not to prune" (2017):
``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3`` for ``t = t0, t0 + dt, ..., t0 + n*dt``.
"""

from __future__ import annotations

from typing import Sequence

import torch

Tensor = torch.Tensor


def n_to_prune(numel: int, sparsity: float) -> int:
    """Number of entries a mask at ``sparsity`` prunes: ``round(sparsity * numel)``."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    return min(numel, int(round(sparsity * numel)))


def lowest_k_mask(scores: Tensor, k: int) -> Tensor:
    """Keep-mask (bool, shaped like ``scores``) that drops exactly the ``k`` lowest scores.

    Ties at the cut are broken by flat index (lower index dropped first), so the result is
    deterministic and the count is exact. Equivalent to dropping the first ``k`` entries of a
    *stable* ascending argsort, but needs only a k-th value selection (O(n), no n-sized index sort).
    """
    flat = scores.detach().reshape(-1)
    n = flat.numel()
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    if torch.isnan(flat).any():
        raise ValueError("scores contain NaN")
    keep = torch.ones(n, dtype=torch.bool, device=flat.device)
    if k == 0:
        return keep.view(scores.shape)
    if k == n:
        return torch.zeros_like(keep).view(scores.shape)
    cut = flat.kthvalue(k).values  # the k-th smallest score (1-based)
    below = flat < cut  # all of these go; (k - below.sum()) of the entries equal to cut go too
    keep[below] = False
    need = k - int(below.sum())
    tied = torch.nonzero(flat == cut).squeeze(1)  # ascending flat indices
    keep[tied[:need]] = False
    return keep.view(scores.shape)


def _scores(weight: Tensor, mask: Tensor | None) -> Tensor:
    # |w| in float32 (fp16/bf16 weights are cast exactly); already-pruned entries score -inf so they
    # are always the first to go and a new mask never revives a pruned weight.
    s = weight.detach().abs().float()
    if mask is not None:
        s = s.masked_fill(~mask.bool(), float("-inf"))
    return s


def magnitude_mask(weight: Tensor, sparsity: float, mask: Tensor | None = None) -> Tensor:
    """Keep-mask pruning exactly ``round(sparsity * weight.numel())`` smallest-|w| entries.

    ``mask`` (optional, bool keep-mask) is an existing mask: the result is a subset of it, so the
    count is ``max(round(sparsity * numel), already pruned)``.
    """
    keep = lowest_k_mask(_scores(weight, mask), n_to_prune(weight.numel(), sparsity))
    return keep if mask is None else keep & mask.bool()


def global_magnitude_masks(weights: Sequence[Tensor], sparsity: float,
                           masks: Sequence[Tensor | None] | None = None) -> list[Tensor]:
    """Keep-masks for several tensors sharing one magnitude threshold.

    Exactly ``round(sparsity * total_numel)`` entries are pruned across all tensors together
    (per-tensor sparsities differ). ``masks`` are existing masks, as in :func:`magnitude_mask`.
    """
    if not weights:
        return []
    masks = list(masks) if masks is not None else [None] * len(weights)
    if len(masks) != len(weights):
        raise ValueError(f"{len(masks)} masks for {len(weights)} weights")
    # One flat score vector (total_numel,) on the first tensor's device; split back afterwards.
    dev = weights[0].device
    flat = torch.cat([_scores(w, m).reshape(-1).to(dev) for w, m in zip(weights, masks)])
    keep = lowest_k_mask(flat, n_to_prune(flat.numel(), sparsity))
    out, start = [], 0
    for w, m in zip(weights, masks):
        part = keep[start:start + w.numel()].view(w.shape).to(w.device)
        out.append(part if m is None else part & m.bool())
        start += w.numel()
    return out


def global_threshold(weights: Sequence[Tensor], sparsity: float) -> float:
    """The magnitude at the global cut: the largest |w| that is pruned at ``sparsity``.

    Every pruned entry has ``|w| <= t`` and every kept one ``|w| >= t`` (entries equal to ``t``
    may fall on either side; :func:`global_magnitude_masks` splits them by index). Returns
    ``-inf`` when nothing is pruned.
    """
    flat = torch.cat([w.detach().abs().float().reshape(-1).cpu() for w in weights])
    k = n_to_prune(flat.numel(), sparsity)
    return float("-inf") if k == 0 else float(flat.kthvalue(k).values)


def sparsity_of(t: Tensor) -> float:
    """Fraction of zeros (for a bool mask: of ``False``)."""
    return 1.0 - float(torch.count_nonzero(t)) / max(1, t.numel())


def cubic_sparsity(step: int, final: float, initial: float = 0.0, begin: int = 0, end: int = 1,
                   frequency: int = 1) -> float:
    """Zhu & Gupta sparsity at ``step``: ``initial`` before ``begin``, ``final`` from ``end`` on.

    In between the value changes only at ``begin + j * frequency`` (it holds in between), so with
    ``n * dt = end - begin`` this is exactly ``s_f + (s_i - s_f) * (1 - (t - t0) / (n dt))**3``
    evaluated at the last update point ``t <= step``.
    """
    if frequency < 1:
        raise ValueError(f"frequency must be >= 1, got {frequency}")
    if step < begin:
        return initial
    if step >= end:
        return final
    t = begin + ((step - begin) // frequency) * frequency  # last update point
    frac = (t - begin) / (end - begin)
    # Same value as s_f + (s_i - s_f)(1 - frac)^3, written from s_i so that t = begin gives s_i
    # exactly, and clamped so float rounding can never step outside [s_i, s_f] (keeps it monotone).
    s = initial + (final - initial) * (1.0 - (1.0 - frac) ** 3)
    return min(max(s, min(initial, final)), max(initial, final))
