"""Artifact packing of fake-quant layers: weights stored as their codes (mixed into
:class:`nnsqueeze.quant.modules.FakeQuantMixin`).

``pack_state`` turns a state dict's float weight into int8/uint8 codes (2..4-bit codes two per
byte, flattened; level indices for non-uniform grids) and a pruning mask into bits;
``unpack_state`` restores the float weight bit-exact to the fake-quantized one. ::

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.quant.modules import convert_
    >>> from nnsqueeze.quant.scheme import WeightScheme
    >>> q = convert_(nn.Linear(5, 3), scheme=WeightScheme(bits=4))
    >>> sd = q.state_dict(); q.pack_state(sd, ""); sd["weight"].dtype, sd["weight"].numel()
    (torch.uint8, 8)
    >>> q.unpack_state(sd, ""); torch.equal(sd["weight"], q.fake_quant_weight().detach())
    True
"""

from __future__ import annotations

import numpy as np
import torch

from ..ops.int4 import pack_int4, unpack_int4
from ..ops.quant import dequantize, nearest_level, quantize


class PackingMixin:
    """``pack_state`` / ``unpack_state``: the :class:`~nnsqueeze.quant.protocol.Packable` part of the
    fake-quant layers."""

    def pack_state(self, sd: dict, prefix: str) -> None:
        """In place: ``sd[prefix + "weight"]`` (float) becomes its codes (int8 for symmetric grids,
        uint8 for asymmetric grids and level indices; 2..4-bit codes two per byte, flattened), and a
        bool ``weight_mask`` (from pruning) becomes 8 mask entries per byte (uint8, flattened). Layers
        with an attached BN stay float."""
        key, mkey = prefix + "weight", prefix + "weight_mask"
        w, mask = sd.get(key), sd.get(mkey)
        if w is not None and w.is_floating_point() and self._modules.get("bn") is None:
            if mask is not None:
                w = torch.where(mask.to(torch.bool), w, torch.zeros((), dtype=w.dtype, device=w.device))
            scale = sd[prefix + "weight_scale_"]
            rows = self.weight_rows(w)  # (R, L); a partial last group's padding is dropped below
            a = self.qargs
            if a.nonuniform:  # codes are level indices
                q = nearest_level(rows.float() / scale[:, None], sd[prefix + "weight_levels_"])
            else:
                zp = sd.get(prefix + "weight_zero_point_", torch.zeros_like(scale, dtype=torch.int32))
                q = quantize(rows, scale, zp, a.qmin, a.qmax, axis=0)
            q = self.weight_from_rows(q)  # codes in the weight's shape: one code per real weight
            if a.bits <= 4:  # two codes per byte (offset to 0..15), flattened
                sd[key] = pack_int4((q - a.qmin).to(torch.uint8).reshape(-1))
            else:
                sd[key] = q.to(torch.int8 if a.signed_codes else torch.uint8).reshape(w.shape)
        if mask is not None and mask.dtype == torch.bool:
            sd[mkey] = torch.from_numpy(np.packbits(mask.detach().cpu().numpy().reshape(-1)))

    def unpack_state(self, sd: dict, prefix: str) -> None:
        """In place: packed ``sd[prefix + "weight"]`` becomes the float weight (bit-exact to the
        fake-quantized weight); a packed mask becomes the bool mask again."""
        key, mkey = prefix + "weight", prefix + "weight_mask"
        q, mask = sd.get(key), sd.get(mkey)
        if q is not None and q.dtype in (torch.int8, torch.uint8):
            scale, a = sd[prefix + "weight_scale_"], self.qargs
            if a.bits <= 4 and q.dim() == 1 and q.numel() == (self.weight.numel() + 1) // 2:
                q = unpack_int4(q, self.weight.numel()).to(torch.int32) + a.qmin
            q = self.weight_rows(q.reshape(self.weight.shape).to(torch.int32))  # (R, L), padding decoded then dropped
            if a.nonuniform:
                w = sd[prefix + "weight_levels_"][q.long()] * scale[:, None]
            else:
                zp = sd.get(prefix + "weight_zero_point_", torch.zeros_like(scale, dtype=torch.int32))
                w = dequantize(q, scale, zp, axis=0)
            sd[key] = self.weight_from_rows(w).to(self.weight.dtype)
        if mask is not None and mask.dtype == torch.uint8:
            shape = tuple(self.weight.shape)
            bits = np.unpackbits(mask.cpu().numpy(), count=int(np.prod(shape)))
            sd[mkey] = torch.from_numpy(bits.reshape(shape).astype(np.bool_))
