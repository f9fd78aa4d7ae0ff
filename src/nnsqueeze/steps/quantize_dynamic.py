"""``quantize-dynamic`` step: int8 weights, activations quantized at run time, for Linear layers.

No calibration data: each activation tensor gets its own uint8 range when the model runs
(``DynamicQuantizeLinear``), so the step needs nothing but the model. Weights are quantized per
output channel. Exported, ONNX Runtime fuses each layer into ``DynamicQuantizeMatMul``; the torch
model computes exactly what ORT computes (see :mod:`nnsqueeze.quant.dynamic`). Recipe::

    steps:
      - quantize-dynamic:
          weights: {bits: 8, symmetric: true}    # int8 codes; reduce_range: auto -> 7 bits without VNNI
          embeddings: true                       # nn.Embedding tables as int8 rows
          ignore: ["re:.*pooler.*"]

``weights.symmetric: true`` (default) uses int8 codes (zero point 0), where ``reduce_range: auto``
drops to 7-bit codes on x86 CPUs without VNNI, like the ``quantize`` step (ORT's u8s8 kernels
saturate there). ``symmetric: false`` keeps 8 bits with uint8 codes and a per-channel zero point
(u8u8 kernels, which never saturate) at the same fidelity on MiniLM but 1.7x slower (VNNI Xeon). ::

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.context import Context
    >>> from nnsqueeze.steps.quantize_dynamic import QuantizeDynamic
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    >>> ctx = Context(); ctx.report.begin_step("quantize-dynamic", {})
    >>> model = QuantizeDynamic(QuantizeDynamic.Config()).run(model, ctx)
    >>> [type(m).__name__ for m in model]
    ['DynamicQuantLinear', 'ReLU', 'DynamicQuantLinear']
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..errors import ModelError
from ..quant.dynamic import convert_dynamic_
from ..quant.embedding import convert_embeddings, rebuild_embeddings
from ..registry import STEPS
from .base import Step, StepConfig, recorded_module


class DynamicWeightsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bits: int = Field(8, ge=7, le=8, description="8, or 7 (reduced range, symmetric only)")
    symmetric: bool = Field(True, description="true: int8 codes, zero point 0 (u8s8 kernels, fastest); false: "
                            "uint8 codes with a per-channel zero point (u8u8 kernels: no saturation, full 8 bits, "
                            "but measured 1.7x slower on a VNNI Xeon)")
    reduce_range: bool | Literal["auto"] = Field(
        "auto", description="symmetric only: 7-bit codes where ONNX Runtime's u8s8 kernels saturate "
        "(x86 without VNNI); 'auto' decides on the machine running the step")


class QuantizeDynamicConfig(StepConfig):
    weights: DynamicWeightsConfig = Field(default_factory=DynamicWeightsConfig)
    embeddings: bool = Field(False, description="also store nn.Embedding tables as per-row int8 (weight-only)")


@STEPS.register("quantize-dynamic")
class QuantizeDynamic(Step):
    """Dynamic int8 quantization of Linear layers; see the module docstring."""

    Config = QuantizeDynamicConfig
    default_targets = ["Linear"]

    def __init__(self, config: QuantizeDynamicConfig, index: int = 0):
        super().__init__(config, index)
        self._record: dict[str, Any] = {}

    def _bits(self, ctx) -> int:
        w = self.config.weights
        if not w.symmetric or w.bits == 7 or w.reduce_range is False:
            return w.bits
        if w.reduce_range is True:
            return 7
        from ..export.ort import u8s8_may_saturate

        if u8s8_may_saturate():
            ctx.fallback(self.registered_name, "this CPU has no VNNI, where ONNX Runtime's u8s8 kernels saturate "
                         "with 8-bit weights: using 7-bit weight codes (weights.reduce_range: auto; "
                         "or use weights.symmetric: false for full 8-bit u8u8)")
            return 7
        return 8

    def run(self, model: nn.Module, ctx) -> nn.Module:
        name, signed = self.registered_name, self.config.weights.symmetric
        sel = self.select(model, ctx, supported=(nn.Linear,))
        bits = self._bits(ctx)
        layers: dict[str, dict[str, Any]] = {}
        for lname, mod in sel.layers:
            if type(mod) is not nn.Linear:
                ctx.skip(name, lname, f"{type(mod).__name__} is not a plain nn.Linear")
                continue
            convert_dynamic_(mod, bits=bits, signed=signed)
            layers[lname] = {"bits": bits, "signed": signed}
            sqnr = mod.weight_sqnr_db()
            kind = f"w{bits} per-channel {'sym' if signed else 'asym'}"
            ctx.report.layer(lname, bits=bits, act_bits=8, scheme=f"{kind} / a8 dynamic per-tensor asym",
                             weight_sqnr_db=round(sqnr, 2) if abs(sqnr) != float("inf") and sqnr == sqnr else None)
        if not layers:
            raise ModelError(self.where, "no plain nn.Linear left to quantize", fix="target plain nn.Linear modules")
        embs = convert_embeddings(model, self.config.ignore, f"{self.where}.ignore", ctx, name) \
            if self.config.embeddings else []
        self._record = {"layers": layers, "embeddings": embs}
        ctx.report.step(quantized_layers=len(layers), weight_bits=bits,
                        scheme=f"w{bits} per-channel {'sym' if signed else 'asym'}, a8 dynamic")
        return model

    def record(self) -> dict[str, Any]:
        return self._record

    @classmethod
    def rebuild(cls, model: nn.Module, config: QuantizeDynamicConfig, record: dict[str, Any]) -> nn.Module:
        for lname, info in record.get("layers", {}).items():
            mod = recorded_module(model, lname, (nn.Linear,), "quantize-dynamic record")
            convert_dynamic_(mod, bits=int(info["bits"]), signed=bool(info["signed"]))
        rebuild_embeddings(model, record.get("embeddings", []))
        return model
