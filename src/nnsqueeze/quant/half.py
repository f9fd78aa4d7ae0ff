"""Half-precision layers (fp16 / bf16) inside an fp32 model: Linear, Conv1d, Conv2d, Embedding.

A converted layer keeps its weight (and bias) in ``float16`` or ``bfloat16``, casts its input to
that type, computes, and casts the result back to the input's type, so the rest of the model
(LayerNorm, softmax, residual adds, anything left out by ``ignore``) stays fp32. ::

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.quant.half import convert_half_
    >>> layer = convert_half_(nn.Linear(4, 3), torch.bfloat16)
    >>> layer.weight.dtype, layer(torch.randn(2, 4)).dtype
    (torch.bfloat16, torch.float32)

Export: fp16 layers export as ``Cast -> MatMul/Gemm/Conv (float16) -> Cast``, which ONNX Runtime's
CPU provider runs in fp16. ONNX Runtime has no bf16 MatMul/Conv on CPU, so bf16 layers export with
bf16 *storage*: ``Cast(bf16 weight) -> fp32 compute``, with the input and the output rounded
through bf16 (``Cast`` to bf16 and back) so the numbers are the bf16 layer's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .args import QuantArgs
from .protocol import QuantizedModule
from .swap import swap_class

Tensor = torch.Tensor
_BF16 = 16  # onnx.TensorProto.BFLOAT16
_FLOAT = 1


def _round_bf16(g, v):
    return g.op("Cast", g.op("Cast", v, to_i=_BF16), to_i=_FLOAT)


class _Bf16LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_t, bias):
        y = F.linear(x.to(torch.bfloat16), w_t.T, None if bias.numel() == 0 else bias)
        return y.to(x.dtype)

    @staticmethod
    def symbolic(g, x, w_t, bias):
        y = g.op("MatMul", _round_bf16(g, x), g.op("Cast", w_t, to_i=_FLOAT))
        from torch.onnx import symbolic_helper as sh

        if sh._get_tensor_sizes(bias) != [0]:
            y = g.op("Add", y, g.op("Cast", bias, to_i=_FLOAT))
        return _round_bf16(g, y)


class _Bf16ConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias, mod):
        y = mod._conv_forward(x.to(torch.bfloat16), w, None if bias.numel() == 0 else bias)
        return y.to(x.dtype)

    @staticmethod
    def symbolic(g, x, w, bias, mod):
        from torch.onnx import symbolic_helper as sh

        ins = [_round_bf16(g, x), g.op("Cast", w, to_i=_FLOAT)]
        if sh._get_tensor_sizes(bias) != [0]:
            ins.append(g.op("Cast", bias, to_i=_FLOAT))
        pads = list(mod.padding) * 2
        y = g.op("Conv", *ins, kernel_shape_i=list(mod.kernel_size), strides_i=list(mod.stride), pads_i=pads,
                 dilations_i=list(mod.dilation), group_i=mod.groups)
        return _round_bf16(g, y)


_HALF_ARGS = {torch.float16: QuantArgs(format="fp16"), torch.bfloat16: QuantArgs(format="bf16")}


class HalfMixin(QuantizedModule):
    """Forward in the weight's half type; inputs and outputs keep the caller's dtype."""

    onnx_quantized = True  # verify the export with reduced-precision tolerances
    _float_class: type | None = None

    @property
    def qargs(self) -> QuantArgs:
        """``fp16`` or ``bf16``: the weight's dtype (weights and compute cast, no scales)."""
        return _HALF_ARGS[self.weight.dtype]  # type: ignore[attr-defined]

    def dequantized_weight(self) -> Tensor:
        """The half weight widened to float32 (exact)."""
        return self.weight.float()  # type: ignore[attr-defined]

    def qparams(self) -> dict[str, Tensor]:
        return {}  # the dtype is the format

    def _half_forward(self, x: Tensor) -> Tensor:
        return super().forward(x.to(self.weight.dtype)).to(x.dtype)  # type: ignore[misc]

    def forward(self, x: Tensor) -> Tensor:
        if torch.onnx.is_in_onnx_export() and self.weight.dtype == torch.bfloat16:
            return self._bf16_export(x)
        return self._half_forward(x)

    @property
    def onnx_bf16_storage(self) -> bool:  # export/half.py stores bf16-exact constants as bf16
        return self.weight.dtype == torch.bfloat16

    def _bf16_export(self, x: Tensor) -> Tensor:
        def const(t):  # numpy round trip: the tracer sees a constant, not parameter arithmetic
            return torch.from_numpy(t.detach().float().numpy().copy()).to(torch.bfloat16)

        bias = const(self.bias) if self.bias is not None else torch.zeros(0, dtype=torch.bfloat16)
        if isinstance(self, nn.Linear):
            return _Bf16LinearFn.apply(x, const(self.weight.T.contiguous()), bias)
        return _Bf16ConvFn.apply(x, const(self.weight), bias, self)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {str(self.weight.dtype).replace('torch.', '')}"  # type: ignore[misc]


class HalfLinear(HalfMixin, nn.Linear):
    pass


class HalfConv1d(HalfMixin, nn.Conv1d):
    pass


class HalfConv2d(HalfMixin, nn.Conv2d):
    pass


class HalfEmbedding(HalfMixin, nn.Embedding):
    """Table stored in half precision; looked-up rows are returned as fp32 (exact widening)."""

    def forward(self, ids: Tensor) -> Tensor:
        if torch.onnx.is_in_onnx_export() and self.weight.dtype == torch.bfloat16:
            # Traced as Cast(table) -> Gather; the bf16 storage pass keeps the table in bf16.
            return F.embedding(ids, self.weight.float(), self.padding_idx)
        return F.embedding(ids, self.weight, self.padding_idx).float()


HALF_MAP: dict[type, type] = {nn.Linear: HalfLinear, nn.Conv1d: HalfConv1d, nn.Conv2d: HalfConv2d,
                              nn.Embedding: HalfEmbedding}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def convert_half_(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Turn a plain Linear/Conv1d/Conv2d/Embedding into its half-precision class, in place (same object)."""
    cls = HALF_MAP.get(type(module))
    if cls is None:
        raise TypeError(f"cannot convert a {type(module).__name__} to half precision; supported: "
                        f"{', '.join(c.__name__ for c in HALF_MAP)}")
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype}")
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and isinstance(module.padding, str) and dtype == torch.bfloat16:
        raise TypeError("bf16 export needs numeric conv padding, not padding='same'/'valid'")
    module._float_class = type(module)
    swap_class(module, cls)
    module.to(dtype)
    return module
