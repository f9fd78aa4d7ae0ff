"""Canonical Huffman coding of small-alphabet integer symbols, decoded bit-exactly. Pure numpy.

    >>> import numpy as np
    >>> from nnsqueeze.ops.huffman import encode, decode
    >>> sym = np.array([0, 0, 0, 1, 2, 0, 3, 0] * 100, dtype=np.int64)
    >>> blob = encode(sym, alphabet=4)
    >>> bool((decode(blob) == sym).all()), len(blob)      # 1.625 bits/symbol + 10 bytes of header
    (True, 173)

Stream layout (little endian)::

    uint32 n          number of symbols
    uint16 A          alphabet size (symbols are 0 .. A-1)
    A x uint8         code length of every symbol (0 = unused)
    payload           the codes, most significant bit first, zero-padded to a byte

Codes are canonical (assigned in order of (length, symbol)), so the lengths alone define them.
Lengths are limited to :data:`MAX_LEN` bits (frequencies are flattened until they fit), which keeps
the decoder a single table lookup per symbol. A stream with one distinct symbol uses 1 bit each;
an empty input is 6 + A bytes.
"""

from __future__ import annotations

import heapq
import struct

import numpy as np

MAX_LEN = 16
_HEADER = struct.Struct("<IH")


def code_lengths(freqs: np.ndarray, max_len: int = MAX_LEN) -> np.ndarray:
    """Huffman code lengths (uint8) for ``freqs``; 0 for unused symbols, all lengths <= ``max_len``."""
    freqs = np.asarray(freqs, dtype=np.int64)
    lengths = np.zeros(freqs.size, dtype=np.uint8)
    used = np.flatnonzero(freqs > 0)
    if used.size == 0:
        return lengths
    if used.size == 1:
        lengths[used] = 1
        return lengths
    if used.size > (1 << max_len):
        raise ValueError(f"{used.size} symbols do not fit codes of at most {max_len} bits")
    f = freqs[used].copy()
    while True:
        # heap of (weight, tie-break, leaves); merge the two lightest, every leaf gets one bit deeper
        depth = np.zeros(used.size, dtype=np.int64)
        heap = [(int(w), i, [i]) for i, w in enumerate(f)]
        heapq.heapify(heap)
        tie = used.size
        while len(heap) > 1:
            w1, _, a = heapq.heappop(heap)
            w2, _, b = heapq.heappop(heap)
            depth[a + b] += 1
            heapq.heappush(heap, (w1 + w2, tie, a + b))
            tie += 1
        if depth.max() <= max_len:
            lengths[used] = depth
            return lengths
        f = (f + 1) // 2  # flatten the distribution; converges to a balanced tree


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code values (int64) for ``lengths``: shorter first, then by symbol."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(lengths.size, dtype=np.int64)
    code, prev = 0, 0
    for s in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[s]) - prev
        prev = int(lengths[s])
        codes[s] = code
        code += 1
    return codes


def encode(symbols: np.ndarray, alphabet: int) -> bytes:
    """Huffman-code ``symbols`` (integers in ``[0, alphabet)``) into a self-describing byte string."""
    sym = np.asarray(symbols).reshape(-1).astype(np.int64)
    if not 1 <= alphabet <= 65535:
        raise ValueError(f"alphabet must be in [1, 65535], got {alphabet}")
    if sym.size and (sym.min() < 0 or sym.max() >= alphabet):
        raise ValueError(f"symbols must be in [0, {alphabet}), got [{sym.min()}, {sym.max()}]")
    if sym.size >= 1 << 32:
        raise ValueError("at most 2**32 - 1 symbols per stream")
    lengths = code_lengths(np.bincount(sym, minlength=alphabet))
    codes = canonical_codes(lengths)
    header = _HEADER.pack(sym.size, alphabet) + lengths.tobytes()
    if sym.size == 0:
        return header
    lens, vals = lengths[sym].astype(np.int64), codes[sym]
    # bit j of a code (MSB first) at position offset + j of the stream
    ends = np.cumsum(lens)
    starts = ends - lens
    total = int(ends[-1])
    owner = np.repeat(np.arange(sym.size), lens)
    j = np.arange(total) - starts[owner]
    bits = ((vals[owner] >> (lens[owner] - 1 - j)) & 1).astype(np.uint8)
    return header + np.packbits(bits).tobytes()


def decode(blob: bytes) -> np.ndarray:
    """Inverse of :func:`encode`: the symbols as int64, bit-exact."""
    if len(blob) < _HEADER.size:
        raise ValueError("truncated Huffman stream (no header)")
    n, alphabet = _HEADER.unpack_from(blob)
    head = _HEADER.size + alphabet
    if len(blob) < head:
        raise ValueError("truncated Huffman stream (code lengths)")
    lengths = np.frombuffer(blob, dtype=np.uint8, count=alphabet, offset=_HEADER.size).astype(np.int64)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if lengths.max() == 0 or lengths.max() > MAX_LEN:
        raise ValueError("corrupt Huffman stream (code lengths)")
    codes = canonical_codes(lengths)
    width = int(lengths.max())
    # lookup table over every `width`-bit window: symbol and its length
    table_sym = np.full(1 << width, -1, dtype=np.int64)
    table_len = np.zeros(1 << width, dtype=np.int64)
    for s in np.flatnonzero(lengths):
        lo = int(codes[s]) << (width - int(lengths[s]))
        hi = lo + (1 << (width - int(lengths[s])))
        table_sym[lo:hi], table_len[lo:hi] = s, lengths[s]
    bits = np.unpackbits(np.frombuffer(blob, dtype=np.uint8, offset=head))
    bits = np.concatenate([bits, np.zeros(width, dtype=np.uint8)]).astype(np.int64)
    windows = np.zeros(bits.size - width, dtype=np.int64)
    for i in range(width):  # value of the `width` bits starting at every position
        windows = (windows << 1) | bits[i:i + windows.size]
    out = np.empty(n, dtype=np.int64)
    tsym, tlen, win = table_sym.tolist(), table_len.tolist(), windows.tolist()
    p, limit = 0, len(win)
    for i in range(n):
        if p >= limit:
            raise ValueError("truncated Huffman stream (payload)")
        v = win[p]
        s = tsym[v]
        if s < 0:
            raise ValueError("corrupt Huffman stream (invalid code)")
        out[i] = s
        p += tlen[v]
    if (p + 7) // 8 > len(blob) - head:
        raise ValueError("truncated Huffman stream (payload)")
    return out
