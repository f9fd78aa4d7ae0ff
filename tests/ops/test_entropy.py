"""Huffman, relative-index and the combined entropy-coded blob: bit-exact round trips."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nnsqueeze.ops.huffman import MAX_LEN, canonical_codes, code_lengths, decode, encode
from nnsqueeze.ops.relindex import gaps_to_positions, positions_to_gaps
from nnsqueeze.storage.entropy import pack_codes, unpack_codes

RNG = np.random.default_rng(0)

INPUTS = {
    "empty": np.zeros(0, dtype=np.int64),
    "one": np.array([5]),
    "all_equal": np.full(1000, 3),
    "all_distinct": np.arange(256),
    "uniform": RNG.integers(0, 16, 5000),
    "skewed": np.minimum(RNG.geometric(0.4, 5000) - 1, 255),
    "fibonacci": np.repeat(np.arange(30), [1, 1] + [0] * 28)[:2],  # replaced below
}
# Fibonacci frequencies force the deepest possible Huffman tree (length-limiting kicks in).
_fib = [1, 1]
while len(_fib) < 30:
    _fib.append(_fib[-1] + _fib[-2])
INPUTS["fibonacci"] = RNG.permutation(np.repeat(np.arange(30), _fib))


@pytest.mark.parametrize("name", sorted(INPUTS))
def test_huffman_round_trip_bit_exact(name):
    sym = INPUTS[name]
    blob = encode(sym, alphabet=256)
    out = decode(blob)
    assert out.dtype == np.int64 and out.shape == (sym.size,)
    assert np.array_equal(out, sym)
    assert encode(out, alphabet=256) == blob  # deterministic


def test_huffman_is_near_entropy_and_prefix_free():
    sym = INPUTS["skewed"]
    freqs = np.bincount(sym, minlength=256)
    lengths = code_lengths(freqs)
    p = freqs[freqs > 0] / sym.size
    entropy = float(-(p * np.log2(p)).sum())
    avg = float((freqs * lengths).sum() / sym.size)
    assert entropy <= avg < entropy + 1  # Huffman's bound
    codes = canonical_codes(lengths)
    words = [format(int(codes[s]), f"0{lengths[s]}b") for s in np.flatnonzero(lengths)]
    assert not any(a != b and b.startswith(a) for a in words for b in words)
    assert sum(2.0 ** -len(w) for w in words) <= 1.0  # Kraft


def test_huffman_length_limit():
    lengths = code_lengths(np.array(_fib))
    assert lengths.max() <= MAX_LEN
    assert sum(2.0 ** -int(n) for n in lengths) <= 1.0
    assert code_lengths(np.array(_fib), max_len=40).max() == 29  # unlimited: the Fibonacci chain


def test_huffman_sizes_of_trivial_streams():
    assert len(encode(np.full(8000, 2), alphabet=4)) == 6 + 4 + 1000  # one symbol: 1 bit each
    assert len(encode(np.zeros(0, dtype=np.int64), alphabet=4)) == 6 + 4


def test_huffman_rejects_bad_input():
    with pytest.raises(ValueError, match="symbols must be in"):
        encode(np.array([0, 4]), alphabet=4)
    blob = encode(INPUTS["uniform"], alphabet=16)
    with pytest.raises(ValueError, match="truncated"):
        decode(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="truncated"):
        decode(blob[:3])


@pytest.mark.parametrize("max_gap", [1, 3, 15, 255])
def test_relative_index_round_trip(max_gap):
    cases = [np.zeros(0, dtype=np.int64), np.array([0]), np.arange(100), np.array([0, 1000, 1001, 5000]),
             np.sort(RNG.choice(100_000, 3000, replace=False))]
    for pos in cases:
        gaps = positions_to_gaps(pos, max_gap)
        assert gaps.size == 0 or (gaps.min() >= 0 and gaps.max() <= max_gap)
        assert np.array_equal(gaps_to_positions(gaps, max_gap), pos)


def test_relative_index_escapes():
    # 36 empty positions between 3 and 40, max gap 15: two escapes (30 positions), then gap 6
    assert positions_to_gaps(np.array([2, 3, 40]), 15).tolist() == [2, 0, 15, 15, 6]
    with pytest.raises(ValueError, match="increasing"):
        positions_to_gaps(np.array([3, 3]), 15)


@pytest.mark.parametrize("case", ["empty", "all_pruned", "dense_all_equal", "dense_distinct", "sparse",
                                  "one_at_end", "long_gap"])
def test_blob_round_trip_bit_exact(case):
    k = 16
    n = 5000
    codes = {
        "empty": np.zeros(0, dtype=np.int64),
        "all_pruned": np.zeros(n, dtype=np.int64),
        "dense_all_equal": np.full(n, 7),
        "dense_distinct": (np.arange(n) % k) + 1,
        "sparse": np.where(RNG.random(n) < 0.07, RNG.integers(1, k + 1, n), 0),
        "one_at_end": np.r_[np.zeros(n - 1, dtype=np.int64), 3],
        "long_gap": np.r_[2, np.zeros(100_000, dtype=np.int64), 5],
    }[case]
    blob = pack_codes(codes, k)
    assert np.array_equal(unpack_codes(blob, codes.size), codes)


def test_blob_is_close_to_entropy_on_sparse_codes():
    n, density, k = 100_000, 0.07, 16
    codes = np.where(RNG.random(n) < density, RNG.integers(1, k + 1, n), 0)
    h = -(density * math.log2(density) + (1 - density) * math.log2(1 - density))
    bound_bits = n * h + codes.astype(bool).sum() * math.log2(k)
    assert len(pack_codes(codes, k)) * 8 < 1.1 * bound_bits


def test_blob_rejects_wrong_size():
    blob = pack_codes(np.array([1, 2, 3]), 4)
    with pytest.raises(ValueError, match="holds 3 weights"):
        unpack_codes(blob, 4)
