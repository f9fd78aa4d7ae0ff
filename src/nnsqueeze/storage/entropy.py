"""Entropy-coded storage of a clustered (and possibly pruned) weight: relative-index-coded sparse
positions plus Huffman-coded cluster indices, as in Deep Compression. Decoding is bit-exact.

    >>> import numpy as np
    >>> from nnsqueeze.storage.entropy import pack_codes, unpack_codes
    >>> codes = np.array([0, 0, 3, 1, 0, 0, 0, 2, 0, 1])   # 0 = pruned, 1..k = centroid k-1
    >>> blob = pack_codes(codes, k=3)
    >>> bool((unpack_codes(blob, codes.size) == codes).all())
    True

``codes`` holds one symbol per weight: 0 for a pruned (exactly zero) weight, ``c + 1`` for a
weight equal to centroid ``c``. Layout of the blob (little endian)::

    uint8  flags        bit 0: sparse (a gap stream follows); bits 1-7 reserved
    uint16 max_gap      escape symbol of the relative index (sparse only)
    uint32 gap_bytes    length of the gap stream (sparse only)
    gap stream          Huffman stream of positions_to_gaps(nonzero positions, max_gap)
    index stream        Huffman stream of the cluster index (code - 1) of every nonzero weight

A dense layer (no pruned weight) stores no positions. ``max_gap`` is chosen per layer among powers
of two minus one to make the blob smallest. See :mod:`nnsqueeze.ops.huffman` and
:mod:`nnsqueeze.ops.relindex` for the two streams.
"""

from __future__ import annotations

import struct

import numpy as np

from ..ops.huffman import decode, encode
from ..ops.relindex import gaps_to_positions, positions_to_gaps

_SPARSE = struct.Struct("<BHI")
GAP_CHOICES = (3, 7, 15, 31, 63, 127, 255)


def pack_codes(codes: np.ndarray, k: int) -> bytes:
    """Encode per-weight symbols (0 = pruned, 1..k = centroid) into a blob."""
    c = np.asarray(codes).reshape(-1).astype(np.int64)
    if c.size and (c.min() < 0 or c.max() > k):
        raise ValueError(f"codes must be in [0, {k}], got [{c.min()}, {c.max()}]")
    nz = np.flatnonzero(c)
    index = encode(c[nz] - 1, alphabet=max(1, k))
    if nz.size == c.size:
        return bytes([0]) + index
    best = None
    for g in GAP_CHOICES:
        gaps = encode(positions_to_gaps(nz, g), alphabet=g + 1)
        if best is None or len(gaps) < len(best[1]):
            best = (g, gaps)
    g, gaps = best
    return _SPARSE.pack(1, g, len(gaps)) + gaps + index


def unpack_codes(blob: bytes, numel: int) -> np.ndarray:
    """Inverse of :func:`pack_codes` for a tensor of ``numel`` weights (int64 symbols)."""
    if not blob:
        raise ValueError("empty blob")
    out = np.zeros(numel, dtype=np.int64)
    if blob[0] & 1 == 0:
        idx = decode(blob[1:])
        if idx.size != numel:
            raise ValueError(f"blob holds {idx.size} weights, expected {numel}")
        return idx + 1
    _, g, n = _SPARSE.unpack_from(blob)
    pos = gaps_to_positions(decode(blob[_SPARSE.size:_SPARSE.size + n]), g)
    idx = decode(blob[_SPARSE.size + n:])
    if pos.size != idx.size or (pos.size and pos[-1] >= numel):
        raise ValueError("corrupt blob: positions and indices disagree")
    out[pos] = idx + 1
    return out
