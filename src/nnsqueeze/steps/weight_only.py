"""``weight-only`` step: int8 or int4 group-wise weights, float activations (W8A16, W4A16 g128).

Only the weights are quantized (no calibration data needed), which shrinks the model ~4x (int8)
or ~7x (int4 with group scales) and keeps activations exact; ONNX Runtime runs each layer as
``MatMulNBits`` (com.microsoft), dequantizing blocks on the fly. The artifact stores 4-bit codes
two per byte. Recipe::

    steps:
      - weight-only:
          bits: 4              # 4 or 8
          group_size: 128      # power of two >= 16, or -1 for one scale per output row
          symmetric: true      # false: a zero point per group

Example::

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.context import Context
    >>> from nnsqueeze.steps.weight_only import WeightOnly
    >>> model = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 3)).eval()
    >>> ctx = Context(); ctx.report.begin_step("weight-only", {})
    >>> model = WeightOnly(WeightOnly.Config(bits=4, group_size=128)).run(model, ctx)
    >>> [type(m).__name__ for m in model]
    ['WeightOnlyLinear', 'ReLU', 'WeightOnlyLinear']
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator
from torch import nn

from ..errors import ModelError
from ..quant.weight_only import convert_weight_only_
from ..quant.embedding import convert_embeddings, rebuild_embeddings
from ..registry import STEPS
from .base import Step, StepConfig, recorded_module


class WeightOnlyConfig(StepConfig):
    bits: int = Field(4, description="4 or 8 (ONNX Runtime MatMulNBits)")
    group_size: int = Field(128, description="input elements per scale: a power of two >= 16, or -1 (per row)")
    symmetric: bool = True
    embeddings: bool = Field(False, description="also store nn.Embedding tables as per-row int8")

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v not in (4, 8):
            raise ValueError("must be 4 or 8 (the widths ONNX Runtime's MatMulNBits runs)")
        return v

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v != -1 and (v < 16 or v & (v - 1)):
            raise ValueError("must be a power of two >= 16 (e.g. 32, 64, 128) or -1 for one group per row")
        return v


@STEPS.register("weight-only")
class WeightOnly(Step):
    """Weight-only quantization of Linear layers; see the module docstring."""
    needs_float = True
    quantizes = True
    trainable_after = False

    Config = WeightOnlyConfig
    default_targets = ["Linear"]

    def __init__(self, config: WeightOnlyConfig, index: int = 0):
        super().__init__(config, index)
        self._record: dict[str, Any] = {}

    def run(self, model: nn.Module, ctx) -> nn.Module:
        cfg, name = self.config, self.registered_name
        sel = self.select(model, ctx, supported=(nn.Linear,))
        layers: dict[str, dict[str, Any]] = {}
        g = "per-row" if cfg.group_size < 0 else f"g{cfg.group_size}"
        scheme = f"w{cfg.bits} {g} {'sym' if cfg.symmetric else 'asym'} / float activations"
        for lname, mod in sel.layers:
            if type(mod) is not nn.Linear:
                ctx.skip(name, lname, f"{type(mod).__name__} is not a plain nn.Linear")
                continue
            convert_weight_only_(mod, cfg.bits, cfg.group_size, cfg.symmetric)
            layers[lname] = {"bits": cfg.bits, "group_size": cfg.group_size, "symmetric": cfg.symmetric}
            sqnr = mod.weight_sqnr_db()
            ctx.report.layer(lname, bits=cfg.bits, act_bits=None, scheme=scheme,
                             weight_sqnr_db=round(sqnr, 2) if abs(sqnr) != float("inf") and sqnr == sqnr else None)
        if not layers:
            raise ModelError(self.where, "no plain nn.Linear left to quantize", fix="target plain nn.Linear modules")
        embs = convert_embeddings(model, self.config.ignore, f"{self.where}.ignore", ctx, name) \
            if self.config.embeddings else []
        self._record = {"layers": layers, "embeddings": embs}
        ctx.report.step(quantized_layers=len(layers), weight_bits=cfg.bits, scheme=scheme)
        return model

    def record(self) -> dict[str, Any]:
        return self._record

    @classmethod
    def rebuild(cls, model: nn.Module, config: WeightOnlyConfig, record: dict[str, Any]) -> nn.Module:
        for lname, info in record.get("layers", {}).items():
            mod = recorded_module(model, lname, (nn.Linear,), "weight-only record")
            convert_weight_only_(mod, int(info["bits"]), int(info["group_size"]), bool(info["symmetric"]))
        rebuild_embeddings(model, record.get("embeddings", []))
        return model
