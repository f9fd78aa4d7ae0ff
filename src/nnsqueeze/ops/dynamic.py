"""Run-time (dynamic) activation quantization math, exactly ONNX's ``DynamicQuantizeLinear``.

Pure tensor functions. For a float tensor ``x`` (whole tensor, per-tensor parameters):

- range widened to include 0: ``lo = min(0, min x)``, ``hi = max(0, max x)``;
- ``scale = (hi - lo) / 255`` (1.0 when ``hi == lo``, as ONNX Runtime does);
- ``zero_point = clamp(round(-lo / scale), 0, 255)`` (round half to even);
- ``q = clamp(round(x / scale) + zero_point, 0, 255)`` as uint8.

:func:`int_linear` is what ``MatMulInteger`` / ``DynamicQuantizeMatMul`` then compute: the exact
int32 product of the codes, cast to float and scaled by ``x_scale * w_scale[n]``::

    >>> import torch
    >>> from nnsqueeze.ops.dynamic import dynamic_qparams, dynamic_quantize
    >>> x = torch.tensor([-1.0, 0.0, 2.0, 0.5])
    >>> scale, zp = dynamic_qparams(x)
    >>> round(float(scale) * 255, 6), int(zp)
    (3.0, 85)
    >>> dynamic_quantize(x).tolist()
    [0, 85, 255, 127]
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def dynamic_qparams(x: Tensor) -> tuple[Tensor, Tensor]:
    """(scale float32 0-d, zero point int32 0-d) of ``DynamicQuantizeLinear`` for ``x``."""
    x = x.detach().to(torch.float32)
    lo = torch.clamp(x.amin(), max=0.0) if x.numel() else torch.zeros(())
    hi = torch.clamp(x.amax(), min=0.0) if x.numel() else torch.zeros(())
    scale = (hi - lo) / 255.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zp = torch.clamp(torch.round(0.0 - lo / scale), 0, 255).to(torch.int32)
    return scale, zp


def dynamic_quantize(x: Tensor, scale: Tensor | None = None, zero_point: Tensor | None = None) -> Tensor:
    """uint8 codes of ``x`` (parameters from :func:`dynamic_qparams` unless given)."""
    if scale is None or zero_point is None:
        scale, zero_point = dynamic_qparams(x)
    q = torch.round(x.to(torch.float32) / scale) + zero_point.to(torch.float32)
    return torch.clamp(q, 0, 255).to(torch.uint8)


def int_linear(x: Tensor, w_codes: Tensor, w_scale: Tensor, w_zero_point: Tensor | None = None,
               bias: Tensor | None = None) -> Tensor:
    """``y = x @ W.T + b`` the way ORT's dynamic int8 kernels compute it.

    ``x`` (..., K) float; ``w_codes`` (N, K) integer codes; ``w_scale`` (N,) or 0-d;
    ``w_zero_point`` like ``w_scale`` (None: 0). The int32 accumulator is computed exactly (float64
    holds every sum of 8-bit products for K < 2**37), then ``float(acc) * (x_scale * w_scale)``.
    """
    xs, xz = dynamic_qparams(x)
    xq = dynamic_quantize(x, xs, xz)
    a = xq.to(torch.float64) - xz.to(torch.float64)
    w = w_codes.to(torch.float64)
    if w_zero_point is not None:
        w = w - w_zero_point.to(torch.float64).reshape(-1, 1) if w_zero_point.dim() else w - float(w_zero_point)
    acc = (a @ w.T).to(torch.float32)
    y = acc * (xs * w_scale.to(torch.float32))
    return y if bias is None else y + bias.to(torch.float32)


def dynamic_int_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` with both operands quantized at run time (per tensor, ``DynamicQuantizeLinear``):
    exact int32 product of the codes (float64 holds it for inner sizes < 2**37), cast to float32
    and multiplied by ``scale_a * scale_b`` (float32), as ORT does."""
    sa, za = dynamic_qparams(a)
    sb, zb = dynamic_qparams(b)
    qa = dynamic_quantize(a, sa, za).to(torch.float64) - za.to(torch.float64)
    qb = dynamic_quantize(b, sb, zb).to(torch.float64) - zb.to(torch.float64)
    return torch.matmul(qa, qb).to(torch.float32) * (sa * sb)


def outlier_channels(absmax: Tensor, ratio: float, max_channels: int) -> Tensor | None:
    """Input channels whose calibrated ``absmax`` (K,) exceeds ``ratio`` times the median channel's,
    largest first, at most ``max_channels`` (and fewer than K); None when there are none.
    A per-tensor run-time range is set by its largest channel, so one channel at 20x the median
    leaves the others ~20x fewer codes; those channels are better computed in float.

    >>> outlier_channels(torch.tensor([1.0, 9.0, 1.2, 0.8, 30.0]), ratio=6.0, max_channels=4)
    tensor([4, 1])
    """
    a = absmax.detach().reshape(-1).to(torch.float64)
    med = a.median()
    if a.numel() < 2 or not bool(med > 0):
        return None
    order = torch.argsort(a, descending=True, stable=True)
    keep = order[a[order] > ratio * med][:min(max_channels, a.numel() - 1)]
    return keep.to(torch.int64) if keep.numel() else None
