"""ONNX export of the fake-quant layers (mixed into :class:`nnsqueeze.quant.modules.FakeQuantMixin`):
under ``torch.onnx.is_in_onnx_export()`` a layer traces the same numbers through torch's fake-quant
ops (QuantizeLinear/DequantizeLinear for the exporter), with weight and bias frozen as constants by
:func:`nnsqueeze.quant.modules.export_mode`. ::

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.quant.modules import convert_
    >>> q = convert_(nn.Linear(4, 3))
    >>> c = q.export_constants()
    >>> sorted(c), torch.equal(c["weight"], q.fake_quant_weight()), c["group"]
    (['bias', 'group', 'weight'], True, 0)
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.quant import qrange
from .act_scheme import act_qdq_export
from .lowbit_marker import lowbit_weight, stores_lowbit

Tensor = torch.Tensor

ACT_QMIN, ACT_QMAX = qrange(8, signed=False)  # default activations: asymmetric uint8 per tensor (ActScheme())


class FakeQuantExportMixin:
    """``_export_forward`` / ``export_constants``: what the TorchScript ONNX exporter traces."""

    def _export_forward(self, x: Tensor) -> Tensor:
        """Same numbers through torch's fake-quant ops, which the TorchScript ONNX exporter turns into
        QuantizeLinear/DequantizeLinear. Weight and bias are constants here; the exporter's
        post-processing stores the weight as int8 and the bias as int32 (see export/onnx.py).
        Schemes without int8 kernels (per-group, asymmetric, non-uniform levels) and 2..4-bit ones
        trace their quantized weight through a marker (quant/lowbit_marker.py) that export/lowbit.py
        turns into codes of the scheme's width (int4/uint4/int8/uint8) decoded in the graph."""
        cache = self._export_cache or self.export_constants()
        x = self._export_act(x, "input")
        if self.ascheme.bits > 8 and isinstance(self, nn.Linear) and x.dim() > 2:
            # 16-bit inputs run in float anyway; a DequantizeLinear'd weight feeding MatMul (a Linear
            # on 3-D inputs; 2-D ones export as Gemm) would be turned into MatMulNBits by ONNX Runtime,
            # which re-quantizes the input to 8 bits (measured: 1 output step off the simulation).
            # The grid values as a float constant are exact.
            w = cache["weight"]
        elif stores_lowbit(self.qargs):
            w = lowbit_weight(self, cache["weight"], cache["group"])
        else:  # int8 kernels: Q/DQ that export/qdq.py folds into int8 codes
            zp = torch.zeros(self.weight.shape[0], dtype=torch.int32, device=self.weight.device)
            # Codes are within the (possibly narrower) weight range already; ONNX only knows int8.
            w = torch.fake_quantize_per_channel_affine(cache["weight"], self.weight_scale_, zp, 0, -128, 127)
        y = self._layer(x, w, cache["bias"])
        # A quantized output applies the ReLU itself (in the graph, or as a floor on the codes).
        return self._export_act(y, "output") if self.quant_output else self._act(y)

    def _export_act(self, x: Tensor, which: str) -> Tensor:
        """Activation Q/DQ for the exporter (``which="output"`` applies ``act`` first): uint8 through
        torch's op; other formats through :func:`~nnsqueeze.quant.act_scheme.act_qdq_export` (int8,
        Clip'd 8-bit container, int16). For 2..8-bit formats other than uint8 an absorbed ReLU
        becomes a floor at the zero point on the codes (exact: ``Q(relu(y)) = max(Q(y), zp)``), since
        ONNX Runtime only drops a ReLU before a QuantizeLinear whose zero point is the type minimum."""
        s, z = self._buffers[f"{which}_scale_"], self._buffers[f"{which}_zero_point_"]
        relu = which == "output" and self.act == "relu"
        if self.ascheme.is_default:
            return torch.fake_quantize_per_tensor_affine(self._act(x) if relu else x, s, z, ACT_QMIN, ACT_QMAX)
        if relu and self.ascheme.bits == 16:
            return act_qdq_export(self._act(x), s, z, self.ascheme)
        return act_qdq_export(x, s, z, self.ascheme, floor=int(z) if relu else None)

    @torch.no_grad()
    def export_constants(self) -> dict[str, Tensor | None]:
        """Quantized weight (BN folded, mask applied) and the simulated bias as plain tensors for tracing."""
        b = self.quant_bias()
        # The dequantized weight: on the grid and inside the code range even when the scale is
        # learned or clipped (the exporter's Q/DQ uses the full int8 range).
        w = self.fake_quant_weight()
        # per-group: the group length L as a plain int (shapes read while tracing would be graph values)
        group = self.weight_groups()[1] if self.qargs.granularity == "group" else 0
        return {"weight": w.detach().clone(), "bias": None if b is None else b.detach().clone(), "group": group}
