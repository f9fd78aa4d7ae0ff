"""Minifloat formats (FP8 E4M3/E5M2, and the FP6/FP4 elements of MX): encode, decode, fake-quantize.

Pure tensor functions, no module walking. A format is sign, ``ebits`` exponent bits (bias
``bias``) and ``mbits`` mantissa bits; a code is the format's bit pattern in a ``uint8``::

    normal    (exponent field e > 0):  (-1)**s * (1 + m / 2**mbits) * 2**(e - bias)
    subnormal (exponent field e = 0):  (-1)**s * (m / 2**mbits) * 2**(1 - bias)

| format | name | bits | bias | max finite | min normal | min subnormal | inf | NaN codes |
|---|---|---|---|---|---|---|---|---|
| E4M3 (OCP "fn") | ``fp8-e4m3`` | 1.4.3 | 7 | 448 | 2**-6 | 2**-9 | none | S.1111.111 |
| E5M2 (IEEE-like) | ``fp8-e5m2`` | 1.5.2 | 15 | 57344 | 2**-14 | 2**-16 | S.11111.00 | S.11111.{01,10,11} |
| E3M2 (MX FP6) | ``fp6-e3m2`` | 1.3.2 | 3 | 28 | 2**-2 | 2**-4 | none | none |
| E2M3 (MX FP6) | ``fp6-e2m3`` | 1.2.3 | 1 | 7.5 | 1 | 2**-3 | none | none |
| E2M1 (MX FP4) | ``fp4-e2m1`` | 1.2.1 | 1 | 6 | 1 | 0.5 | none | none |

Encoding rounds to nearest, ties to even (one rounding of the exact input value: the float32
value is widened to float64, which is exact, and rounded once on the format's grid). Values beyond
the largest finite one saturate to it (``saturate=True``, the OCP default and what ONNX
``QuantizeLinear(saturate=1)`` does); with ``saturate=False`` they become infinity (E5M2) or NaN
(E4M3, which has no infinity). NaN encodes as ``S.111..1`` (sign kept), as torch does. This is
bit for bit torch's own ``.to(torch.float8_e4m3fn)`` (which saturates) and
``.to(torch.float8_e5m2)`` (which does not), for every float32 input.

Scaled FP8 quantization (``x ~= decode(code) * scale``) uses ``scale = amax / max_finite`` per
tensor or per channel; the division ``x / scale`` is in float32, as ONNX Runtime does it::

    >>> import torch
    >>> from nnsqueeze.ops.fp8 import E4M3, encode, decode, fp8_scale, fp8_quantize, fp8_dequantize
    >>> encode(torch.tensor([1.0, -0.3, 500.0, 1e-3]), E4M3).tolist()   # 500 saturates to 448
    [56, 170, 126, 1]
    >>> decode(torch.tensor([56, 170, 126, 1], dtype=torch.uint8), E4M3).tolist()
    [1.0, -0.3125, 448.0, 0.001953125]
    >>> w = torch.tensor([[0.5, -2.0], [0.01, 0.02]])
    >>> s = fp8_scale(w, E4M3, axis=0)            # per output channel: amax / 448
    >>> fp8_dequantize(fp8_quantize(w, s, E4M3, axis=0), s, E4M3, axis=0)[0].tolist()
    [0.5, -2.0]

Dynamic activations take the scale from the tensor being quantized, at run time (per tensor, or
per token: one scale per slice along the last axis)::

    >>> from nnsqueeze.ops.fp8 import fp8_dynamic_scale, fp8_dynamic_fake_quantize
    >>> x = torch.tensor([[1.0, -4.0], [0.25, 0.1]])
    >>> torch.equal(fp8_dynamic_scale(x, E4M3, per_token=True), torch.tensor([[4.0], [0.25]]) / 448)
    True
    >>> fp8_dynamic_fake_quantize(x, E4M3, per_token=True)[0].tolist()
    [1.0, -4.0]
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


Tensor = torch.Tensor

_SPECIALS = ("fn", "ieee", "none")



def value_error(where: str, problem: str, fix: str = "") -> ValueError:
    """The ops layer imports nothing of nnsqueeze, so bad input is a plain ValueError whose message
    keeps nnsqueeze's where / problem / fix shape; the steps that call these wrap it in their own types."""
    return ValueError(f"{where}: {problem}" + (f"; fix: {fix}" if fix else ""))

@dataclass(frozen=True)
class FloatFormat:
    """A sign + ``ebits`` + ``mbits`` minifloat with exponent ``bias``.

    ``specials``: ``"ieee"`` (top exponent field: mantissa 0 is infinity, others NaN), ``"fn"``
    (finite-only but one NaN per sign, all ones: OCP E4M3) or ``"none"`` (every code finite:
    the MX FP6/FP4 elements).
    """

    name: str
    ebits: int
    mbits: int
    bias: int
    specials: str

    def __post_init__(self):
        if self.specials not in _SPECIALS or not (1 <= self.ebits and 0 <= self.mbits and self.nbits <= 8):
            raise value_error(f"format {self.name!r}", f"unsupported layout 1.{self.ebits}.{self.mbits} "
                              f"with specials {self.specials!r}",
                              fix=f"use at most 8 bits and specials in {_SPECIALS}")

    @property
    def nbits(self) -> int:
        return 1 + self.ebits + self.mbits

    @property
    def max_code(self) -> int:
        """Magnitude code (sign bit clear) of the largest finite value."""
        top = (1 << (self.ebits + self.mbits)) - 1             # all ones
        return {"none": top, "fn": top - 1, "ieee": top - (1 << self.mbits)}[self.specials]

    @property
    def max(self) -> float:
        return float(_table(self)[self.max_code])

    @property
    def emax(self) -> int:
        """Exponent of the largest normal (``floor(log2(max))``): 8 for E4M3, 2 for E2M1."""
        return (self.max_code >> self.mbits) - self.bias

    @property
    def min_normal(self) -> float:
        return 2.0 ** (1 - self.bias)

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (1 - self.bias - self.mbits)


E4M3 = FloatFormat("fp8-e4m3", 4, 3, 7, "fn")
E5M2 = FloatFormat("fp8-e5m2", 5, 2, 15, "ieee")
E3M2 = FloatFormat("fp6-e3m2", 3, 2, 3, "none")
E2M3 = FloatFormat("fp6-e2m3", 2, 3, 1, "none")
E2M1 = FloatFormat("fp4-e2m1", 2, 1, 1, "none")
FORMATS = {f.name: f for f in (E4M3, E5M2, E3M2, E2M3, E2M1)}


def get_format(fmt: str | FloatFormat) -> FloatFormat:
    """The :class:`FloatFormat` named ``fmt`` (``"fp8-e4m3"``, ``"fp8-e5m2"``, ...), or ``fmt`` itself."""
    if isinstance(fmt, FloatFormat):
        return fmt
    if fmt not in FORMATS:
        raise value_error("format", f"unknown float format {fmt!r}", fix=f"use one of {sorted(FORMATS)}")
    return FORMATS[fmt]


@functools.cache
def _table(fmt: FloatFormat) -> Tensor:
    """float64 value of every code 0 .. 2**nbits - 1, from the bit layout (shared; do not modify)."""
    codes = torch.arange(1 << fmt.nbits, dtype=torch.int64)
    sign = torch.where((codes >> (fmt.nbits - 1)) == 1, -1.0, 1.0).double()
    e = (codes >> fmt.mbits) & ((1 << fmt.ebits) - 1)
    m = (codes & ((1 << fmt.mbits) - 1)).double()
    frac = torch.where(e > 0, 1.0 + m / (1 << fmt.mbits), m / (1 << fmt.mbits))
    val = sign * torch.ldexp(frac, torch.clamp(e, min=1) - fmt.bias)
    top_e = e == (1 << fmt.ebits) - 1
    if fmt.specials == "ieee":
        val = torch.where(top_e & (m == 0), sign * torch.inf, val)
        val = torch.where(top_e & (m != 0), torch.nan, val)
    elif fmt.specials == "fn":
        mag = codes & ((1 << (fmt.nbits - 1)) - 1)
        val = torch.where(mag == (1 << (fmt.nbits - 1)) - 1, torch.nan, val)
    return val


def values(fmt: str | FloatFormat) -> Tensor:
    """float64 tensor (2**nbits,): the value of each code (NaN and +-inf where the format has them)."""
    return _table(get_format(fmt)).clone()


def encode(v: Tensor, fmt: str | FloatFormat, saturate: bool = True) -> Tensor:
    """Codes (uint8, same shape) of the values ``v`` (already scaled), rounded to nearest even.

    Beyond the largest finite value: that value (``saturate=True``), else infinity (E5M2) or NaN
    (E4M3). Formats without infinity and NaN (FP6, FP4) need ``saturate=True`` and NaN-free input.
    """
    fmt = get_format(fmt)
    v64 = v.detach().to(torch.float64)       # exact for float32/16/bf16 inputs: one rounding below
    nan = torch.isnan(v64)
    if fmt.specials == "none":
        if not saturate:
            raise value_error(f"encode({fmt.name})", "the format has no infinity or NaN to overflow to",
                            fix="use saturate=True")
        if bool(nan.any()):
            raise value_error(f"encode({fmt.name})", "input contains NaN, which the format cannot encode",
                            fix="remove NaNs first (MX blocks carry them in the scale)")
    a = torch.where(torch.isfinite(v64), v64.abs(), 0.0)
    # Binade of a: a = f * 2**ex with 0.5 <= f < 1, so floor(log2(a)) = ex - 1, exactly (no log2
    # rounding). Below the smallest normal, the subnormal grid keeps the min-normal exponent.
    _, ex = torch.frexp(a)
    quantum = torch.ldexp(torch.ones_like(a), torch.clamp(ex - 1, min=1 - fmt.bias) - fmt.mbits)
    # a / quantum is exact (power of two) and torch.round is half-to-even: this is the RNE step.
    # y may land one binade up (e.g. 15.5 -> 16 in E4M3's 8..16 binade), still exactly on the grid.
    y = torch.round(a / quantum) * quantum
    pos = _table(fmt).to(v64.device)[: fmt.max_code + 1]   # the non-negative finite values, ascending
    mag = torch.searchsorted(pos, torch.clamp(y, max=fmt.max))   # exact hit: y is on the grid
    over = (y > fmt.max) | torch.isinf(v64)
    if saturate:
        overflow_code = fmt.max_code
    else:
        overflow_code = (fmt.max_code + 1) if fmt.specials == "ieee" else (1 << (fmt.nbits - 1)) - 1
    mag = torch.where(over, overflow_code, mag)
    mag = torch.where(nan, (1 << (fmt.nbits - 1)) - 1, mag)   # all-ones magnitude: NaN in E4M3 and E5M2
    sign = torch.signbit(v64).to(torch.int64) << (fmt.nbits - 1)
    return (mag | sign).to(torch.uint8)


def decode(codes: Tensor, fmt: str | FloatFormat, dtype: torch.dtype = torch.float32) -> Tensor:
    """Values (``dtype``, same shape) of uint8 ``codes`` of ``fmt``: exact in float32 for all formats here."""
    fmt = get_format(fmt)
    check_codes(codes, fmt, "decode")
    return _table(fmt).to(codes.device)[codes.long()].to(dtype)


def check_codes(codes: Tensor, fmt: FloatFormat, where: str) -> None:
    """Raise ValueError unless ``codes`` are uint8 codes that fit ``fmt``'s bits."""
    if codes.dtype != torch.uint8:
        raise value_error(where, f"codes must be uint8, got {codes.dtype}", fix="pass the output of encode")
    if fmt.nbits < 8 and codes.numel() and int(codes.max()) >= 1 << fmt.nbits:
        raise value_error(where, f"code {int(codes.max())} does not fit {fmt.name}'s {fmt.nbits} bits",
                        fix="unpack packed codes first (unpack_fp4)")


def _bcast(scale: Tensor, x: Tensor, axis: int | None, where: str) -> Tensor:
    """A per-tensor (0-d) or per-channel ``(C,)`` float32 scale, checked, shaped to broadcast on ``x``."""
    s = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
        raise value_error(where, "scale must be positive and finite", fix="compute it with fp8_scale")
    if s.dim() == 0 or s.numel() == 1 and axis is None:
        return s.reshape(())
    if axis is None or s.dim() != 1 or s.numel() != x.shape[axis]:
        raise value_error(where, f"a per-channel scale of shape {tuple(s.shape)} does not match axis {axis} "
                        f"of a tensor of shape {tuple(x.shape)}", fix="pass axis= and one scale per slice")
    shape = [1] * x.dim()
    shape[axis] = -1
    return s.reshape(shape)


def fp8_scale(x: Tensor, fmt: str | FloatFormat = E4M3, axis: int | None = None) -> Tensor:
    """float32 scale ``amax / max_finite``: 0-d (``axis=None``) or ``(x.shape[axis],)`` per channel.

    So the largest magnitude maps to the format's largest finite value. An all-zero slice gets
    scale 1 (any scale is exact there); a tiny amax is floored at float32's smallest normal so
    the scale stays positive.
    """
    fmt = get_format(fmt)
    a = x.detach().abs().to(torch.float32)
    if axis is None:
        amax = a.amax() if a.numel() else torch.zeros(())
    else:
        axis = axis % x.dim()
        amax = a.movedim(axis, 0).reshape(x.shape[axis], -1).amax(1)
    if not bool(torch.isfinite(amax).all()):
        raise value_error("fp8_scale", "the tensor has non-finite values, so no finite scale covers it",
                        fix="find where the inf/NaN comes from before quantizing")
    scale = torch.clamp(amax / fmt.max, min=torch.finfo(torch.float32).tiny)
    return torch.where(amax == 0, torch.ones_like(scale), scale)


def fp8_quantize(x: Tensor, scale: Tensor, fmt: str | FloatFormat = E4M3, axis: int | None = None,
                 saturate: bool = True) -> Tensor:
    """uint8 codes of ``x / scale`` (float32 division, then :func:`encode`), same shape as ``x``."""
    s = _bcast(scale, x, axis, "fp8_quantize")
    return encode(x.detach().to(torch.float32) / s, fmt, saturate)


def fp8_dequantize(codes: Tensor, scale: Tensor, fmt: str | FloatFormat = E4M3,
                   axis: int | None = None) -> Tensor:
    """float32 ``decode(codes) * scale`` (ONNX ``DequantizeLinear``'s arithmetic)."""
    return decode(codes, fmt) * _bcast(scale, codes, axis, "fp8_dequantize")


def fp8_fake_quantize(x: Tensor, scale: Tensor, fmt: str | FloatFormat = E4M3, axis: int | None = None,
                      saturate: bool = True) -> Tensor:
    """``fp8_dequantize(fp8_quantize(x))`` in ``x``'s dtype, with a clipped straight-through gradient.

    d(out)/dx = 1 where ``|x / scale| <= max_finite`` and 0 where the value saturates (the rule
    of :func:`nnsqueeze.ops.quant.fake_quantize_ste`); the scale gets no gradient.
    """
    fmt = get_format(fmt)
    s = _bcast(scale, x, axis, "fp8_fake_quantize")
    with torch.no_grad():
        v = x.to(torch.float32) / s
        y = (decode(encode(v, fmt, saturate), fmt) * s).to(x.dtype)
    if not x.requires_grad:
        return y
    inside = v.abs() <= fmt.max
    # Value is y exactly (x - x.detach() is 0); gradient is `inside`.
    return y + (x - x.detach()) * inside


def fp8_dynamic_scale(x: Tensor, fmt: str | FloatFormat = E4M3, per_token: bool = False) -> Tensor:
    """The run-time scale of dynamic FP8: ``max(amax / max_finite, tiny)`` in float32, ``tiny`` float32's
    smallest normal (an all-zero tensor or token quantizes to zeros with it).

    ``amax`` is over the whole tensor (a 0-d scale) or, ``per_token``, over the last axis (shape
    ``(..., 1)``: one scale per row of a Linear's input). These are the ONNX graph's own operations,
    ``Max(Div(ReduceMax(Abs(x)), max_finite), tiny)``, so ONNX Runtime computes the same float32 scale.
    A non-finite input gives a non-finite scale (and NaN outputs), as in ONNX Runtime.
    """
    fmt = get_format(fmt)
    a = x.detach().abs().to(torch.float32)
    if per_token:
        if x.dim() == 0 or x.shape[-1] == 0:
            raise value_error("fp8_dynamic_scale", f"per-token scales need a last axis of length >= 1, got "
                              f"shape {tuple(x.shape)}", fix="use per_token=False")
        amax = a.amax(dim=-1, keepdim=True)
    else:
        amax = a.amax() if a.numel() else torch.zeros((), device=x.device)
    return torch.clamp(amax / fmt.max, min=torch.finfo(torch.float32).tiny)


def fp8_dynamic_fake_quantize(x: Tensor, fmt: str | FloatFormat = E4M3, per_token: bool = False) -> Tensor:
    """``x`` quantized to FP8 with its own :func:`fp8_dynamic_scale` and dequantized (float32 ``x / s``,
    round to nearest even, saturating; ``decode * s``), in ``x``'s dtype. The scale follows the
    tensor's maximum, so nothing clips: the gradient passes straight through (1 everywhere)."""
    fmt = get_format(fmt)
    s = fp8_dynamic_scale(x, fmt, per_token)
    with torch.no_grad():
        y = (decode(encode(x.to(torch.float32) / s, fmt), fmt) * s).to(x.dtype)
    return y if not x.requires_grad else y + (x - x.detach())
