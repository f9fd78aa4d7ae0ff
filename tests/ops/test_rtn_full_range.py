"""The full-signed-range symmetric grid (``full_range=True``, :mod:`nnsqueeze.ops.rtn`) against a
float64 reference written here: ``scale = absmax / (2**(b-1) - 0.5)``, codes
``clamp(round_half_even(w / scale), -2**(b-1), 2**(b-1) - 1)``, on odd shapes and short last groups."""

from __future__ import annotations

import pytest
import torch

from nnsqueeze.ops.rtn import QuantGrid, rtn_quantize, sym_divisor


def reference(w: torch.Tensor, bits: int, group: int | None):
    """float64 scales (N, G) and codes (N, K) of the full-range grid, group by group."""
    w64 = w.double()
    n, k = w64.shape
    g = group or k
    scales, codes = [], []
    for s in range(0, k, g):
        part = w64[:, s:s + g]
        amax = part.abs().amax(1, keepdim=True)
        sc = (amax / ((1 << (bits - 1)) - 0.5)).float().double()   # the scale nnsqueeze stores: float32
        sc = torch.where(sc == 0, torch.full_like(sc, torch.finfo(torch.float32).eps), sc)
        scales.append(sc)
        codes.append(torch.clamp(torch.round(part / sc), -(1 << (bits - 1)), (1 << (bits - 1)) - 1))
    return torch.cat(scales, 1), torch.cat(codes, 1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape,group", [((7, 77), 32), ((5, 33), None), ((3, 19), 7), ((1, 64), 16)])
def test_full_range_matches_float64_reference(bits, shape, group):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(bits * 100 + shape[1]))
    w[0, 0] = 0.0                                        # zeros stay exact
    r = rtn_quantize(w, bits, group, True, full_range=True)
    ref_scale, ref_codes = reference(w, bits, group)
    assert torch.equal(r.scale.double(), ref_scale)      # scales: bit-equal (one fp32 division each)
    # codes: equal except where fp32 division lands on the other side of a .5 tie than float64 does
    # (|w / s| within 1e-5 of a half-integer); there they differ by one code at most
    q64 = w.double() / ref_scale.repeat_interleave(group or shape[1], 1)[:, :shape[1]]
    near_tie = ((q64.abs() - q64.abs().floor()) - 0.5).abs() < 1e-5
    diff = (r.codes.double() - ref_codes).abs()
    assert bool((diff[~near_tie] == 0).all()) and float(diff.max()) <= 1
    assert int(r.codes.min()) >= -(1 << (bits - 1)) and int(r.codes.max()) <= (1 << (bits - 1)) - 1
    # every value within half a step (the clamped top end included: absmax is 2**(b-1) - 0.5 steps),
    # plus the float32 rounding of the dequantized value and of w / s (2**-22 relative)
    step = ref_scale.repeat_interleave(group or shape[1], 1)[:, :shape[1]]
    slack = w.double().abs() * 2.0 ** -22 + step * 2.0 ** -20
    assert bool(((w.double() - r.weight.double()).abs() <= step / 2 + slack).all())
    assert float(r.weight[0, 0]) == 0.0


def test_negative_end_uses_the_extra_code_and_unsigned_layout_shifts_it():
    # absmax 7.5 * 2**-4: the scale 2**-4 is exact, so -absmax is exactly -7.5 steps -> -8 (half to even)
    w = torch.tensor([[-0.46875, 0.1, 0.46875, 0.2], [0.3, -0.1, 0.0, 0.05]])
    r = rtn_quantize(w, 4, 2, True, full_range=True)
    assert r.scale[0].tolist() == [0.0625, 0.0625]
    assert r.codes[0].tolist() == [-8, 2, 7, 3]           # +7.5 steps clamps to 7
    u = rtn_quantize(w, 4, 2, True, full_range=True, unsigned=True)
    assert torch.equal(u.codes, r.codes + 8) and torch.equal(u.zero_point, r.zero_point + 8)
    assert torch.equal(u.weight, r.weight)
    assert r.weight[0].tolist() == [-0.5, 0.125, 0.4375, 0.1875]


def test_step_is_finer_than_the_restricted_grid_and_default_unchanged():
    w = torch.randn(16, 96, generator=torch.Generator().manual_seed(3))
    full = rtn_quantize(w, 4, 32, True, full_range=True)
    restricted = rtn_quantize(w, 4, 32, True)
    assert torch.allclose(full.scale * 7.5, restricted.scale * 7, rtol=1e-6)   # same absmax, 7.5 vs 7 steps
    assert int(restricted.codes.min()) >= -7                                   # default: ORT's grid
    assert sym_divisor(4) == 7.0 and sym_divisor(4, True) == 7.5 and sym_divisor(8, True) == 127.5
    # the asymmetric grid ignores the option (it already uses every code)
    a, b = rtn_quantize(w, 4, 32, False), rtn_quantize(w, 4, 32, False, full_range=True)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)


def test_fp16_scales_and_clip_search_keep_the_grid():
    w = torch.randn(6, 45, generator=torch.Generator().manual_seed(4)) * 3
    r = rtn_quantize(w, 4, 16, True, "fp16", full_range=True)
    assert torch.equal(r.scale.half().float(), r.scale)                   # storable in fp16
    exact = rtn_quantize(w, 4, 16, True, full_range=True).scale          # fp32 scales: absmax / 7.5
    assert bool((r.scale >= exact).all()) and bool((r.scale <= exact * (1 + 2.0 ** -10)).all())  # rounded up
    assert int(r.codes.min()) >= -8 and int(r.codes.max()) <= 7
    clipped = rtn_quantize(w, 4, 16, True, clip_grid=10, full_range=True)
    assert float(((w - clipped.weight) ** 2).sum()) <= float(((w - rtn_quantize(w, 4, 16, True, full_range=True)
                                                               .weight) ** 2).sum())
    assert QuantGrid(4, 16, full_range=True).params(w[:, :16])[0].shape == (6,)
