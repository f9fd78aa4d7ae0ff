"""Weight-only int8 ``nn.Embedding``: per-row symmetric int8 codes, one fp32 scale per row.

Row scales are rounded up to fp16 numbers, so ONNX stores them in 2 bytes exactly.
Lookups gather int8 rows and their scales, then multiply, so the table is ~4x smaller on disk
and in memory while the looked-up values are exactly ``codes * scale`` in torch and in ONNX
Runtime (export: ``Gather(codes) -> Cast -> Mul(Gather(scales))``). ::

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.quant.embedding import convert_embedding_
    >>> emb = convert_embedding_(nn.Embedding(10, 4))
    >>> emb(torch.tensor([[1, 2]])).shape
    torch.Size([1, 2, 4])
    >>> sd = emb.state_dict(); emb.pack_state(sd, ""); sd["weight"].dtype
    torch.int8
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.quant import dequantize, qparams, quantize, sqnr_db
from .args import QuantArgs
from .protocol import Packable, QuantizedModule, layer_bits
from .swap import swap_class

Tensor = torch.Tensor
FP16_MIN_NORMAL, FP16_MAX = 2.0 ** -14, 65504.0


def fp16_ceil(s: Tensor) -> Tensor:
    """Row scales rounded up to fp16 numbers (float32 dtype), so the ONNX file can store them in
    half the bytes exactly (:func:`nnsqueeze.export.half.fp16_storage`); rounding up never pushes a
    code past 127. Unchanged if any scale is outside fp16's normal range."""
    s = s.float()
    if s.numel() == 0 or float(s.min()) < FP16_MIN_NORMAL or float(s.max()) * 1.001 > FP16_MAX:
        return s
    c = s.half()
    up = torch.nextafter(c, torch.full_like(c, float("inf")))
    return torch.where(c.float() >= s, c.float(), up.float())  # the smallest fp16 >= s


class _GatherInt8Fn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, codes, scales):
        return F.embedding(ids, codes.to(torch.float32) * scales)

    @staticmethod
    def symbolic(g, ids, codes, scales):
        rows = g.op("Cast", g.op("Gather", codes, ids, axis_i=0), to_i=1)
        return g.op("Mul", rows, g.op("Gather", scales, ids, axis_i=0))


_INT8_ROWS = QuantArgs()


class QuantEmbedding(QuantizedModule, Packable, nn.Embedding):
    onnx_quantized = True

    def _setup(self) -> None:
        self.register_buffer("weight_scale_", torch.ones(self.num_embeddings, device=self.weight.device))
        self.refresh_weight_qparams_()

    @property
    def qargs(self) -> QuantArgs:
        """int8 per row, symmetric (the scales are also rounded up to fp16 values, :func:`fp16_ceil`)."""
        return _INT8_ROWS

    @torch.no_grad()
    def refresh_weight_qparams_(self) -> None:
        w = self.weight.detach().float()
        self.weight_scale_.copy_(fp16_ceil(qparams(w.amin(1), w.amax(1), bits=8, symmetric=True)[0]))

    def weight_codes(self) -> Tensor:
        zp = torch.zeros_like(self.weight_scale_, dtype=torch.int32)
        return quantize(self.weight.detach(), self.weight_scale_, zp, -128, 127, axis=0).to(torch.int8)

    def dequantized_weight(self) -> Tensor:
        return self.weight_codes().to(torch.float32) * self.weight_scale_.reshape(-1, 1)

    def qparams(self) -> dict[str, Tensor]:
        return {"weight_scale_": self.weight_scale_}

    def weight_sqnr_db(self) -> float:
        return sqnr_db(self.weight.detach(), self.dequantized_weight())

    def forward(self, ids: Tensor) -> Tensor:
        if torch.onnx.is_in_onnx_export():
            def const(t):
                return torch.from_numpy(t.detach().cpu().numpy().copy())

            return _GatherInt8Fn.apply(ids, const(self.weight_codes()), const(self.weight_scale_.reshape(-1, 1)))
        w = self.dequantized_weight()
        if self.training:
            w = self.weight + (w - self.weight).detach()
        return F.embedding(ids, w, self.padding_idx)

    def pack_state(self, sd: dict, prefix: str) -> None:
        key = prefix + "weight"
        w = sd.get(key)
        if w is not None and w.is_floating_point():
            s = sd[prefix + "weight_scale_"]
            sd[key] = quantize(w, s, torch.zeros_like(s, dtype=torch.int32), -128, 127, axis=0).to(torch.int8)

    def unpack_state(self, sd: dict, prefix: str) -> None:
        key = prefix + "weight"
        q = sd.get(key)
        if q is not None and q.dtype == torch.int8:
            s = sd[prefix + "weight_scale_"]
            sd[key] = dequantize(q, s, torch.zeros_like(s, dtype=torch.int32), axis=0).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, w8 per-row sym"


def convert_embedding_(module: nn.Embedding) -> QuantEmbedding:
    """Turn a plain ``nn.Embedding`` (no ``max_norm``, dense) into a :class:`QuantEmbedding`, in place."""
    if type(module) is not nn.Embedding:
        raise TypeError(f"converts plain nn.Embedding, not {type(module).__name__}")
    if module.max_norm is not None or module.sparse:
        raise TypeError("an Embedding with max_norm or sparse=True cannot be int8-quantized")
    swap_class(module, QuantEmbedding)
    module._setup()
    return module


def convert_embeddings(model: nn.Module, ignore: list[str], where: str, ctx, step: str) -> list[str]:
    """Convert every plain ``nn.Embedding`` not in ``ignore``; report each. Returns their names."""
    from ..targets import select

    names = []
    sel = select(model, ["Embedding"], ignore, (nn.Embedding,), where=where, strict=False)
    for name, mod in sel.layers:
        if type(mod) is not nn.Embedding or mod.max_norm is not None or mod.sparse:
            ctx.skip(step, name, "only plain dense nn.Embedding without max_norm is int8-quantized")
            continue
        convert_embedding_(mod)
        names.append(name)
        sqnr = mod.weight_sqnr_db()
        ctx.report.layer(name, **layer_bits(mod), scheme="w8 per-row sym embedding (weight-only)",
                         weight_sqnr_db=round(sqnr, 2) if abs(sqnr) != float("inf") and sqnr == sqnr else None)
    return names


def rebuild_embeddings(model: nn.Module, names: list[str]) -> None:
    for name in names:
        mod = model.get_submodule(name)
        if not isinstance(mod, QuantEmbedding):
            convert_embedding_(mod)
