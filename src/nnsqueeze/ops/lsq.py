"""LSQ: learned step size quantization (Esser et al., ICLR 2020), pure tensor math.

``x_hat = (clamp(round(x / s) + z, qmin, qmax) - z) * s`` with gradients

- to ``x``: 1 where the code is inside ``[qmin, qmax]``, else 0 (straight-through, clipped);
- to ``s``: ``round(x/s) - x/s`` inside, ``qmin - z`` below, ``qmax - z`` above, times the gradient
  scale ``g = 1 / sqrt(numel_per_scale * qmax)`` that keeps step-size updates on the weights' scale.

The zero point stays fixed (calibrated); the forward is bit-exact with
:func:`nnsqueeze.ops.quant.fake_quantize` (same fp32 division and round-half-even)::

    >>> import torch
    >>> from nnsqueeze.ops.lsq import lsq_fake_quantize
    >>> x = torch.tensor([0.26, -0.9, 3.0], requires_grad=True)
    >>> s = torch.tensor(0.5, requires_grad=True)
    >>> y = lsq_fake_quantize(x, s, torch.tensor(0), -4, 3, grad_scale=1.0)
    >>> y.tolist()
    [0.5, -1.0, 1.5]
    >>> y.sum().backward(); round(float(s.grad), 4)   # (1 - 0.52) + (-2 + 1.8) + 3
    3.28
"""

from __future__ import annotations

import math

import torch

from .quant import EPS, bcast

Tensor = torch.Tensor


class _LSQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, s: Tensor, z: Tensor, qmin: int, qmax: int, g: float) -> Tensor:
        sf = s.to(torch.float32).clamp(min=EPS)
        v = x.to(torch.float32) / sf
        r = torch.round(v)
        q = r + z.to(torch.float32)
        below, above = q < qmin, q > qmax
        y = (torch.clamp(q, qmin, qmax) - z.to(torch.float32)) * sf
        ctx.save_for_backward(v, r, z, below, above)
        ctx.shapes = (s.shape, qmin, qmax, g)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, gy: Tensor):
        v, r, z, below, above = ctx.saved_tensors
        s_shape, qmin, qmax, g = ctx.shapes
        inside = ~(below | above)
        gx = gy * inside
        zf = z.to(torch.float32)
        d = torch.where(below, qmin - zf, torch.where(above, qmax - zf, r - v))
        gs = gy.to(torch.float32) * d * g
        # Sum over the broadcast dimensions down to the scale's own shape.
        while gs.dim() > len(s_shape):
            gs = gs.sum(0)
        for i, n in enumerate(s_shape):
            if n == 1 and gs.shape[i] != 1:
                gs = gs.sum(i, keepdim=True)
        return gx, gs.reshape(s_shape), None, None, None, None


def lsq_grad_scale(numel: int, n_scales: int, qmax: int) -> float:
    """LSQ's gradient scale ``1 / sqrt((numel / n_scales) * qmax)``."""
    return 1.0 / math.sqrt(max(numel / max(n_scales, 1), 1.0) * max(qmax, 1))


def lsq_fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                      axis: int | None = None, grad_scale: float | None = None) -> Tensor:
    """Fake-quantize ``x`` with a learnable ``scale`` (0-d, or (C,) along ``axis``); see module doc.

    ``grad_scale`` defaults to :func:`lsq_grad_scale` of ``x``'s size per scale.
    """
    s = bcast(scale, x, axis)
    z = bcast(zero_point, x, axis)
    if grad_scale is None:
        grad_scale = lsq_grad_scale(x.numel(), scale.numel(), qmax)
    return _LSQ.apply(x, s, z, qmin, qmax, float(grad_scale))
