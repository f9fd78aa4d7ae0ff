"""Packing of 4-bit codes, two per byte (the group-wise grid itself is :mod:`nnsqueeze.ops.rtn`).

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
