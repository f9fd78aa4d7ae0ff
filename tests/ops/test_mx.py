"""MX (MXFP8/MXFP6/MXFP4) and NVFP4 block formats against independent references.

References built here: shared exponents from Python's ``math.frexp`` per block (the spec's
``floor(log2(amax)) - emax_elem``), FP8 elements from torch's own ``float8_*`` casts, FP6/FP4
elements by brute-force nearest value (ties to the even code) over a closed-form table, NVFP4 in
float32 following NVIDIA's steps with torch's ``float8_e4m3fn`` cast for the block scales.
Tolerance: none; codes and scales are compared bit for bit, values for exact equality.
"""

from __future__ import annotations

import doctest
import math

import pytest
import torch
import torch.nn.functional as F

import nnsqueeze.ops.mx as mx_mod
from nnsqueeze.ops.mx import (MX_FORMATS, MXFP4, MXFP8_E4M3, e8m0_decode, get_mx_format, mx_dequantize,
                              mx_fake_quantize, mx_quantize, nvfp4_dequantize, nvfp4_fake_quantize,
                              nvfp4_quantize, nvfp4_tensor_scale, pack_fp4, unpack_fp4)

# (ebits, mbits, bias) -> closed-form positive finite values, ascending (code = index)
LAYOUT = {"mxfp8-e4m3": (4, 3, 7, 448.0, 8), "mxfp8-e5m2": (5, 2, 15, 57344.0, 15),
          "mxfp6-e3m2": (3, 2, 3, 28.0, 4), "mxfp6-e2m3": (2, 3, 1, 7.5, 2), "mxfp4": (2, 1, 1, 6.0, 2)}
TORCH_ELEM = {"mxfp8-e4m3": torch.float8_e4m3fn, "mxfp8-e5m2": torch.float8_e5m2}


def positive_grid(ebits: int, mbits: int, bias: int, max_val: float) -> torch.Tensor:
    vals = []
    for e in range(1 << ebits):
        for m in range(1 << mbits):
            v = (m / (1 << mbits) + (1 if e else 0)) * 2.0 ** ((e if e else 1) - bias)
            if v <= max_val:
                vals.append(v)
    return torch.tensor(vals, dtype=torch.float64)


def nearest_even(v: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Sign-magnitude codes of the nearest grid value to each v (saturating), ties to the even code."""
    a = v.abs().clamp(max=float(grid[-1])).unsqueeze(-1)
    d = (a - grid).abs()
    tie = d == d.amin(-1, keepdim=True)
    even = torch.arange(len(grid)) % 2 == 0
    mag = (tie * (1 + even.to(torch.int64))).argmax(-1)   # the even one among two equidistant
    nbits = (len(grid) - 1).bit_length()   # magnitude bits: 8 values -> 3 (FP4), 32 -> 5 (FP6)
    sign = torch.signbit(v).to(torch.int64) << nbits
    return (mag | sign).to(torch.uint8)


def unpad(blocks: torch.Tensor, shape) -> torch.Tensor:
    """(..., nb, block) or (rows, nb, block) -> the original (..., n)."""
    return blocks.reshape(*shape[:-1], -1)[..., :shape[-1]]


def ref_mx(x: torch.Tensor, name: str):
    """Spec section 6.3, block by block in float64."""
    ebits, mbits, bias, max_val, emax = LAYOUT[name]
    grid = positive_grid(ebits, mbits, bias, max_val)
    n = x.shape[-1]
    nb = -(-n // 32)
    xb = F.pad(x.double(), (0, nb * 32 - n)).reshape(-1, nb, 32)
    codes = torch.zeros(xb.shape, dtype=torch.uint8)
    scales = torch.zeros(xb.shape[:-1], dtype=torch.uint8)
    values = torch.zeros(xb.shape, dtype=torch.float64)
    for r in range(xb.shape[0]):
        for b in range(nb):
            blk = xb[r, b]
            amax = float(blk.abs().max())
            if not math.isfinite(amax):
                scales[r, b], values[r, b] = 255, math.nan
                continue
            shared = max(math.frexp(amax)[1] - 1 - emax, -127) if amax > 0 else -127
            scales[r, b] = shared + 127
            v = blk * 2.0 ** -shared
            if name in TORCH_ELEM:
                c = v.float().clamp(-max_val, max_val).to(TORCH_ELEM[name]).view(torch.uint8)
            else:
                c = nearest_even(v, grid)
            codes[r, b] = c
            mag = grid[(c.long() & ((1 << (ebits + mbits)) - 1))]
            values[r, b] = torch.where(c >= 1 << (ebits + mbits), -mag, mag) * 2.0 ** shared
    return unpad(codes, x.shape), scales.reshape(*x.shape[:-1], nb), unpad(values, x.shape).float()


def mixed_data(shape, seed: int) -> torch.Tensor:
    """Blocks of very different magnitudes, exact zeros, float32 subnormals and huge values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 10.0 ** torch.randint(-8, 8, shape, generator=g).float()
    flat = x.view(-1)
    if flat.numel() > 40:
        flat[:32] = 0.0                                    # an all-zero block (first row)
        flat[33:36] = torch.tensor([1e-40, -3e-42, 1e-45])   # float32 subnormals
        flat[36] = 3e38                                    # near float32's max
    return x


@pytest.mark.parametrize("name", sorted(MX_FORMATS))
@pytest.mark.parametrize("shape", [(3, 64), (2, 3, 45), (7,), (4, 33)])
def test_mx_quantize_equals_spec_reference(name, shape):
    x = mixed_data(shape, seed=len(shape) * 100 + shape[-1])
    codes, scales = mx_quantize(x, name)
    rc, rs, rv = ref_mx(x, name)
    assert codes.shape == x.shape and scales.shape == (*shape[:-1], -(-shape[-1] // 32))
    assert torch.equal(scales, rs)
    assert torch.equal(codes, rc)
    assert torch.equal(mx_dequantize(codes, scales, name), rv)


def test_scale_rule_and_element_saturation():
    # amax in [2**k, 2**(k+1)) -> X = 2**(k - emax_elem): E4M3 emax 8, E2M1 emax 2
    for amax, k in [(1.0, 0), (1.99, 0), (2.0, 1), (511.0, 8), (0.75, -1), (2.0 ** -100, -100)]:
        x = torch.tensor([amax, 0.0])
        assert mx_quantize(x, "mxfp8-e4m3")[1].item() == 127 + k - 8
        assert mx_quantize(x, "mxfp4")[1].item() == 127 + k - 2
    # 511 / 2**0 = 511 rounds past E4M3's 448: clamped; 7.9 -> X = 1 in MXFP4, 7.9 -> 6
    c, s = mx_quantize(torch.tensor([511.0, -511.0]), "mxfp8-e4m3")
    assert mx_dequantize(c, s, "mxfp8-e4m3").tolist() == [448.0, -448.0]
    c, s = mx_quantize(torch.tensor([7.9, 0.3, 0.25, 0.76]), "mxfp4")
    assert mx_dequantize(c, s, "mxfp4").tolist() == [6.0, 0.5, 0.0, 1.0]   # 0.25 ties to 0 (even)
    # all zero: the smallest scale (code 0 = 2**-127); tiny amax clamps there too
    assert mx_quantize(torch.zeros(5), "mxfp4")[1].item() == 0
    assert mx_quantize(torch.tensor([1e-45]), "mxfp8-e4m3")[1].item() == 0
    assert e8m0_decode(torch.tensor([0], dtype=torch.uint8)).item() == 2.0 ** -127


def test_mxfp4_element_values():
    x = torch.randn(8, 96, generator=torch.Generator().manual_seed(3))
    codes, scales = mx_quantize(x, MXFP4)
    assert int(codes.max()) <= 15
    per_elem = mx_dequantize(codes, scales, MXFP4).double() / e8m0_decode(scales).double().repeat_interleave(32, -1)
    assert set(per_elem.abs().unique().tolist()) <= {0, 0.5, 1, 1.5, 2, 3, 4, 6}


def test_nan_and_inf_blocks_get_the_nan_scale():
    x = torch.ones(3, 64)
    x[0, 5], x[1, 40], x[2, 0] = math.nan, math.inf, -math.inf
    for name in MX_FORMATS:
        codes, scales = mx_quantize(x, name)
        assert scales.tolist() == [[255, 127 - LAYOUT[name][4]], [127 - LAYOUT[name][4], 255],
                                   [255, 127 - LAYOUT[name][4]]]
        d = mx_dequantize(codes, scales, name)
        assert torch.isnan(d[0, :32]).all() and torch.isnan(d[1, 32:]).all()
        assert torch.equal(d[0, 32:], torch.ones(32)) and torch.equal(d[1, :32], torch.ones(32))


def test_e8m0_decode_all_codes():
    got = e8m0_decode(torch.arange(256, dtype=torch.int32).to(torch.uint8)).double()
    assert math.isnan(got[255])
    assert got[:255].tolist() == [math.ldexp(1.0, c - 127) for c in range(255)]


def test_padding_rule_odd_last_axis():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 45, generator=g)
    x[:, 32:] *= 1e-3                                  # the short block is much smaller than the first
    for name in MX_FORMATS:
        c, s = mx_quantize(x, name)
        cp, sp = mx_quantize(F.pad(x, (0, 19)), name)  # explicit zero padding to 64
        assert torch.equal(c, cp[:, :45]) and torch.equal(s, sp) and not cp[:, 45:].any()
        # the short block's scale comes from its 13 elements alone
        _, s_tail = mx_quantize(x[:, 32:].contiguous(), name)
        assert torch.equal(s[:, 1], s_tail[:, 0])


def test_mx_fake_quantize_straight_through():
    x = torch.randn(4, 40, generator=torch.Generator().manual_seed(5), requires_grad=True)
    y = mx_fake_quantize(x, "mxfp8-e5m2")
    assert torch.equal(y.detach(), mx_dequantize(*mx_quantize(x, "mxfp8-e5m2"), "mxfp8-e5m2"))
    w = torch.randn(4, 40, generator=torch.Generator().manual_seed(6))
    (y * w).sum().backward()
    assert torch.equal(x.grad, w)
    xb = x.detach().to(torch.bfloat16)
    assert mx_fake_quantize(xb, MXFP4).dtype == torch.bfloat16 and not mx_fake_quantize(xb, MXFP4).requires_grad


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (2, 3, 33), (4, 64), (2, 0)])
def test_pack_unpack_fp4_round_trip_bit_exact(shape):
    q = torch.randint(0, 16, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
    p = pack_fp4(q)
    assert p.shape == (*shape[:-1], (shape[-1] + 1) // 2)
    assert torch.equal(unpack_fp4(p, shape[-1]), q)
    # layout: element 2i in the low nibble, an odd tail padded with +0.0's code
    flat = q.reshape(math.prod(shape[:-1]), shape[-1]).tolist()
    ref = [[row[i] | ((row[i + 1] if i + 1 < len(row) else 0) << 4) for i in range(0, len(row), 2)] for row in flat]
    assert p.reshape(len(flat), -1).tolist() == ref


def test_pack_mxfp4_codes_and_back():
    x = torch.randn(3, 37, generator=torch.Generator().manual_seed(8))
    c, s = mx_quantize(x, "mxfp4")
    assert torch.equal(mx_dequantize(unpack_fp4(pack_fp4(c), 37), s, "mxfp4"), mx_dequantize(c, s, "mxfp4"))


def ref_nvfp4(x: torch.Tensor, s2: torch.Tensor):
    """NVIDIA's steps in float32: torch's e4m3fn cast for the block scales, brute-force E2M1."""
    grid = positive_grid(2, 1, 1, 6.0)
    n = x.shape[-1]
    nb = -(-n // 16)
    xb = F.pad(x.float(), (0, nb * 16 - n)).reshape(*x.shape[:-1], nb, 16)
    amax = xb.abs().amax(-1)
    sb = amax / (6.0 * s2)
    sb[amax == 0] = 1.0
    sb8 = sb.to(torch.float8_e4m3fn)
    denom = (sb8.float() * s2).unsqueeze(-1)
    v = xb / denom
    v[(denom == 0).expand_as(v)] = 0.0
    codes = nearest_even(v.double(), grid)
    mag = grid[codes.long() & 7].float()
    vals = torch.where(codes >= 8, -mag, mag) * denom
    return unpad(codes, x.shape), sb8.view(torch.uint8), unpad(vals, x.shape)


@pytest.mark.parametrize("shape", [(4, 64), (3, 50), (17,), (2, 2, 31)])
def test_nvfp4_equals_reference(shape):
    g = torch.Generator().manual_seed(shape[-1])
    x = torch.randn(shape, generator=g) * 10.0 ** torch.randint(-3, 3, shape, generator=g).float()
    x.view(-1)[:16] = 0.0                         # an all-zero block: block scale 1
    codes, sb, s2 = nvfp4_quantize(x)
    assert s2.dtype == torch.float32 and s2.item() == (x.abs().max() / 2688.0).item()
    rc, rsb, rv = ref_nvfp4(x, s2)
    assert torch.equal(codes, rc) and torch.equal(sb, rsb)
    assert torch.equal(nvfp4_dequantize(codes, sb, s2), rv)
    assert sb.shape == (*shape[:-1], -(-shape[-1] // 16)) and int(codes.max()) <= 15


def test_nvfp4_calibrated_scale_saturation_and_underflow():
    s2 = nvfp4_tensor_scale(1.0)                        # covers |x| <= 1
    assert s2.item() == pytest.approx(1 / 2688, rel=1e-7) and nvfp4_tensor_scale(0.0).item() == 1.0
    x = torch.tensor([[5.0, -0.5] + [0.0] * 14, [1e-9] * 16])
    codes, sb, s = nvfp4_quantize(x, s2)
    d = nvfp4_dequantize(codes, sb, s)
    # block 0: amax 5 needs block scale 5/6/s2 = 2240 > 448: saturates, so 5 -> 6 * 448 * s2 = 1
    assert sb[0, 0].item() == 0x7E and d[0, 0].item() == pytest.approx(1.0, rel=1e-6)
    # block 1: 1e-9 / 6 / s2 underflows E4M3 (< 2**-10): block scale 0, values 0
    assert sb[1, 0].item() == 0 and not d[1].any()
    rc, rsb, rv = ref_nvfp4(x, s2)
    assert torch.equal(codes, rc) and torch.equal(sb, rsb) and torch.equal(d, rv)


def test_nvfp4_fake_quantize_straight_through():
    x = torch.randn(2, 48, generator=torch.Generator().manual_seed(9), requires_grad=True)
    y = nvfp4_fake_quantize(x)
    assert torch.equal(y.detach(), nvfp4_dequantize(*nvfp4_quantize(x)))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_errors_are_typed():
    with pytest.raises(ValueError, match="unknown MX format"):
        get_mx_format("mxfp3")
    c, s = mx_quantize(torch.ones(2, 40), MXFP8_E4M3)
    with pytest.raises(ValueError, match="scales must be uint8 of shape"):
        mx_dequantize(c, s[:, :1], MXFP8_E4M3)
    with pytest.raises(ValueError, match="does not fit"):
        mx_dequantize(torch.full((2, 40), 16, dtype=torch.uint8), s, MXFP4)
    with pytest.raises(ValueError, match="0-d"):
        mx_quantize(torch.tensor(1.0))
    with pytest.raises(ValueError, match="inf or NaN"):
        nvfp4_quantize(torch.tensor([1.0, math.nan]))
    with pytest.raises(ValueError, match="tensor_scale"):
        nvfp4_quantize(torch.ones(4), tensor_scale=0.0)
    with pytest.raises(ValueError, match="amax"):
        nvfp4_tensor_scale(-1.0)
    with pytest.raises(ValueError, match="does not fit"):
        pack_fp4(torch.tensor([16], dtype=torch.uint8))
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_fp4(torch.zeros(3, dtype=torch.uint8), 8)


def test_docstring_examples_run():
    import nnsqueeze.ops.fp8 as fp8_mod
    for mod in (fp8_mod, mx_mod):
        res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
        assert res.attempted > 0 and res.failed == 0
