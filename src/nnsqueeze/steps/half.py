"""``half`` step: fp16 or bf16 weights and compute for Linear / Conv1d / Conv2d / Embedding, the rest in fp32.

Converted layers hold half-precision weights and compute in half precision (inputs cast on the
way in, outputs cast back), so LayerNorm, softmax, residual adds and any layer listed in
``ignore`` stay fp32. The model file halves. Recipe::

    steps:
      - half:
          dtype: float16        # or bfloat16
          ignore: [classifier]  # kept in fp32

``keep_fp32`` keeps in fp32 the layers that ``nnsqueeze sensitivity --formats fp16`` (or ``bf16``)
ranks worst, measured on the calibration data (output SQNR) and, when eval data and a metric are
given, by metric drop. ``most_sensitive: N`` keeps the top N; ``max_metric_drop`` / ``min_sqnr_db``
keep the next most sensitive layer while the WHOLE converted model (measured) misses the budget::

    steps:
      - half:
          dtype: float16
          keep_fp32: {most_sensitive: 1, max_metric_drop: 0.002}

Each kept layer is reported as skipped with its measured one-layer figures.

ONNX: fp16 layers run in fp16 in ONNX Runtime; bf16 layers are stored in bf16 and computed in
fp32 with bf16 rounding of inputs and outputs (ORT has no bf16 MatMul on CPU; see
:mod:`nnsqueeze.quant.half`). ::

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.context import Context
    >>> from nnsqueeze.steps.half import Half
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    >>> ctx = Context(); ctx.report.begin_step("half", {})
    >>> model = Half(Half.Config(dtype="bfloat16")).run(model, ctx)
    >>> model[0].weight.dtype, model(torch.randn(2, 8)).dtype
    (torch.bfloat16, torch.float32)
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from ..errors import DataError, ModelError
from ..quant.args import QuantArgs
from ..quant.convert import convert, half_args
from ..quant.half import HALF_MAP, HalfMixin
from ..registry import STEPS
from .base import Step, StepConfig, recorded_module


class KeepFp32(BaseModel):
    model_config = ConfigDict(extra="forbid")
    most_sensitive: int | None = Field(None, ge=1, description="keep the N layers ranked most half-sensitive")
    max_metric_drop: float | None = Field(None, ge=0, description="keep layers (most sensitive first) until the "
                                          "whole model's metric drop is at most this (needs eval data + metric)")
    min_sqnr_db: float | None = Field(None, description="keep layers until the whole model's output SQNR (dB, "
                                      "vs fp32 on calibration data) is at least this")
    samples: int = Field(512, ge=1, description="calibration examples for the SQNR figures")

    @model_validator(mode="after")
    def _one_rule(self) -> "KeepFp32":
        if self.most_sensitive is None and self.max_metric_drop is None and self.min_sqnr_db is None:
            raise ValueError("keep_fp32 needs most_sensitive, max_metric_drop and/or min_sqnr_db")
        return self


class HalfConfig(StepConfig):
    dtype: Literal["float16", "bfloat16"] = "float16"

    def args(self) -> QuantArgs:
        """The converted layers' :class:`~nnsqueeze.quant.args.QuantArgs`: ``fp16`` or ``bf16``."""
        return QuantArgs(format="fp16" if self.dtype == "float16" else "bf16")
    keep_fp32: KeepFp32 | None = Field(None, description="keep the most half-sensitive layers in fp32 "
                                       "(measured with nnsqueeze.sensitivity)")


@STEPS.register("half")
class Half(Step):
    """fp16 / bf16 layers; see the module docstring."""
    needs_float = True
    quantizes = True
    trainable_after = False

    Config = HalfConfig
    default_targets = ["Linear", "Conv1d", "Conv2d", "Embedding"]

    def __init__(self, config: HalfConfig, index: int = 0):
        super().__init__(config, index)
        self._record: dict[str, Any] = {}

    def select(self, model: nn.Module, ctx: Any, supported: tuple[type, ...]) -> Any:
        present = {type(m).__name__ for m in model.modules()}  # defaults are a menu, as in quantize
        self.default_targets = [t for t in type(self).default_targets if t in present] or \
            list(type(self).default_targets)
        return super().select(model, ctx, supported)

    def run(self, model: nn.Module, ctx) -> nn.Module:
        name, args = self.registered_name, half_args(self.config.dtype)
        todo = []
        for lname, mod in self.select(model, ctx, supported=tuple(HALF_MAP)).layers:
            if type(mod) not in HALF_MAP:
                ctx.skip(name, lname, f"{type(mod).__name__} is not a plain Linear/Conv1d/Conv2d/Embedding")
                continue
            if isinstance(mod.padding if hasattr(mod, "padding") else 0, str) and self.config.dtype == "bfloat16":
                ctx.skip(name, lname, "bf16 export needs numeric padding (padding='same'/'valid' given)")
                continue
            todo.append((lname, mod))
        kept: dict[str, str] = {}
        whole: dict[str, Any] = {}  # the converted model's figures with the kept layers in fp32
        if self.config.keep_fp32 is not None and todo:
            kept, whole = self._keep_fp32(model, [n for n, _ in todo], ctx)
            for lname, why in kept.items():
                ctx.skip(name, lname, why)
        layers = []
        for lname, mod in todo:
            if lname in kept:
                continue
            convert(mod, args)
            layers.append(lname)
            ctx.report.layer(lname, bits=16, act_bits=16, scheme=self.config.dtype)
        if not layers and kept:
            raise ModelError(f"{self.where}.keep_fp32", f"every layer had to stay fp32 to meet the budget "
                             f"({whole} with all {len(kept)} kept)",
                             fix="loosen max_metric_drop / min_sqnr_db, or drop the half step")
        if not layers:
            raise ModelError(self.where, "no plain Linear/Conv1d/Conv2d left to convert",
                             fix="target plain nn.Linear / nn.Conv1d / nn.Conv2d modules")
        self._record = {"layers": layers, "dtype": self.config.dtype}
        ctx.report.step(converted_layers=len(layers), dtype=self.config.dtype)
        if kept:
            self._record["kept_fp32"] = list(kept)
            ctx.report.step(kept_fp32=list(kept), **whole)
        return model

    def _keep_fp32(self, model: nn.Module, names: list[str], ctx) -> tuple[dict[str, str], dict[str, Any]]:
        """({layer: reason} for the layers kept in fp32, most sensitive first; the whole converted
        model's measured figures with them kept), see the module docstring. The choice is the
        ``mixed`` step's (``formats: [fp16 or bf16, fp32], search: raise``), with both bounds applied."""
        from ..metrics import get_metric
        from ..sensitivity import HALF_FORMATS
        from .mixed_precision import MixedPrecision, Quality

        k, where = self.config.keep_fp32, f"{self.where}.keep_fp32"
        calib = ctx.calib_data if ctx.calib_data is not None else ctx.train_data
        if calib is None:
            raise DataError(where, "keep_fp32 measures each layer's half-precision sensitivity and needs "
                            "calibration data", fix="pass calib_data=... (a few hundred representative examples)")
        metric_fn = get_metric(ctx.metric)[0] if ctx.eval_data is not None else None
        if k.max_metric_drop is not None and metric_fn is None:
            raise DataError(where, "max_metric_drop needs eval data and a metric",
                            fix="pass eval_data=... and metric=..., or use min_sqnr_db / most_sensitive")
        fmt = {v: f for f, v in HALF_FORMATS.items()}[self.config.dtype]
        mixed = MixedPrecision(MixedPrecision.Config.model_validate({
            "formats": [fmt, "fp32"], "search": "raise", "min_raised": k.most_sensitive or 0,
            "calibration": {"samples": k.samples}}), self.index)
        mixed.registered_name = self.registered_name
        was_training = model.training
        model.eval()
        try:
            a = mixed.allocate(model, ctx, calib, names=names, metric=metric_fn, whole_sqnr=True,
                               quality=Quality(max_metric_drop=k.max_metric_drop, min_sqnr_db=k.min_sqnr_db))
        finally:
            model.train(was_training)
        whole = {f"whole_model_{key}": (v if math.isfinite(v) else str(v)) for key, v in a.whole.items()}
        if not a.quality_met:  # all layers kept (the fp32 model) still misses: a noisy metric; say so
            ctx.fallback(self.registered_name, f"keep_fp32 budget not met: {whole}")
        by = {r["layer"]: r for r in a.rows}
        out = {}
        for i, lname in enumerate(a.ranking[:a.raised]):
            r = by[lname]
            figs = [f"output SQNR {r['sqnr_db']:.1f} dB"]
            if "metric_drop" in r:
                figs.insert(0, f"metric drop {r['metric_drop']:+.4f}")
            out[lname] = f"kept fp32: #{i + 1} most {fmt}-sensitive ({fmt} alone: {', '.join(figs)})"
        return out, whole

    def record(self) -> dict[str, Any]:
        return self._record

    @classmethod
    def rebuild(cls, model: nn.Module, config: HalfConfig, record: dict[str, Any]) -> nn.Module:
        args = half_args(record.get("dtype", config.dtype))
        for lname in record.get("layers", []):
            mod = recorded_module(model, lname, (nn.Module,), "half record")
            if not isinstance(mod, HalfMixin):
                convert(mod, args)
        return model
