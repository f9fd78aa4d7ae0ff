"""The low-bit weight marker: how a fake-quant layer whose weight is not plain int8 traces it for ONNX.

While :func:`torch.onnx.export` traces a layer whose :class:`~nnsqueeze.quant.scheme.WeightScheme`
:func:`stores_lowbit` (no int8 kernels, or 2..4 bits), the layer's export forward passes its
fake-quantized weight through :func:`lowbit_weight`: an identity in torch that exports as one node
``nnsqueeze::LowBitWeight(w, scale[, zp | levels])`` carrying the scheme as attributes.
:func:`nnsqueeze.export.lowbit.lowbit_postprocess` then replaces every marker by codes of the scheme's
width and a decoding subgraph. This half sits with the layers (the exporters import it, never the
reverse), so :mod:`nnsqueeze.quant` needs nothing of :mod:`nnsqueeze.export`. ::

    >>> from nnsqueeze.quant.scheme import WeightScheme
    >>> [stores_lowbit(WeightScheme(**kw)) for kw in ({}, {"bits": 4}, {"symmetric": False})]
    [False, True, True]
"""

from __future__ import annotations

from typing import Any

import torch

Tensor = torch.Tensor
DOMAIN = "nnsqueeze"        # marker op domain: never left in a written file
MARKER = "LowBitWeight"


class LowBitWeightFn(torch.autograd.Function):
    """Identity on the (already quantized) weight; exports as the marker node."""

    @staticmethod
    def forward(ctx, w, scale, extra, bits, symmetric, table, group):
        return w.clone()

    @staticmethod
    def symbolic(g, w, scale, extra, bits, symmetric, table, group):
        ins = [w, scale] + ([] if extra is None else [extra])
        out = g.op(f"{DOMAIN}::{MARKER}", *ins, bits_i=int(bits), symmetric_i=int(symmetric), table_i=int(table),
                   group_i=int(group))
        out.setType(w.type())   # same shape and dtype as the weight (the conv symbolic needs the kernel shape)
        return out


# Uniform symmetric per-channel/per-tensor weights of 2..4 bits go through the marker too: at opset
# 21 they are stored as int4 and cast to int8 at load (ORT keeps QLinearConv/QGemm); where the
# model cannot be upgraded to opset 21 they keep int8 codes (int4 would force float kernels).
INT4_FOR_INT8_KERNEL_SCHEMES = True


def stores_lowbit(scheme: Any) -> bool:
    """True when a layer with these weight :class:`~nnsqueeze.quant.args.QuantArgs` (the layer's
    ``qargs``; a :class:`~nnsqueeze.quant.scheme.WeightScheme` reads the same) exports through
    :func:`lowbit_weight`: every scheme without int8 kernels, and 2..4-bit ones with."""
    return not scheme.int8_kernels or (INT4_FOR_INT8_KERNEL_SCHEMES and scheme.bits <= 4)


def lowbit_weight(layer: Any, w: Tensor, group: int = 0) -> Tensor:
    """``w`` (the layer's fake-quantized weight, a constant while tracing) tagged for
    :func:`~nnsqueeze.export.lowbit.lowbit_postprocess` with the layer's scale (R,), and zero points (R,) int32 (uniform
    asymmetric) or level table (K,) (non-uniform), and ``group``: the group length L of per-group rows
    (0 otherwise; a plain int computed before tracing, see ``FakeQuantMixin.export_constants``)."""
    sc = layer.qargs
    scale = layer.weight_scale_.detach().float().clone()
    table = sc.nonuniform
    if table:
        extra = layer.weight_levels_.detach().float().clone()
    elif sc.has_zero_point:
        extra = layer.weight_zero_point_.detach().to(torch.int32).clone()
    else:
        extra = None
    return LowBitWeightFn.apply(w, scale, extra, sc.bits, sc.symmetric, table, group)
