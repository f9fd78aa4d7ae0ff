"""The ``mixed-int8`` step: static int8 everywhere except the most sensitive layers, kept fp32.
(Per-layer formats among int8 / int4 / fp32 ... under a budget: the ``mixed`` step,
:mod:`nnsqueeze.steps.mixed_precision`.)

Runs :func:`nnsqueeze.sensitivity.sensitivity` (one layer quantized at a time), then quantizes all
layers except the ``k`` most sensitive, for ``k = 0, 1, ...``, measuring the WHOLE quantized model,
and stops at the first ``k`` that meets the budget. The result is the ``quantize`` step run with
``ignore:`` the kept layers, so export, record and rebuild are quantize's. Recipe::

    - mixed-int8:
        max_metric_drop: 0.01     # needs eval data and a metric; else min_sqnr_db on calib data
        max_size_ratio: null      # cap on (estimated weight bytes) / (fp32 weight bytes)
        calibration: {method: minmax, samples: 512}

Without eval data or a metric, the budget falls back to the output SQNR (``min_sqnr_db``) against
fp32 on the calibration data, noted in the report. If no ``k`` meets the budget within
``max_size_ratio`` (or with one layer still quantized), the closest allowed ``k`` is used and noted.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import Field
from torch import nn

from ..errors import DataError
from ..registry import STEPS
from .base import Step, StepConfig
from .quantize import CalibrationConfig, Quantize


class MixedConfig(StepConfig):
    max_metric_drop: float | None = Field(0.01, ge=0, description="largest allowed metric drop of the whole "
                                          "quantized model (needs eval data and a metric)")
    max_size_ratio: float | None = Field(None, gt=0, description="largest (estimated weight bytes) / "
                                         "(fp32 weight bytes); limits how many layers stay fp32")
    min_sqnr_db: float = Field(30.0, description="budget used instead of max_metric_drop when there is no "
                               "eval data or metric: output SQNR (dB) vs fp32 on the calibration data")
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)


def _size_ratio(model: nn.Module, quantized: set[str]) -> float:
    """Estimated weight bytes with ``quantized`` layers' weights in int8 over the fp32 bytes."""
    total = sum(p.numel() for p in model.parameters()) * 4
    saved = 0
    for name in quantized:
        w = getattr(model.get_submodule(name), "weight", None)
        if w is not None:
            saved += w.numel() * 3
    return (total - saved) / total if total else 1.0


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

    def _quantize_config(self, ignore: list[str]):
        return Quantize.Config.model_validate({
            "targets": list(self.config.targets), "ignore": list(self.config.ignore) + list(ignore),
            "calibration": self.config.calibration.model_dump()})

    def run(self, model: nn.Module, ctx) -> nn.Module:
        from ..sensitivity import output_sqnr, quantize_copy, sensitivity
        from ..data import take

        cfg, name = self.config, self.registered_name
        calib = ctx.calib_data
        if calib is None and ctx.train_data is not None:
            ctx.fallback(name, "no calib_data given; calibrating on train_data")
            calib = ctx.train_data
        if calib is None:
            raise DataError(f"{self.where}.calibration", "mixed precision needs calibration data",
                            fix="pass calib_data=... (a few hundred representative examples)")
        use_metric = cfg.max_metric_drop is not None and ctx.eval_data is not None and ctx.metric is not None
        if cfg.max_metric_drop is not None and not use_metric:
            ctx.fallback(name, f"max_metric_drop needs eval data and a metric; using output SQNR >= "
                         f"{cfg.min_sqnr_db} dB vs fp32 on the calibration data instead")
        model.eval()
        calibration = cfg.calibration.model_dump()
        rows = sensitivity(model, calib, eval_data=ctx.eval_data if use_metric else None,
                           metric=ctx.metric if use_metric else None, targets=list(cfg.targets) or None,
                           ignore=list(cfg.ignore), calibration=calibration, device=ctx.device)
        ranking = [r["layer"] for r in rows]
        score = {r["layer"]: (r["metric_drop"] if use_metric else r["sqnr_db"]) for r in rows}
        sqnr_data = take(calib, cfg.calibration.samples)
        base = float(ctx.metric(model, ctx.eval_data)) if use_metric else None

        def measure(keep: list[str]) -> float:
            q = quantize_copy(model, calib, targets=list(cfg.targets) or None, ignore=list(cfg.ignore) + keep,
                              calibration=calibration, device=ctx.device)
            return base - float(ctx.metric(q, ctx.eval_data)) if use_metric else \
                output_sqnr(model, q, sqnr_data, ctx.device)

        def ok(v: float) -> bool:
            return v <= cfg.max_metric_drop if use_metric else v >= cfg.min_sqnr_db

        k_max = len(ranking) - 1  # at least one layer stays quantized
        while cfg.max_size_ratio is not None and k_max > 0 and \
                _size_ratio(model, set(ranking[k_max:])) > cfg.max_size_ratio:
            k_max -= 1
        met, value, trials = False, math.nan, 0
        for k in range(k_max + 1):
            value = measure(ranking[:k])
            trials += 1
            if ok(value):
                met = True
                break
        if not met:
            ctx.fallback(name, f"the budget is not met: {k} layer(s) kept fp32 is the most allowed "
                         f"({'max_size_ratio' if k_max < len(ranking) - 1 else 'one layer must stay quantized'})")
        keep = ranking[:k]
        size_ratio = _size_ratio(model, set(ranking[k:]))
        for layer in keep:
            s = score[layer]
            ctx.skip(name, layer, f"kept fp32: sensitivity {'metric drop' if use_metric else 'SQNR'} "
                     f"{s:.4g}{'' if use_metric else ' dB'}")
        qstep = Quantize(self._quantize_config(keep), self.index)
        qstep.registered_name = name
        model = qstep.run(model, ctx)
        self._record = {"ignore": keep, "quantize": qstep.record()}
        figures: dict[str, Any] = {
            "kept_fp32": len(keep), "kept_layers": keep, "sensitivity_mode": "metric" if use_metric else "sqnr",
            "budget_met": met, "trials": trials,
            "size_ratio_estimate": round(size_ratio, 4)}
        if use_metric:
            figures["metric_drop"] = value
        else:
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

