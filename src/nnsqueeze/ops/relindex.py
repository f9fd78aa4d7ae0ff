"""Relative index coding of sparse positions (Deep Compression, Han et al. 2016). Pure numpy.

The positions of the nonzero entries of a flattened tensor are stored as gaps from the previous
nonzero (the first from position -1), so that each is a small number. A gap larger than
``max_gap`` is split: the escape symbol ``max_gap`` means "skip ``max_gap`` positions, no entry
here" (the paper's filler zero, without spending a value on it); any other symbol ``g`` means "the
next entry is ``g + 1`` positions on". Symbols are thus in ``[0, max_gap]``.

    >>> import numpy as np
    >>> from nnsqueeze.ops.relindex import positions_to_gaps, gaps_to_positions
    >>> g = positions_to_gaps(np.array([2, 3, 40]), max_gap=15)
    >>> g.tolist()
    [2, 0, 15, 15, 6]
    >>> gaps_to_positions(g, max_gap=15).tolist()
    [2, 3, 40]
"""

from __future__ import annotations

import numpy as np


def positions_to_gaps(positions: np.ndarray, max_gap: int = 255) -> np.ndarray:
    """Strictly increasing non-negative ``positions`` -> gap symbols in ``[0, max_gap]`` (int64)."""
    if max_gap < 1:
        raise ValueError(f"max_gap must be >= 1, got {max_gap}")
    pos = np.asarray(positions, dtype=np.int64).reshape(-1)
    if pos.size == 0:
        return np.zeros(0, dtype=np.int64)
    if pos[0] < 0 or (pos.size > 1 and (np.diff(pos) <= 0).any()):
        raise ValueError("positions must be non-negative and strictly increasing")
    d = np.diff(pos, prepend=-1) - 1          # empty positions skipped before each entry
    esc = d // max_gap                        # escapes needed before each entry
    rest = d - esc * max_gap
    out = np.full(int(esc.sum()) + pos.size, max_gap, dtype=np.int64)
    out[np.cumsum(esc + 1) - 1] = rest        # each entry's symbol follows its escapes
    return out


def gaps_to_positions(gaps: np.ndarray, max_gap: int = 255) -> np.ndarray:
    """Inverse of :func:`positions_to_gaps`."""
    g = np.asarray(gaps, dtype=np.int64).reshape(-1)
    if g.size and (g.min() < 0 or g.max() > max_gap):
        raise ValueError(f"gap symbols must be in [0, {max_gap}]")
    advance = np.where(g == max_gap, max_gap, g + 1)
    ends = np.cumsum(advance) - 1
    return ends[g != max_gap]
