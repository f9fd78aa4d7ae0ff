"""Uniform affine quantization math: qparams from ranges, quantize, dequantize, fake-quantize.

Pure tensor functions, no module walking. The arithmetic is exactly ONNX Runtime's, so a torch
simulation built from these functions agrees with ORT's ``QuantizeLinear``/``DequantizeLinear``
bit for bit:

- quantize:   ``q = clamp(round(x / scale) + zero_point, qmin, qmax)`` (fp32 division, round half
  to even; torch's own ``fake_quantize_*`` ops multiply by ``1/scale`` instead and can differ by one
  step when ``x / scale`` lands on a half);
- dequantize: ``x = (q - zero_point) * scale`` (fp32).

Schemes (``bits`` in 2..8):

- symmetric, signed: ``scale = absmax / (2**(bits-1) - 1)``, ``zero_point = 0``, range
  ``[-2**(bits-1), 2**(bits-1) - 1]`` (int8: -128..127; -128 is never produced from the range);
- asymmetric, unsigned: ``scale = (max - min) / (2**bits - 1)`` over a range always widened to
  include 0 (so 0 is exactly representable, e.g. ReLU outputs and padding), integer ``zero_point``.

Scales and zero points are per-tensor (0-d tensors) or per-channel (1-d, one per slice along
``axis``). A degenerate range (all zeros) gets ``scale = EPS`` rather than NaN::

    >>> import torch
    >>> from nnsqueeze.ops.quant import qparams, quantize, dequantize, fake_quantize, qrange
    >>> x = torch.tensor([[-1.0, 0.0, 2.0], [0.0, 0.0, 0.0]])
    >>> scale, zp = qparams(x.amin(1), x.amax(1), bits=8, symmetric=True)    # per-channel, axis 0
    >>> quantize(x, scale, zp, *qrange(8, signed=True), axis=0)
    tensor([[-64,   0, 127],
            [  0,   0,   0]], dtype=torch.int32)
    >>> torch.equal(fake_quantize(x, scale, zp, -128, 127, axis=0),
    ...             dequantize(quantize(x, scale, zp, -128, 127, axis=0), scale, zp, axis=0))
    True
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor

# Smallest scale handed out: keeps x / scale finite for an all-zero channel (any x there is 0).
EPS = float(torch.finfo(torch.float32).eps)  # 1.19e-07


def code_range(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range of a ``bits``-bit code, unvalidated: ``(-2**(b-1), 2**(b-1)-1)`` or ``(0, 2**b - 1)``."""
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range of a ``bits``-bit code (2..8 bits): see :func:`code_range`."""
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in 2..8, got {bits!r}")
    return code_range(bits, signed)


def qparams(min_val: Tensor, max_val: Tensor, bits: int = 8, symmetric: bool = False) -> tuple[Tensor, Tensor]:
    """Scale (float32) and zero point (int32) covering ``[min_val, max_val]``, same shape as them.

    ``symmetric=True``: signed code, zero point 0, scale ``absmax / (2**(bits-1) - 1)``.
    ``symmetric=False``: unsigned code over ``[min(min_val, 0), max(max_val, 0)]``.
    """
    return range_qparams(min_val, max_val, *qrange(bits, signed=symmetric), symmetric=symmetric)


def range_qparams(min_val: Tensor, max_val: Tensor, qmin: int, qmax: int,
                  symmetric: bool = False) -> tuple[Tensor, Tensor]:
    """:func:`qparams` on an explicit code range ``[qmin, qmax]`` (e.g. 16-bit activations)."""
    min_val = torch.as_tensor(min_val, dtype=torch.float32)
    max_val = torch.as_tensor(max_val, dtype=torch.float32)
    if not (torch.isfinite(min_val).all() and torch.isfinite(max_val).all()):
        raise ValueError("qparams: min/max must be finite")
    # Always include 0: exact zeros (padding, ReLU, pruned weights) must stay exact.
    lo = torch.clamp(min_val, max=0.0)
    hi = torch.clamp(max_val, min=0.0)
    if symmetric:
        scale = torch.clamp(torch.maximum(-lo, hi) / qmax, min=EPS)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    scale = torch.clamp((hi - lo) / (qmax - qmin), min=EPS)
    # zero point: the code of real 0; lo <= 0 <= hi keeps it inside [qmin, qmax] (clamp for rounding).
    zp = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax).to(torch.int32)
    return scale, zp


def bcast(p: Tensor, x: Tensor, axis: int | None) -> Tensor:
    """Reshape a per-channel parameter (C,) to broadcast along ``axis`` of ``x``; 0-d stays 0-d."""
    p = torch.as_tensor(p, device=x.device)
    if axis is None or p.dim() == 0:
        return p
    axis = axis % x.dim()
    if p.numel() != x.shape[axis]:
        raise ValueError(f"per-channel parameter has {p.numel()} values but x.shape[{axis}] = {x.shape[axis]}")
    shape = [1] * x.dim()
    shape[axis] = -1
    return p.reshape(shape)


def quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: int | None = None) -> Tensor:
    """Integer codes (int32 tensor) ``clamp(round(x / scale) + zero_point, qmin, qmax)``."""
    s = bcast(scale, x, axis).to(torch.float32)
    z = bcast(zero_point, x, axis)
    q = torch.round(x.to(torch.float32) / s) + z.to(torch.float32)
    return torch.clamp(q, qmin, qmax).to(torch.int32)


def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor, axis: int | None = None) -> Tensor:
    """Real values ``(q - zero_point) * scale`` (float32)."""
    s = bcast(scale, q, axis).to(torch.float32)
    z = bcast(zero_point, q, axis)
    return (q.to(torch.int32) - z.to(torch.int32)).to(torch.float32) * s


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                  axis: int | None = None) -> Tensor:
    """``dequantize(quantize(x))`` in float32, no gradient path (use :func:`fake_quantize_ste` to train)."""
    s = bcast(scale, x, axis).to(torch.float32)
    z = bcast(zero_point, x, axis).to(torch.float32)
    q = torch.clamp(torch.round(x.to(torch.float32) / s) + z, qmin, qmax)
    return (q - z) * s


def fake_quantize_ste(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                      axis: int | None = None) -> Tensor:
    """:func:`fake_quantize` values with a clipped straight-through gradient.

    d(out)/dx = 1 where ``round(x / scale) + zero_point`` lies in ``[qmin, qmax]``, else 0 (the
    same rule as ``torch.fake_quantize_*``); scale and zero point get no gradient.
    """
    s = bcast(scale, x, axis).to(torch.float32)
    z = bcast(zero_point, x, axis).to(torch.float32)
    with torch.no_grad():
        q = torch.round(x.to(torch.float32) / s) + z
        inside = (q >= qmin) & (q <= qmax)
        y = (torch.clamp(q, qmin, qmax) - z) * s
    if not x.requires_grad:
        return y
    # Value = y exactly (x - x.detach() is exactly 0); gradient = inside.
    return y + (x - x.detach()) * inside


def quantize_bias(bias: Tensor, input_scale: Tensor, weight_scale: Tensor) -> tuple[Tensor, Tensor]:
    """int32 bias codes and their scale ``input_scale * weight_scale`` (as ONNX Runtime's QLinearConv
    and QGemm expect: the bias is added to the int32 accumulator). Returns ``(codes, scale)``."""
    scale = (input_scale.to(torch.float32) * weight_scale.to(torch.float32)).expand_as(bias)
    info = torch.iinfo(torch.int32)
    q = torch.clamp(torch.round(bias.to(torch.float32) / scale), info.min, info.max).to(torch.int32)
    return q, scale


def fake_quantize_bias(bias: Tensor, input_scale: Tensor, weight_scale: Tensor) -> Tensor:
    """The float bias ORT effectively adds: int32 codes times ``input_scale * weight_scale``.
    Straight-through gradient to ``bias``."""
    with torch.no_grad():
        q, scale = quantize_bias(bias, input_scale, weight_scale)
        y = q.to(torch.float32) * scale
    return y + (bias - bias.detach()) if bias.requires_grad else y


def sqnr_db(x: Tensor, x_hat: Tensor, exact: bool = True) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum x^2 / sum (x - x_hat)^2)`` in dB (float64);
    ``inf`` when exact, ``nan`` when ``x`` is all zeros and exact. ``exact=False``: float32 difference
    and pairwise float32 sums (about 1e-7 relative, 1e-6 dB: a report figure; 5x faster)."""
    if exact:
        x64 = x.detach().double().reshape(-1)
        e = x64 - x_hat.detach().double().reshape(-1)
        sig, noise = float(torch.dot(x64, x64)), float(torch.dot(e, e))  # BLAS dot: 2x a float64 sum()
    else:
        x32 = x.detach().float()
        sig, noise = float(x32.pow(2).sum()), float((x32 - x_hat.detach().float()).pow(2).sum())
    if noise == 0.0:
        return math.inf if sig > 0 else math.nan
    return 10.0 * math.log10(sig / noise) if sig > 0 else -math.inf


# ------------------------------------------------------------------------------------------------
# Non-uniform levels (power-of-two / logarithmic, NF4, learned codebooks): value = level * scale
# ------------------------------------------------------------------------------------------------
# The 16 NormalFloat-4 levels of QLoRA (Dettmers et al. 2023): quantiles of N(0, 1) scaled to [-1, 1].
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230328559875, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)


def pow2_levels(bits: int) -> Tensor:
    """Sorted power-of-two levels in [-1, 1] for a ``bits``-bit code: 0 and ``+-2**-k`` for
    ``k = 0 .. 2**(bits-1) - 2`` (``2**bits - 1`` levels; 4 bits: 0, +-1, +-1/2, ... +-1/128)."""
    qrange(bits, signed=True)
    mags = [2.0 ** -k for k in range((1 << (bits - 1)) - 1)]
    return torch.tensor(sorted([-m for m in mags] + [0.0] + mags), dtype=torch.float32)


def nearest_level(x: Tensor, levels: Tensor) -> Tensor:
    """Index (int64) of the nearest of the sorted ``levels`` for every element of ``x`` (ties go to
    the lower level)."""
    mid = (levels[1:] + levels[:-1]) / 2
    return torch.searchsorted(mid.contiguous(), x.contiguous(), right=False)


def fake_quantize_levels(x: Tensor, scale: Tensor, levels: Tensor, axis: int | None = None) -> Tensor:
    """``levels[nearest(x / scale)] * scale`` with a straight-through gradient to ``x``.

    ``levels`` (K,) sorted, normalized so that ``scale`` (per tensor or per slice along ``axis``)
    maps them to real values; usually ``scale = absmax`` and levels span [-1, 1].
    """
    s = bcast(scale, x, axis).to(torch.float32)
    lv = levels.to(device=x.device, dtype=torch.float32)
    with torch.no_grad():
        y = lv[nearest_level(x.to(torch.float32) / s, lv)] * s
    return y + (x - x.detach()) if x.requires_grad else y
