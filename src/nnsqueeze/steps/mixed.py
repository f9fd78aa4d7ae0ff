"""The ``mixed-int8`` step: static int8 everywhere except the most sensitive layers, kept fp32.

An alias of the ``mixed`` step (:mod:`nnsqueeze.steps.mixed_precision`), kept for its presets,
recipes and artifacts: its config maps onto ``mixed`` with ``formats: [int8, fp32]`` and
``search: raise``, which runs :func:`nnsqueeze.sensitivity.sensitivity` (one layer quantized at a
time), then quantizes all layers except the ``k`` most sensitive, for ``k = 0, 1, ...``, measuring
the WHOLE quantized model, and stops at the first ``k`` that meets the budget. The result is the
``quantize`` step run with ``ignore:`` the kept layers, so export, record and rebuild are quantize's
(the record is this step's own, so artifacts saved before the merge load unchanged). Recipe::

    - mixed-int8:
        max_metric_drop: 0.01     # needs eval data and a metric; else min_sqnr_db on calib data
        max_size_ratio: null      # cap on (estimated weight bytes) / (fp32 weight bytes)
        calibration: {method: minmax, samples: 512}

Without eval data or a metric, the budget falls back to the output SQNR (``min_sqnr_db``) against
fp32 on the calibration data, noted in the report. If no ``k`` meets the budget within
``max_size_ratio`` (or with one layer still quantized), the closest allowed ``k`` is used and noted.
The same as a ``mixed`` recipe::

    >>> cfg = MixedInt8(MixedConfig(max_metric_drop=0.02)).mixed_config()
    >>> cfg.formats, cfg.search, cfg.budget.max_metric_drop, cfg.budget.min_sqnr_db
    (['int8', 'fp32'], 'raise', 0.02, 30.0)

(``mixed-int8`` estimates an int8 layer as 1 byte per weight, its bias in fp32, no scales, and never
fails on a size cap it cannot meet: both set on the ``mixed`` step it runs.)
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import Field
from torch import nn

from ..errors import DataError
from ..registry import STEPS
from .base import Step, StepConfig
from .mixed_precision import MixedPrecision, MixedPrecisionConfig
from .quantize import CalibrationConfig, Quantize


class MixedConfig(StepConfig):
    max_metric_drop: float | None = Field(0.01, ge=0, description="largest allowed metric drop of the whole "
                                          "quantized model (needs eval data and a metric)")
    max_size_ratio: float | None = Field(None, gt=0, description="largest (estimated weight bytes) / "
                                         "(fp32 weight bytes); limits how many layers stay fp32")
    min_sqnr_db: float = Field(30.0, description="budget used instead of max_metric_drop when there is no "
                               "eval data or metric: output SQNR (dB) vs fp32 on the calibration data")
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)


def int8_weight_bytes(layer: nn.Module, fmt: str) -> int:
    """``mixed-int8``'s size estimate: fp32 4 bytes per parameter; int8 1 byte per weight, bias fp32."""
    n_b = 0 if getattr(layer, "bias", None) is None else layer.bias.numel()
    return (4 if fmt == "fp32" else 1) * layer.weight.numel() + 4 * n_b


@STEPS.register("mixed-int8")
class MixedInt8(Step):
    """Mixed int8/fp32 static quantization; see the module docstring."""
    needs_float = True
    quantizes = True

    Config = MixedConfig
    default_targets = ["Linear", "Conv1d", "Conv2d"]

    def __init__(self, config: MixedConfig, index: int = 0):
        super().__init__(config, index)
        self._record: dict[str, Any] = {}

    def mixed_config(self) -> MixedPrecisionConfig:
        """This config as the ``mixed`` step's."""
        cfg = self.config
        return MixedPrecisionConfig.model_validate({
            "targets": list(cfg.targets), "ignore": list(cfg.ignore), "formats": ["int8", "fp32"],
            "search": "raise", "calibration": cfg.calibration.model_dump(),
            "budget": {"max_metric_drop": cfg.max_metric_drop, "min_sqnr_db": cfg.min_sqnr_db,
                       "size_ratio": cfg.max_size_ratio}})

    def _quantize_config(self, ignore: list[str]):
        return Quantize.Config.model_validate({
            "targets": list(self.config.targets), "ignore": list(self.config.ignore) + list(ignore),
            "calibration": self.config.calibration.model_dump()})

    def run(self, model: nn.Module, ctx) -> nn.Module:
        name = self.registered_name
        calib = ctx.calib_data
        if calib is None and ctx.train_data is not None:
            ctx.fallback(name, "no calib_data given; calibrating on train_data")
            calib = ctx.train_data
        if calib is None:
            raise DataError(f"{self.where}.calibration", "mixed precision needs calibration data",
                            fix="pass calib_data=... (a few hundred representative examples)")
        model.eval()
        mixed = MixedPrecision(self.mixed_config(), self.index)
        mixed.registered_name = name
        mixed.layer_bytes, mixed.size_error, mixed.keep_one_lowered = int8_weight_bytes, False, True
        a = mixed.allocate(model, ctx, calib)
        use_metric = a.quality.max_metric_drop is not None
        keep, k = a.ranking[:a.raised], a.raised
        if not a.quality_met:
            why = "max_size_ratio" if a.raise_max < len(a.ranking) - 1 else "one layer must stay quantized"
            ctx.fallback(name, f"the budget is not met: {k} layer(s) kept fp32 is the most allowed ({why})")
        score = {r["layer"]: (r["metric_drop"] if use_metric else r["sqnr_db"]) for r in a.rows}
        for layer in keep:
            ctx.skip(name, layer, f"kept fp32: sensitivity {'metric drop' if use_metric else 'SQNR'} "
                     f"{score[layer]:.4g}{'' if use_metric else ' dB'}")
        qstep = Quantize(self._quantize_config(keep), self.index)
        qstep.registered_name = name
        model = qstep.run(model, ctx)
        self._record = {"ignore": keep, "quantize": qstep.record()}
        figures: dict[str, Any] = {
            "kept_fp32": len(keep), "kept_layers": keep, "sensitivity_mode": "metric" if use_metric else "sqnr",
            "budget_met": a.quality_met, "trials": a.trials,
            "size_ratio_estimate": round(a.bytes() / a.fp32_bytes, 4)}
        if use_metric:
            figures["metric_drop"] = a.whole["metric_drop"]
        else:
            value = a.whole["output_sqnr_db"]
            figures["output_sqnr_db"] = value if math.isfinite(value) else None
        ctx.report.step(**figures)
        return model

    def record(self) -> dict[str, Any]:
        return self._record

    @classmethod
    def rebuild(cls, model: nn.Module, config: MixedConfig, record: dict[str, Any]) -> nn.Module:
        qcfg = Quantize.Config.model_validate({
            "targets": list(config.targets), "ignore": list(config.ignore) + list(record.get("ignore", [])),
            "calibration": config.calibration.model_dump()})
        return Quantize.rebuild(model, qcfg, record.get("quantize", {}))
