"""FP8 E4M3/E5M2 (and the FP6/FP4 element formats) against independent references.

References: torch's own ``float8_e4m3fn`` / ``float8_e5m2`` casts (bit patterns), and a float64
table of every code built here from the bit layout with Python's exact ``fractions``. Tolerance:
none; every comparison is bit-exact (codes) or exact equality (values, float32 or float64).
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from nnsqueeze.ops.fp8 import (E2M1, E2M3, E3M2, E4M3, E5M2, FORMATS, decode, encode, fp8_dequantize,
                               fp8_fake_quantize, fp8_quantize, fp8_scale, get_format, values)

TORCH = {E4M3: torch.float8_e4m3fn, E5M2: torch.float8_e5m2}
# torch's E4M3 cast saturates (inf -> 448); its E5M2 cast does not (overflow -> inf).
TORCH_SATURATES = {E4M3: True, E5M2: False}


def layout_value(code: int, ebits: int, mbits: int, bias: int, specials: str) -> float:
    """Closed form of one code, in exact rationals: the independent reference table."""
    s, e, m = code >> (ebits + mbits), (code >> mbits) & ((1 << ebits) - 1), code & ((1 << mbits) - 1)
    top = e == (1 << ebits) - 1
    if specials == "ieee" and top:
        return math.nan if m else (-1) ** s * math.inf
    if specials == "fn" and top and m == (1 << mbits) - 1:
        return math.nan
    frac = Fraction(m, 1 << mbits) + (1 if e else 0)
    return math.copysign(float(frac * Fraction(2) ** ((e if e else 1) - bias)), -1.0 if s else 1.0)  # keeps -0


def ref_table(fmt) -> torch.Tensor:
    return torch.tensor([layout_value(c, fmt.ebits, fmt.mbits, fmt.bias, fmt.specials)
                         for c in range(1 << fmt.nbits)], dtype=torch.float64)


def ref_encode(v: torch.Tensor, fmt, saturate: bool) -> torch.Tensor:
    """Brute force: nearest finite code by exact float64 distance, ties to the even code."""
    t = ref_table(fmt)
    fin = torch.isfinite(t) & ~torch.signbit(t)           # +0 .. +max
    pos_codes = torch.nonzero(fin).flatten()
    pos = t[pos_codes]
    out = []
    for x in v.double().tolist():
        sign = (1 << (fmt.nbits - 1)) if math.copysign(1, x) < 0 else 0
        if math.isnan(x):
            out.append(sign | ((1 << (fmt.nbits - 1)) - 1))
            continue
        a = abs(x)
        if not saturate and _overflows(a, fmt):
            out.append(sign | ((fmt.max_code + 1) if fmt.specials == "ieee" else (1 << (fmt.nbits - 1)) - 1))
            continue
        d = (pos - min(a, fmt.max)).abs()
        best = torch.nonzero(d == d.min()).flatten()
        c = pos_codes[best[0]] if len(best) == 1 else pos_codes[best][pos_codes[best] % 2 == 0][0]
        out.append(sign | int(c))
    return torch.tensor(out, dtype=torch.uint8).reshape(v.shape)


def _overflows(a: float, fmt) -> bool:
    """Rounds past max: above the midpoint to the next grid step, or on it when max's code is odd
    (the tie then goes to the even neighbour above: E5M2's 1.11 ties up, E4M3's 1.110 ties down)."""
    mid = fmt.max + 2.0 ** (fmt.emax - fmt.mbits) / 2
    return a > mid or (a == mid and fmt.max_code % 2 == 1)


ALL = list(FORMATS.values())


def edge_inputs(fmt) -> torch.Tensor:
    """Every representable value, every midpoint between neighbours (ties), and just off them."""
    t = ref_table(fmt)
    pos = t[torch.isfinite(t) & ~torch.signbit(t)].sort().values
    mids = (pos[1:] + pos[:-1]) / 2
    pts = torch.cat([pos, mids, mids.nextafter(torch.tensor(math.inf, dtype=torch.float64)),
                     mids.nextafter(torch.tensor(0.0, dtype=torch.float64)),
                     torch.tensor([fmt.max * 1.01, fmt.max + 2.0 ** (fmt.emax - fmt.mbits) / 2, fmt.max * 4,
                                   fmt.min_subnormal / 2, fmt.min_subnormal / 4, 1e-30, 3e38])])
    pts = pts.float().double()  # float32 inputs (every point above is a float32 value or rounds to one)
    return torch.cat([pts, -pts])


@pytest.mark.parametrize("fmt", ALL, ids=lambda f: f.name)
def test_table_matches_closed_form_layout(fmt):
    got, ref = values(fmt), ref_table(fmt)
    assert got.dtype == torch.float64 and got.shape == (1 << fmt.nbits,)
    assert torch.equal(torch.isnan(got), torch.isnan(ref))
    ok = ~torch.isnan(ref)
    assert torch.equal(got[ok], ref[ok]) and torch.equal(torch.signbit(got[ok]), torch.signbit(ref[ok]))


def test_format_constants():
    # (max, emax, min normal, min subnormal, NaN-code count) from the OCP FP8 and MX v1.0 specs
    want = {E4M3: (448.0, 8, 2.0 ** -6, 2.0 ** -9, 2), E5M2: (57344.0, 15, 2.0 ** -14, 2.0 ** -16, 6),
            E3M2: (28.0, 4, 0.25, 0.0625, 0), E2M3: (7.5, 2, 1.0, 0.125, 0), E2M1: (6.0, 2, 1.0, 0.5, 0)}
    for fmt, (mx, emax, mn, sub, nans) in want.items():
        assert (fmt.max, fmt.emax, fmt.min_normal, fmt.min_subnormal) == (mx, emax, mn, sub)
        assert int(torch.isnan(values(fmt)).sum()) == nans
    assert int(torch.isinf(values(E5M2)).sum()) == 2 and not torch.isinf(values(E4M3)).any()
    assert sorted(set(values(E2M1)[:8].tolist())) == [0, 0.5, 1, 1.5, 2, 3, 4, 6]


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=lambda f: f.name)
def test_decode_all_256_codes_equal_torch(fmt):
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    got = decode(codes, fmt, dtype=torch.float64)
    ref = codes.view(TORCH[fmt]).to(torch.float64)
    assert torch.equal(torch.isnan(got), torch.isnan(ref))
    ok = ~torch.isnan(ref)
    assert torch.equal(got[ok], ref[ok]) and torch.equal(torch.signbit(got[ok]), torch.signbit(ref[ok]))


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=lambda f: f.name)
def test_encode_equals_torch_cast_on_all_codes_edges_and_random(fmt):
    dt = TORCH[fmt]
    g = torch.Generator().manual_seed(0)
    # every code's value (round trip), ties and near-ties, overflow, subnormals, +-0, inf, NaN
    table = values(fmt)
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, -math.nan], dtype=torch.float64)
    rnd = torch.cat([torch.randn(20000, generator=g) * 10 ** torch.randint(-6, 6, (20000,), generator=g).float(),
                     (torch.rand(5000, generator=g) - 0.5) * 2 * fmt.max * 1.2])
    x = torch.cat([table[~torch.isnan(table)], edge_inputs(fmt), special, rnd.double()]).float()
    got = encode(x, fmt, saturate=TORCH_SATURATES[fmt])
    assert torch.equal(got, x.to(dt).view(torch.uint8))
    # a strided sweep over all 2**32 float32 bit patterns: every exponent, subnormals, NaN payloads
    bits = torch.arange(0, 1 << 32, 4093, dtype=torch.int64)                 # 1.05M patterns
    sweep = (bits - ((bits >> 31) << 32)).to(torch.int32).view(torch.float32)  # as signed int32 bits
    assert torch.equal(encode(sweep, fmt, saturate=TORCH_SATURATES[fmt]), sweep.to(dt).view(torch.uint8))
    # the NaN-free codes round trip exactly
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    finite = ~torch.isnan(decode(codes, fmt))
    assert torch.equal(encode(decode(codes, fmt)[finite], fmt, saturate=False), codes[finite])


# FP6/FP4 have no overflow code, so only saturate=True (saturate=False is an error: test_errors_are_typed)
@pytest.mark.parametrize("fmt,saturate", [(f, s) for f in ALL for s in (True, False) if s or f.specials != "none"],
                         ids=lambda p: p.name if hasattr(p, "name") else f"sat={p}")
def test_encode_equals_brute_force_nearest_even(fmt, saturate):
    x = edge_inputs(fmt)
    if fmt.specials != "none":
        x = torch.cat([x, torch.tensor([math.inf, -math.inf, math.nan], dtype=torch.float64)])
    assert torch.equal(encode(x.float(), fmt, saturate), ref_encode(x, fmt, saturate))


def test_saturation_and_overflow_codes():
    big = torch.tensor([1e6, -1e6, math.inf, -math.inf])
    assert encode(big, E4M3).tolist() == [0x7E, 0xFE, 0x7E, 0xFE]                   # +-448
    assert encode(big, E4M3, saturate=False).tolist() == [0x7F, 0xFF, 0x7F, 0xFF]   # NaN
    assert encode(big, E5M2).tolist() == [0x7B, 0xFB, 0x7B, 0xFB]                   # +-57344
    assert encode(big, E5M2, saturate=False).tolist() == [0x7C, 0xFC, 0x7C, 0xFC]   # +-inf
    # ties at the top: 464 is halfway 448 (1.110, even) and 480 (not a finite E4M3): to 448
    assert encode(torch.tensor([464.0, 464.1]), E4M3, saturate=False).tolist() == [0x7E, 0x7F]
    # E5M2: 61440 is halfway 57344 (odd mantissa 11) and 65536 (even): up, so infinity
    assert encode(torch.tensor([61439.0, 61440.0]), E5M2, saturate=False).tolist() == [0x7B, 0x7C]
    # saturating mode = clamp to +-max, then round (rounding is monotone, max is on the grid)
    x = torch.linspace(-1000, 1000, 4001)
    assert torch.equal(encode(x, E4M3), encode(x.clamp(-448, 448), E4M3, saturate=False))


def test_subnormals_and_ties_to_even():
    s = 2.0 ** -9  # E4M3's smallest subnormal
    x = torch.tensor([0.5 * s, 1.5 * s, 2.5 * s, 0.49 * s, -0.5 * s, 7.5 * s])
    # 0.5 -> 0 (even), 1.5 -> 2, 2.5 -> 2, below half -> 0, -half -> -0, 7.5 -> 8 = min normal
    assert encode(x, E4M3).tolist() == [0, 2, 2, 0, 0x80, 8]
    assert decode(torch.tensor([8], dtype=torch.uint8), E4M3).item() == E4M3.min_normal
    # E2M1 ties: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4, 7 -> 6 (saturated)
    v = decode(encode(torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0]), E2M1), E2M1)
    assert v.tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0]


def test_scale_per_tensor_and_per_channel():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 7, 3, generator=g)
    w[2] = 0.0
    s = fp8_scale(w, E4M3)
    assert s.shape == () and s.item() == pytest.approx(float(w.abs().max()) / 448, rel=1e-7)
    sc = fp8_scale(w, E5M2, axis=0)
    ref = w.double().abs().reshape(5, -1).amax(1) / 57344
    assert sc.shape == (5,) and sc[2].item() == 1.0
    keep = torch.arange(5) != 2
    assert torch.allclose(sc[keep].double(), ref[keep], rtol=1e-7, atol=0)
    assert torch.equal(fp8_scale(w.transpose(0, 2), E5M2, axis=-1), sc)
    # the channel amax lands exactly on +-max
    q = fp8_quantize(w, sc, E5M2, axis=0)
    top = decode(q, E5M2).abs().reshape(5, -1).amax(1)
    assert top[keep].tolist() == [57344.0] * 4 and top[2].item() == 0.0


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=lambda f: f.name)
def test_quantize_dequantize_scaled_equals_torch(fmt):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 33, generator=g) * torch.logspace(-3, 2, 16).unsqueeze(1)
    s = fp8_scale(w, fmt, axis=0)
    q = fp8_quantize(w, s, fmt, axis=0)
    v = w / s.unsqueeze(1)                   # float32 division, as ORT's QuantizeLinear
    if not TORCH_SATURATES[fmt]:
        v = v.clamp(-fmt.max, fmt.max)       # amax / scale may round just past max: saturate
    assert torch.equal(q, v.to(TORCH[fmt]).view(torch.uint8))
    d = fp8_dequantize(q, s, fmt, axis=0)
    assert d.dtype == torch.float32
    assert torch.equal(d, q.view(TORCH[fmt]).float() * s.unsqueeze(1))
    # relative error bound of RNE on normals: half an ulp, 2**-(mbits+1), plus the subnormal floor
    err = (d.double() - w.double()).abs()
    bound = w.double().abs() * 2.0 ** -(fmt.mbits + 1) + s.double().unsqueeze(1) * fmt.min_subnormal / 2
    assert bool((err <= bound * (1 + 1e-6)).all())


def test_fake_quantize_values_and_straight_through_gradient():
    x = torch.tensor([0.3, -1.7, 5.0, -9.0, 0.0], requires_grad=True)
    s = torch.tensor(4.0 / 448)              # range +-4: 5 and -9 saturate
    y = fp8_fake_quantize(x, s)
    assert torch.equal(y.detach(), fp8_dequantize(fp8_quantize(x, s), s))
    assert y.detach()[2:4].tolist() == [pytest.approx(4.0, rel=1e-6), pytest.approx(-4.0, rel=1e-6)]
    (y * torch.arange(1.0, 6.0)).sum().backward()
    assert x.grad.tolist() == [1.0, 2.0, 0.0, 0.0, 5.0]   # identity inside the range, 0 where clipped
    # per channel, and no graph when nothing needs a gradient
    w = torch.randn(3, 4)
    sc = fp8_scale(w, E5M2, axis=1)
    out = fp8_fake_quantize(w, sc, E5M2, axis=1)
    assert not out.requires_grad and torch.equal(out, fp8_dequantize(fp8_quantize(w, sc, E5M2, axis=1), sc,
                                                                     E5M2, axis=1))
    assert fp8_fake_quantize(w.bfloat16(), sc, E5M2, axis=1).dtype == torch.bfloat16   # keeps x's dtype


def test_errors_are_typed():
    with pytest.raises(ValueError, match="unknown float format"):
        get_format("fp8-e4m4")
    with pytest.raises(ValueError, match="no infinity or NaN"):
        encode(torch.ones(2), E2M1, saturate=False)
    with pytest.raises(ValueError, match="NaN"):
        encode(torch.tensor([math.nan]), E2M1)
    with pytest.raises(ValueError, match="uint8"):
        decode(torch.zeros(2, dtype=torch.int32), E4M3)
    with pytest.raises(ValueError, match="does not fit"):
        decode(torch.tensor([16], dtype=torch.uint8), E2M1)
    with pytest.raises(ValueError, match="positive and finite"):
        fp8_quantize(torch.ones(2), torch.tensor(0.0))
    with pytest.raises(ValueError, match="per-channel"):
        fp8_quantize(torch.ones(2, 3), torch.ones(3), axis=0)
    with pytest.raises(ValueError, match="non-finite"):
        fp8_scale(torch.tensor([1.0, math.inf]))
    assert get_format("fp8-e5m2") is E5M2 and get_format(E4M3) is E4M3
