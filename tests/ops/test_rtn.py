"""nnsqueeze.ops.rtn, the one round-to-nearest weight grid, against float64 references on odd shapes
(rows and columns not multiples of the group), every layout and option its callers use."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch

from nnsqueeze.ops import rtn
from nnsqueeze.ops.quant import EPS, qrange
from nnsqueeze.ops.rtn import (QuantGrid, dequantize_groups, from_rows, per_group, quantize_groups, rows_mask,
                               row_qparams, rtn_quantize, to_rows)


def _w(shape, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.rand(shape[0], *[1] * (len(shape) - 1), generator=g) * 3
    w.reshape(shape[0], -1)[0, :3] = 0.0  # exact zeros in one group
    return w


def _ref_group(blk: np.ndarray, bits: int, symmetric: bool, ratio: float = 1.0) -> tuple[float, int, int, int]:
    """float64 reference of one group: (scale, zero point, qmin, qmax) of the signed/unsigned grid."""
    lo, hi = min(blk.min() * ratio, 0.0), max(blk.max() * ratio, 0.0)
    if symmetric:
        qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        return max(max(-lo, hi) / qmax, EPS), 0, qmin, qmax
    qmin, qmax = 0, (1 << bits) - 1
    scale = max((hi - lo) / qmax, EPS)
    return scale, int(np.clip(np.round(-lo / scale), qmin, qmax)), qmin, qmax


def _groups(k: int, group: int | None) -> list[tuple[int, int]]:
    g = k if group is None or group <= 0 else group
    return [(a, min(a + g, k)) for a in range(0, k, g)]


@pytest.mark.parametrize("shape", [(7, 83), (5, 13), (3, 300), (1, 5)])
@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True), (8, False), (3, False), (2, True)])
@pytest.mark.parametrize("group", [None, 5, 16, 128])
def test_rtn_against_float64_reference(shape, bits, symmetric, group):
    w = _w(shape, 0)
    r = rtn_quantize(w, bits, group, symmetric)
    w64 = w.double().numpy()
    groups = _groups(shape[1], group)
    assert r.scale.shape == r.zero_point.shape == (shape[0], len(groups))
    for n in range(shape[0]):
        for gi, (a, b) in enumerate(groups):
            scale, zp, qmin, qmax = _ref_group(w64[n, a:b], bits, symmetric)
            assert abs(float(r.scale[n, gi]) - scale) <= 1e-6 * scale and int(r.zero_point[n, gi]) == zp
            codes = np.clip(np.round(w64[n, a:b] / float(r.scale[n, gi])) + zp, qmin, qmax)
            # the codes are the float64 rounding (fp32 division can only move a value sitting on a half)
            assert np.abs(r.codes[n, a:b].numpy() - codes).max() <= 1
            # values: (q - zp) * scale with one float32 rounding, bit for bit
            assert np.array_equal(r.weight[n, a:b].numpy(),
                                  (r.codes[n, a:b].numpy() - zp).astype(np.float32) * r.scale[n, gi].numpy())
            assert np.abs(r.weight[n, a:b].double().numpy() - w64[n, a:b]).max() <= scale / 2 * (1 + 1e-5)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits,group", [(4, 32), (4, -1), (8, 64), (4, 16)])
def test_unsigned_layout_against_float64_reference(bits, group, symmetric):
    """The weight-only / packed storage layout (ONNX Runtime MatMulNBits): unsigned codes, symmetric
    zero point 2**(b-1), an all-zero group stored with scale 1."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 83, generator=g)  # K not a multiple of the group size
    w[2, :32] = 0.0
    grid = QuantGrid(bits, group, symmetric, unsigned=True, empty_scale=1.0)
    s, z = grid.qparams(w)
    q = quantize_groups(w, s, z, grid.group_size, 0, (1 << bits) - 1)
    wd = dequantize_groups(q, s, z, grid.group_size)
    w64 = w.double().numpy()
    for n in range(7):
        for gi, (k0, k1) in enumerate(_groups(83, group)):
            blk = w64[n, k0:k1]
            if not blk.any():
                assert float(s[n, gi]) == 1.0 and (wd[n, k0:k1] == 0).all()
                continue
            if symmetric:
                scale, zp = np.abs(blk).max() / (2 ** (bits - 1) - 1), 2 ** (bits - 1)
            else:
                lo, hi = min(blk.min(), 0), max(blk.max(), 0)
                scale = (hi - lo) / (2 ** bits - 1)
                zp = np.clip(np.round(-lo / scale), 0, 2 ** bits - 1)
            assert abs(float(s[n, gi]) - scale) <= 1e-6 * scale and int(z[n, gi]) == zp
            assert int(q[n, k0:k1].min()) >= (1 if symmetric else 0) and int(q[n, k0:k1].max()) <= 2 ** bits - 1
            err = np.abs(wd[n, k0:k1].double().numpy() - blk)
            assert err.max() <= scale / 2 * (1 + 1e-5)  # nothing clipped: at most half a step


@pytest.mark.parametrize("bits,symmetric", [(4, True), (8, False), (3, True)])
@pytest.mark.parametrize("scale_dtype", ["fp32", "fp16", "bf16", "fp16-exact"])
def test_unsigned_is_the_signed_grid_shifted(bits, symmetric, scale_dtype):
    w = _w((9, 70), 3)
    a = rtn_quantize(w, bits, 32, symmetric, scale_dtype, clip_grid=5)
    b = rtn_quantize(w, bits, 32, symmetric, scale_dtype, clip_grid=5, unsigned=True)
    shift = (1 << (bits - 1)) if symmetric else 0
    assert torch.equal(a.weight, b.weight) and torch.equal(a.scale, b.scale)
    assert torch.equal(b.zero_point, a.zero_point + shift) and torch.equal(b.codes, a.codes + shift)


def test_degenerate_rows_floor_at_eps():
    w = torch.zeros(2, 8)
    w[1, 0] = 1e-9
    s, z = row_qparams(w, 4, False)
    assert (s == EPS).all() and (z == 0).all()
    s1, _ = row_qparams(w, 4, False, empty_scale=1.0)
    assert s1[0] == 1.0 and 0 < float(s1[1]) < EPS      # only an exact zero scale is replaced


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("unsigned", [False, True])
def test_clip_search_is_the_float64_argmin(symmetric, weighted, unsigned):
    g = torch.Generator().manual_seed(4)
    rows = torch.randn(12, 23, generator=g)
    rows[:, 5] *= 10  # outliers: clipping pays off
    wt = torch.rand(23, generator=g, dtype=torch.float64) + 0.1 if weighted else torch.ones(23, dtype=torch.float64)
    ratios = rtn.clip_ratios(20, 0.3)
    s, z = row_qparams(rows, 4, symmetric, clip_grid=20, clip_min=0.3, importance=wt if weighted else None,
                       unsigned=unsigned)
    r64, wt64 = rows.double().numpy(), wt.numpy()
    shift = 1 << 3 if symmetric and unsigned else 0
    clipped = 0
    for i in range(12):
        errs = []
        for r in ratios:
            scale, zp, qmin, qmax = _ref_group(r64[i], 4, symmetric, r)
            q = (np.clip(np.round(r64[i] / scale) + zp, qmin, qmax) - zp) * scale
            errs.append(float(((r64[i] - q) ** 2 * wt64).sum()))
        # the error of the grid chosen, in float64, in the layout asked for
        sc, zc = float(s[i]), int(z[i])
        qmin, qmax = _ref_group(r64[i], 4, symmetric)[2:]
        q = (np.clip(np.round(r64[i] / sc) + zc, qmin + shift, qmax + shift) - zc) * sc
        chosen = float(((r64[i] - q) ** 2 * wt64).sum())
        assert chosen <= min(errs) * (1 + 1e-5)        # the minimizer over the ratios (float32 near-ties aside)
        assert chosen <= errs[0] * (1 + 1e-6)          # never worse than no clipping
        clipped += chosen < errs[0] * 0.95
    assert clipped >= 2                                # and the search does clip


@pytest.mark.parametrize("shape,group", [((6, 3, 3, 3), 16), ((8, 300), 128), ((5, 2, 7), 4), ((4, 64), 16),
                                         ((3, 10), None)])
def test_rows_geometry_round_trip_and_padding(shape, group):
    w = _w(shape, 1)
    k = w[0].numel()
    rows = to_rows(w, group)
    g, length, pad = rtn.group_shape(k, group)
    assert rows.shape == (shape[0] * g, length)
    assert torch.equal(from_rows(rows, w.shape, group), w)
    mask = rows_mask(shape[0], k, group)
    assert (mask is None) == (pad == 0)
    if mask is not None:
        assert int((~mask).sum()) == shape[0] * pad and (rows[~mask] == 0).all()
    # statistics of a short last group come from its own values only
    (mean,) = per_group(lambda r: (r.mean(1),), rows, k, group)
    flat = w.reshape(shape[0], -1).double()
    ref = torch.stack([flat[:, a:b].mean(1) for a, b in _groups(k, group)], 1).reshape(-1)
    assert torch.allclose(mean.double(), ref, rtol=1e-6, atol=1e-7)


def test_grid_rejects_bad_options():
    for kw in ({"bits": 9}, {"group_size": 0}, {"clip_grid": 0}, {"clip_min": 0.0}, {"scale_dtype": "fp8"}):
        with pytest.raises(ValueError):
            QuantGrid(**kw)
    with pytest.raises(ValueError, match="2-d"):
        rtn_quantize(torch.randn(2, 3, 4))


def test_docstring_examples():
    result = doctest.testmod(rtn, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("bits,symmetric,full_range", [(4, True, False), (4, True, True), (4, False, False),
                                                      (3, True, False), (3, False, False), (8, True, False),
                                                      (2, False, False)])
def test_fp16_exact_scales_make_every_dequantized_weight_an_fp16_value(bits, symmetric, full_range):
    """fp16-exact: (q - z) * s computed in fp16 (as gptqmodel's CPU kernels do) equals the float32 value
    for every code of the range, the scale still covers the range (>= the fp16 scale, codes in range), and
    it is at most 2**(code_bits - 10) relative above it. Odd row lengths and magnitudes from 1e-6 to 1e3
    (the 2**-14 floor: every product stays a normal fp16 value)."""
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(11, 77, generator=g) * torch.logspace(-6, 3, 11).unsqueeze(1)
    plain = rtn_quantize(w, bits, 16, symmetric, "fp16", full_range=full_range)
    exact = rtn_quantize(w, bits, 16, symmetric, "fp16-exact", full_range=full_range)
    s = exact.scale
    assert torch.equal(s.half().float(), s) and (s >= plain.scale).all() and (s >= 2.0 ** -14).all()
    code_bits = bits - 1 if symmetric else bits
    normal = plain.scale >= 2.0 ** -14
    assert (s[normal] <= plain.scale[normal] * (1 + 2.0 ** (code_bits - 10))).all()
    qmin, qmax = qrange(bits, symmetric)
    z = exact.zero_point.float().repeat_interleave(16, dim=1)[:, :77]
    k = exact.codes.float() - z                                        # every code difference in use
    assert exact.codes.min() >= qmin and exact.codes.max() <= qmax
    sc = s.repeat_interleave(16, dim=1)[:, :77]
    assert torch.equal((k.half() * sc.half()).float(), exact.weight)   # fp16 arithmetic = float32 weights
    span = torch.arange(qmin - qmax, qmax - qmin + 1, dtype=torch.float32).unsqueeze(1)
    allk = span[span.abs().squeeze(1) < 2 ** code_bits + (1 if symmetric else 0)]  # the whole reachable range
    prod = allk * s.reshape(1, -1)
    assert torch.equal((allk.half() * s.reshape(1, -1).half()).float(), prod)


@pytest.mark.parametrize("columns,group,want", [(576, 128, 64), (1536, 128, 128), (96, 64, 32), (48, 128, 16),
                                                (40, 32, None), (4096, 128, 128)])
def test_smaller_group_is_the_largest_dividing_power_of_two(columns, group, want):
    from nnsqueeze.ops.rtn import smaller_group

    got = smaller_group(columns, group)
    assert got == want
    larger = [p for p in (2 ** b for b in range(4, 31)) if p <= group and (got is None or p > got)]
    assert all(columns % p for p in larger)   # no larger power of two >= 16 up to group divides
    assert got is None or columns % got == 0
