"""Block floating-point formats: OCP Microscaling (MXFP8, MXFP6, MXFP4) and NVIDIA's NVFP4.

Pure tensor functions, no module walking. Blocks run along the **last axis**; move another axis
there first (``x.movedim(axis, -1)``).

**MX** (OCP Microscaling Formats spec v1.0): each block of 32 elements shares one E8M0 scale
``X = 2**(code - 127)`` (code 255 is NaN). Per block (spec section 6.3):

- ``shared_exp = floor(log2(amax)) - emax_elem``, clamped to [-127, 127] (an all-zero block
  gets -127); ``emax_elem`` is the exponent of the element format's largest normal;
- elements ``P_i = round_to_nearest_even(V_i / X)`` in the element format, clamped to its
  largest normal (the block maximum can round past it: E4M3's ``amax / X`` is in [256, 512));
- a block with an inf or NaN gets the NaN scale (every element decodes to NaN), codes 0.

| format | element | emax_elem | element max | block | scale |
|---|---|---|---|---|---|
| ``mxfp8-e4m3`` | E4M3 | 8 | 448 | 32 | E8M0 |
| ``mxfp8-e5m2`` | E5M2 | 15 | 57344 | 32 | E8M0 |
| ``mxfp6-e3m2`` | E3M2 | 4 | 28 | 32 | E8M0 |
| ``mxfp6-e2m3`` | E2M3 | 2 | 7.5 | 32 | E8M0 |
| ``mxfp4`` | E2M1 (0, 0.5, 1, 1.5, 2, 3, 4, 6) | 2 | 6 | 32 | E8M0 |
| ``nvfp4`` | E2M1 | | 6 | 16 | E4M3 block scale and an fp32 tensor scale |

**NVFP4** (as NVIDIA's TensorRT Model Optimizer computes it): tensor scale
``s2 = amax(|x|) / (6 * 448)`` (fp32), block scale ``sb = e4m3(amax_block / (6 * s2))`` (an E4M3
code; an all-zero block gets 1), elements ``e2m1(x / (sb * s2))``; ``x ~= e2m1 * sb * s2``. All
arithmetic in float32. A block whose scale underflows E4M3 to 0 decodes as zeros.

**Odd lengths** (last axis ``n`` not a multiple of the block): the last block holds the
``n % block`` remaining elements and its scale comes from them alone (the same as padding with
zeros, which never raise an amax). Codes keep shape ``(..., n)``; scales are
``(..., ceil(n / block))``.

**Packing**: FP4 codes two per byte along the last axis, element ``2i`` in the low nibble
(the layout of ONNX ``FLOAT4E2M1``, compressed-tensors' NVFP4 and ``MatMulNBits``); an odd
length gets a zero nibble (+0.0) that :func:`unpack_fp4` drops::

    >>> import torch
    >>> from nnsqueeze.ops.mx import mx_quantize, mx_dequantize, pack_fp4, unpack_fp4
    >>> x = torch.tensor([[0.0, 0.26, -1.0, 3.2, 6.0, 100.0]])
    >>> codes, scales = mx_quantize(x, "mxfp4")
    >>> scales.tolist()                       # 2**(floor(log2(100)) - 2) = 2**4: code 127 + 4
    [[131]]
    >>> mx_dequantize(codes, scales, "mxfp4").tolist()
    [[0.0, 0.0, -0.0, 0.0, 8.0, 96.0]]
    >>> torch.equal(unpack_fp4(pack_fp4(codes), 6), codes)
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .fp8 import E2M1, E2M3, E3M2, E4M3, E5M2, FloatFormat, check_codes, decode, encode, value_error, values
from .int4 import pack_int4, unpack_int4

Tensor = torch.Tensor

E8M0_BIAS = 127
E8M0_NAN = 255


@dataclass(frozen=True)
class MXFormat:
    """An OCP MX block format: ``block`` elements of ``elem`` share one E8M0 scale."""

    name: str
    elem: FloatFormat
    block: int = 32


MXFP8_E4M3 = MXFormat("mxfp8-e4m3", E4M3)
MXFP8_E5M2 = MXFormat("mxfp8-e5m2", E5M2)
MXFP6_E3M2 = MXFormat("mxfp6-e3m2", E3M2)
MXFP6_E2M3 = MXFormat("mxfp6-e2m3", E2M3)
MXFP4 = MXFormat("mxfp4", E2M1)
MX_FORMATS = {f.name: f for f in (MXFP8_E4M3, MXFP8_E5M2, MXFP6_E3M2, MXFP6_E2M3, MXFP4)}
NVFP4_BLOCK = 16


def get_mx_format(fmt: str | MXFormat) -> MXFormat:
    """The :class:`MXFormat` named ``fmt`` (``"mxfp8-e4m3"``, ``"mxfp4"``, ...), or ``fmt`` itself."""
    if isinstance(fmt, MXFormat):
        return fmt
    if fmt not in MX_FORMATS:
        raise value_error("format", f"unknown MX format {fmt!r}", fix=f"use one of {sorted(MX_FORMATS)}")
    return MX_FORMATS[fmt]


def _blocks(x: Tensor, block: int) -> Tensor:
    """(..., n) -> (..., ceil(n / block), block), the short last block padded with zeros."""
    if x.dim() == 0:
        raise value_error("block quantization", "a 0-d tensor has no last axis to block",
                        fix="reshape it to (1,)")
    n = x.shape[-1]
    nb = -(-n // block)
    return F.pad(x, (0, nb * block - n)).reshape(*x.shape[:-1], nb, block)


def _unblock(b: Tensor, n: int) -> Tensor:
    """Inverse of :func:`_blocks`: (..., nb, block) -> (..., n)."""
    return b.reshape(*b.shape[:-2], -1)[..., :n]


def _check_scales(codes: Tensor, scales: Tensor, block: int, where: str) -> None:
    nb = -(-codes.shape[-1] // block)
    if scales.dtype != torch.uint8 or tuple(scales.shape) != (*codes.shape[:-1], nb):
        raise value_error(where, f"scales must be uint8 of shape {(*codes.shape[:-1], nb)} for codes of shape "
                        f"{tuple(codes.shape)}, got {scales.dtype} {tuple(scales.shape)}",
                        fix="pass the scales returned with the codes")


def e8m0_decode(scales: Tensor) -> Tensor:
    """float32 ``2**(code - 127)`` of uint8 E8M0 codes; code 255 is NaN (code 0 is 2**-127)."""
    v = torch.ldexp(torch.ones(scales.shape, dtype=torch.float64, device=scales.device), scales.long() - E8M0_BIAS)
    return torch.where(scales == E8M0_NAN, torch.nan, v).to(torch.float32)


def mx_quantize(x: Tensor, fmt: str | MXFormat = MXFP8_E4M3) -> tuple[Tensor, Tensor]:
    """Element codes (uint8 (..., n); FP4/FP6 in the low bits) and E8M0 scales (uint8 (..., ceil(n/32)))."""
    fmt = get_mx_format(fmt)
    n = x.shape[-1] if x.dim() else 0
    xb = _blocks(x.detach().to(torch.float64), fmt.block)          # (..., nb, block), exact widening
    amax = xb.abs().amax(-1)                                        # (..., nb); NaN propagates
    special = ~torch.isfinite(amax)
    # floor(log2(amax)) exactly: amax = f * 2**ex with 0.5 <= f < 1 (frexp), so it is ex - 1.
    _, ex = torch.frexp(torch.where(special, 0.0, amax))
    shared = torch.where(amax > 0, ex - 1 - fmt.elem.emax, -E8M0_BIAS)
    # Beyond 2**127 (only float64 inputs past float32's range) the spec's scale overflows: NaN.
    special |= shared > E8M0_BIAS
    shared = torch.clamp(shared, -E8M0_BIAS, E8M0_BIAS)
    scales = torch.where(special, E8M0_NAN, shared + E8M0_BIAS).to(torch.uint8)
    # V_i / X is exact (a power of two, float64); encode rounds once (RNE) and saturates.
    v = torch.ldexp(xb, -shared.unsqueeze(-1))
    v = torch.where(special.unsqueeze(-1), 0.0, v)
    codes = encode(v, fmt.elem, saturate=True)
    return _unblock(codes, n), scales


def mx_dequantize(codes: Tensor, scales: Tensor, fmt: str | MXFormat = MXFP8_E4M3,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """Values ``elem(code) * 2**(scale - 127)`` (``dtype``, shape of ``codes``); a NaN scale gives NaN."""
    fmt = get_mx_format(fmt)
    check_codes(codes, fmt.elem, "mx_dequantize")
    _check_scales(codes, scales, fmt.block, "mx_dequantize")
    elem = _blocks(values(fmt.elem).to(codes.device)[codes.long()], fmt.block)   # (..., nb, block) float64
    # exact in float64 (a power of two times a few-bit value), one rounding to dtype
    out = torch.ldexp(elem, scales.long().unsqueeze(-1) - E8M0_BIAS)
    out = torch.where((scales == E8M0_NAN).unsqueeze(-1), torch.nan, out)
    return _unblock(out, codes.shape[-1]).to(dtype)


def mx_fake_quantize(x: Tensor, fmt: str | MXFormat = MXFP8_E4M3) -> Tensor:
    """``mx_dequantize(mx_quantize(x))`` in ``x``'s dtype, with a straight-through gradient.

    d(out)/dx = 1 everywhere: each block's scale follows its own maximum, so saturation only
    rounds the block maximum and never clips a range (unlike a fixed FP8 scale).
    """
    y = mx_dequantize(*mx_quantize(x, fmt), fmt, dtype=x.dtype)
    return y + (x - x.detach()) if x.requires_grad else y


def nvfp4_tensor_scale(amax: Tensor | float) -> Tensor:
    """NVFP4's fp32 per-tensor scale ``amax / (6 * 448)`` (1 for ``amax == 0``), a 0-d tensor."""
    a = torch.as_tensor(amax, dtype=torch.float32)
    if a.dim() != 0 or not bool(torch.isfinite(a)) or float(a) < 0:
        raise value_error("nvfp4_tensor_scale", f"amax must be a finite non-negative number, got {a.tolist()}",
                        fix="pass the calibrated max |x| of the tensor")
    s = a / (E2M1.max * E4M3.max)
    return torch.where(s > 0, s, torch.ones_like(s))


def nvfp4_quantize(x: Tensor, tensor_scale: Tensor | float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """E2M1 codes (uint8 (..., n)), E4M3 block-scale codes (uint8 (..., ceil(n/16))), tensor scale (fp32 0-d).

    ``tensor_scale`` defaults to :func:`nvfp4_tensor_scale` of ``x``'s own amax (weights);
    pass a calibrated one for activations (values beyond it saturate at 6 * 448 * tensor_scale).
    """
    x32 = x.detach().to(torch.float32)
    if not bool(torch.isfinite(x32).all()):
        raise value_error("nvfp4_quantize", "the tensor has inf or NaN, which NVFP4 cannot encode",
                        fix="find where the non-finite values come from before quantizing")
    if tensor_scale is None:
        s2 = nvfp4_tensor_scale(x32.abs().amax() if x32.numel() else 0.0)
    else:
        s2 = torch.as_tensor(tensor_scale, dtype=torch.float32, device=x.device)
        if s2.dim() != 0 or not bool(torch.isfinite(s2)) or float(s2) <= 0:
            raise value_error("nvfp4_quantize", f"tensor_scale must be a positive finite scalar, got {s2.tolist()}",
                            fix="use nvfp4_tensor_scale(amax)")
    xb = _blocks(x32, NVFP4_BLOCK)                                   # (..., nb, 16)
    amax = xb.abs().amax(-1)                                         # (..., nb)
    sb = amax / (E2M1.max * s2)                                      # float32, in ModelOpt's order
    sb = torch.where(amax == 0, torch.ones_like(sb), sb)
    sb_codes = encode(sb, E4M3, saturate=True)
    denom = (decode(sb_codes, E4M3) * s2).unsqueeze(-1)              # (..., nb, 1) float32
    ok = denom > 0                                                    # else the block scale underflowed
    v = torch.where(ok, xb / torch.where(ok, denom, 1.0), 0.0)
    codes = encode(v, E2M1, saturate=True)
    return _unblock(codes, x32.shape[-1]), sb_codes, s2


def nvfp4_dequantize(codes: Tensor, block_scales: Tensor, tensor_scale: Tensor | float,
                     dtype: torch.dtype = torch.float32) -> Tensor:
    """``e2m1(code) * (e4m3(block_scale) * tensor_scale)`` in float32, then ``dtype``."""
    check_codes(codes, E2M1, "nvfp4_dequantize")
    _check_scales(codes, block_scales, NVFP4_BLOCK, "nvfp4_dequantize")
    denom = decode(block_scales, E4M3) * torch.as_tensor(tensor_scale, dtype=torch.float32, device=codes.device)
    out = _blocks(decode(codes, E2M1), NVFP4_BLOCK) * denom.unsqueeze(-1)
    return _unblock(out, codes.shape[-1]).to(dtype)


def nvfp4_fake_quantize(x: Tensor, tensor_scale: Tensor | float | None = None) -> Tensor:
    """``nvfp4_dequantize(nvfp4_quantize(x))`` in ``x``'s dtype, straight-through gradient (as MX)."""
    y = nvfp4_dequantize(*nvfp4_quantize(x, tensor_scale), dtype=x.dtype)
    return y + (x - x.detach()) if x.requires_grad else y


def pack_fp4(codes: Tensor) -> Tensor:
    """uint8 FP4 codes (..., n), each < 16 -> uint8 (..., ceil(n / 2)), element 2i in the low nibble."""
    check_codes(codes, E2M1, "pack_fp4")
    if codes.dim() == 0:
        raise value_error("pack_fp4", "a 0-d tensor has no last axis to pack", fix="reshape it to (1,)")
    return pack_int4(codes)


def unpack_fp4(packed: Tensor, n: int) -> Tensor:
    """Inverse of :func:`pack_fp4`: uint8 (..., ceil(n / 2)) -> FP4 codes (..., n), bit-exact."""
    if packed.dtype != torch.uint8 or packed.dim() == 0 or packed.shape[-1] != (n + 1) // 2:
        raise value_error("unpack_fp4", f"{packed.dtype} of shape {tuple(packed.shape)} cannot hold {n} "
                        "packed FP4 codes", fix="pass pack_fp4's output and the original last-axis length")
    return unpack_int4(packed, n)
