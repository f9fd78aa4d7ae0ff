"""Packing of 4-bit codes, two per byte, and group-wise (block-wise) quantization math.

Pure tensor functions. Layout (the one ONNX Runtime's ``MatMulNBits`` reads): along the last
dimension, element ``2i`` goes to the low nibble and ``2i+1`` to the high nibble of byte ``i``; an
odd length is padded with a zero nibble. :func:`unpack_int4` takes the original length back, so a
round trip is bit-exact on any shape::

    >>> import torch
    >>> from nnsqueeze.ops.int4 import pack_int4, unpack_int4
    >>> q = torch.tensor([[1, 15, 7], [0, 8, 3]], dtype=torch.uint8)
    >>> pack_int4(q).tolist()
    [[241, 7], [128, 3]]
    >>> torch.equal(unpack_int4(pack_int4(q), 3), q)
    True

Group-wise quantization (``group_size`` consecutive input elements share one scale, per output
row) with unsigned codes ``q in [0, 2**bits - 1]`` and ``w = (q - zp) * scale``:

- symmetric: ``zp = 2**(bits-1)`` (8 for int4, ``MatMulNBits``' default), ``scale = absmax /
  (2**(bits-1) - 1)``, so codes span ``[1, 2**bits - 1]`` and nothing is clipped;
- asymmetric: ``scale = (max - min) / (2**bits - 1)`` over the range widened to include 0,
  ``zp = round(-min / scale)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def pack_int4(q: Tensor) -> Tensor:
    """uint8 codes in [0, 15], shape (..., n) -> uint8 (..., ceil(n / 2)), two codes per byte."""
    if q.dtype != torch.uint8:
        raise TypeError(f"pack_int4 expects uint8 codes, got {q.dtype}")
    if q.numel() and int(q.max()) > 15:
        raise ValueError(f"pack_int4: code {int(q.max())} does not fit in 4 bits")
    if q.shape[-1] % 2:
        q = F.pad(q, (0, 1))
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: Tensor, n: int) -> Tensor:
    """Inverse of :func:`pack_int4`: uint8 (..., ceil(n / 2)) -> uint8 codes (..., n)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 expects uint8, got {packed.dtype}")
    if packed.shape[-1] != (n + 1) // 2:
        raise ValueError(f"unpack_int4: {packed.shape[-1]} bytes cannot hold {n} codes")
    out = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(*packed.shape[:-1], -1)
    return out[..., :n]


def groupwise_qparams(w: Tensor, bits: int, group_size: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Scales (float32) and zero points (uint8) of shape (N, ceil(K / group_size)) for ``w`` (N, K).

    The last group of a K that ``group_size`` does not divide is shorter (padding ignored).
    ``group_size >= K`` (or -1) means one group per row (per-channel).
    """
    n, k = w.shape
    g = k if group_size <= 0 else min(group_size, k)
    groups = -(-k // g)
    wp = F.pad(w.detach().to(torch.float32), (0, groups * g - k)).reshape(n, groups, g)
    qmax = (1 << bits) - 1
    if symmetric:
        half = 1 << (bits - 1)
        scale = wp.abs().amax(-1) / (half - 1)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zp = torch.full_like(scale, half, dtype=torch.uint8)
        return scale, zp
    # zero padding lies inside [min(0, .), max(0, .)], so it does not widen the range
    lo = torch.clamp(wp.amin(-1), max=0.0)
    hi = torch.clamp(wp.amax(-1), min=0.0)
    scale = (hi - lo) / qmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zp = torch.clamp(torch.round(-lo / scale), 0, qmax).to(torch.uint8)
    return scale, zp


def groupwise_quantize(w: Tensor, scale: Tensor, zp: Tensor, bits: int, group_size: int) -> Tensor:
    """uint8 codes (N, K) of ``w`` (N, K) with group parameters (N, groups)."""
    n, k = w.shape
    groups = scale.shape[1]
    g = -(-k // groups) if group_size <= 0 else min(group_size, k)
    s = scale.repeat_interleave(g, dim=1)[:, :k]
    z = zp.to(torch.float32).repeat_interleave(g, dim=1)[:, :k]
    q = torch.round(w.detach().to(torch.float32) / s) + z
    return torch.clamp(q, 0, (1 << bits) - 1).to(torch.uint8)


def groupwise_dequantize(q: Tensor, scale: Tensor, zp: Tensor, group_size: int) -> Tensor:
    """float32 (N, K) ``(q - zp) * scale`` with group parameters (N, groups)."""
    n, k = q.shape
    groups = scale.shape[1]
    g = -(-k // groups) if group_size <= 0 else min(group_size, k)
    s = scale.to(torch.float32).repeat_interleave(g, dim=1)[:, :k]
    z = zp.to(torch.float32).repeat_interleave(g, dim=1)[:, :k]
    return (q.to(torch.float32) - z) * s
