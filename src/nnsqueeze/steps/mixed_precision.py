"""The ``mixed`` step: a weight format per layer among candidates (e.g. int8 / int4 / fp32) chosen to
meet a size budget (bytes), a latency budget (measured in ONNX Runtime) and/or a quality budget (max
metric drop, or min output SQNR), keeping the most sensitive layers at higher precision. Recipe::

    - mixed:
        formats: [int8, int4, fp32]
        budget: {size_ratio: 0.25, max_metric_drop: 0.003}   # also size_bytes, min_sqnr_db, latency_ms
        calibration: {method: minmax, samples: 512}

The result is the ``quantize`` step with per-layer ``layer_weights`` (fp32 layers ignored), so export,
record and rebuild are quantize's; each layer's format is in the report.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..errors import DataError
from ..registry import STEPS
from .base import Step, StepConfig
from .quantize import CalibrationConfig, Quantize


class _StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MixedBudget(_StrictModel):
    size_bytes: int | None = Field(None, ge=1, description="largest estimated weight bytes (packed codes, "
                                   "scales, biases; fp32 layers at 4 bytes per parameter)")
    size_ratio: float | None = Field(None, gt=0, description="largest estimated bytes / fp32 bytes")
    max_metric_drop: float | None = Field(None, ge=0, description="largest metric drop of the whole model "
                                          "(needs eval data and a metric); else min_sqnr_db applies")
    min_sqnr_db: float | None = Field(None, description="smallest output SQNR (dB) vs fp32 on calib data")
    latency_ms: float | None = Field(None, gt=0, description="largest ONNX Runtime latency (ms, median) of the "
                                     "exported model on the first calibration batch, measured on this machine")
    latency_threads: int = Field(1, ge=1, description="intra-op threads for the latency measurement")
    latency_runs: int = Field(20, ge=3, description="timed runs (median)")


class MixedPrecisionConfig(StepConfig):
    formats: list[str] = Field(default_factory=lambda: ["int8", "int4", "fp32"],
                               description="candidate formats (nnsqueeze.sensitivity.FORMATS names, or fp32)")
    budget: MixedBudget = Field(default_factory=MixedBudget)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)


def format_bytes(layer: nn.Module, fmt: str) -> int:
    """Estimated stored bytes of a layer's parameters in ``fmt`` (what the artifact packs)."""
    from ..sensitivity import FORMATS

    n_w = layer.weight.numel()
    n_b = 0 if layer.bias is None else layer.bias.numel()
    if fmt == "fp32":
        return 4 * (n_w + n_b)
    bits = FORMATS[fmt]["bits"]
    codes = (n_w + 1) // 2 if bits <= 4 else n_w
    rows = layer.weight.shape[0]
    return codes + 4 * rows + 4 * n_b + (64 if FORMATS[fmt].get("levels") else 0)


@STEPS.register("mixed")
class MixedPrecision(Step):
    """Per-layer format allocation; see the ``mixed`` recipe in docs/quantization.md.

    1. Sensitivity: every layer alone in every candidate format, as output noise power
       ``10**(-SQNR/10)`` against fp32 on the calibration data (and metric drop when eval data and a
       metric are given, reported).
    2. Greedy allocation from all-``fp32``-or-highest-format down: repeatedly take the one-layer
       move to the next cheaper format with the least added noise per byte saved, until the size
       budget holds; then, for ``max_metric_drop``/``min_sqnr_db``, keep lowering while the WHOLE
       quantized model (measured) stays within the budget, or raise back the last moves until it does.
    3. The model is quantized by the ``quantize`` step with per-layer ``layer_weights`` (fp32 layers
       ignored); each layer's format is in the report.
    """

    Config = MixedPrecisionConfig
    default_targets = ["Linear", "Conv1d", "Conv2d"]

    def __init__(self, config: MixedPrecisionConfig, index: int = 0):
        super().__init__(config, index)
        from ..errors import RecipeError
        from ..sensitivity import FORMATS

        bad = [f for f in config.formats if f != "fp32" and f not in FORMATS]
        if bad or not config.formats:
            raise RecipeError(f"{self.where}.formats", f"unknown formats {bad}" if bad else "no format given",
                              fix=f"choose among fp32, {', '.join(FORMATS)}")
        self._record: dict[str, Any] = {}

    def _order(self, model: nn.Module, names: list[str]) -> list[str]:
        """Formats from most to least bytes (fp32 first)."""
        layer = model.get_submodule(names[0])
        return sorted(self.config.formats, key=lambda f: -format_bytes(layer, f))

    def _qconfig(self, alloc: dict[str, str]) -> Any:
        from ..sensitivity import FORMATS

        keep = [n for n, f in alloc.items() if f == "fp32"]
        lw = {n: {**FORMATS[f], "reduce_range": self._rr} for n, f in alloc.items() if f != "fp32"}
        return Quantize.Config.model_validate({
            "targets": [n for n, f in alloc.items() if f != "fp32"] or list(self.config.targets),
            "ignore": list(self.config.ignore) + keep, "layer_weights": lw,
            "calibration": self.config.calibration.model_dump()})

    def _quantized_copy(self, model: nn.Module, alloc: dict[str, str], calib, ctx) -> nn.Module:
        import copy
        import logging

        from ..context import Context

        if all(f == "fp32" for f in alloc.values()):
            return copy.deepcopy(model).eval()
        qctx = Context(calib_data=calib, progress=False, log=logging.getLogger("nnsqueeze.mixed.trial"),
                       device=ctx.device)
        qctx.report.begin_step("quantize", {})
        return Quantize(self._qconfig(alloc), self.index).run(copy.deepcopy(model), qctx).eval()

    def _latency(self, model: nn.Module, alloc: dict[str, str], calib, ctx) -> float:
        """Median ONNX Runtime latency (ms) of the model quantized with ``alloc``, first calib batch."""
        import statistics
        import tempfile
        import time
        from pathlib import Path

        from ..data import split
        from ..export.onnx import export_onnx
        from ..export.ort import OrtModule

        b = self.config.budget
        q = self._quantized_copy(model, alloc, calib, ctx)
        x, _ = split(next(iter(calib)))
        with tempfile.TemporaryDirectory() as d:
            export_onnx(q, Path(d) / "m.onnx", x, verify=False)
            ort_model = OrtModule((Path(d) / "m.onnx").read_bytes(), threads=b.latency_threads)
        for _ in range(3):
            ort_model(x)
        times = []
        for _ in range(b.latency_runs):
            t = time.perf_counter()
            ort_model(x)
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)

    def run(self, model: nn.Module, ctx) -> nn.Module:
        from ..data import take
        from ..sensitivity import output_sqnr, quantizable_layers, sensitivity, _resolve_reduce_range

        cfg, name, b = self.config, self.registered_name, self.config.budget
        calib = ctx.calib_data if ctx.calib_data is not None else ctx.train_data
        if calib is None:
            raise DataError(f"{self.where}.calibration", "mixed precision needs calibration data",
                            fix="pass calib_data=... (a few hundred representative examples)")
        self._rr = _resolve_reduce_range({"bits": 8})["reduce_range"]
        model.eval()
        names = [n for n, _ in quantizable_layers(model, list(cfg.targets) or None, list(cfg.ignore))]
        order = self._order(model, names)
        quant_formats = [f for f in order if f != "fp32"]
        use_metric = b.max_metric_drop is not None and ctx.eval_data is not None and ctx.metric is not None
        if b.max_metric_drop is not None and not use_metric:
            ctx.fallback(name, "max_metric_drop needs eval data and a metric; using min_sqnr_db (30 dB if unset)")
        min_sqnr = b.min_sqnr_db if b.min_sqnr_db is not None else (30.0 if b.max_metric_drop is not None and not use_metric else None)
        rows = sensitivity(model, calib, formats=quant_formats, targets=names, ignore=list(cfg.ignore),
                           calibration=cfg.calibration.model_dump(), reduce_range=self._rr, device=ctx.device)
        noise = {(r["layer"], r["format"]): (0.0 if r["sqnr_db"] == math.inf else 10 ** (-r["sqnr_db"] / 10))
                 for r in rows}
        for n in names:
            noise[(n, "fp32")] = 0.0
        size = {(n, f): format_bytes(model.get_submodule(n), f) for n in names for f in order}
        other = sum(p.numel() * 4 for p in model.parameters()) - sum(size[(n, "fp32")] for n in names)
        fp32_total = sum(p.numel() * 4 for p in model.parameters())
        limit = min([x for x in (b.size_bytes, None if b.size_ratio is None else b.size_ratio * fp32_total)
                     if x is not None], default=None)

        alloc = {n: order[0] for n in names}
        total = lambda a: other + sum(size[(n, f)] for n, f in a.items())  # noqa: E731
        moves: list[tuple[str, str]] = []

        def next_move(a):
            best = None
            for n in names:
                i = order.index(a[n])
                if i + 1 >= len(order):
                    continue
                f = order[i + 1]
                saved = size[(n, a[n])] - size[(n, f)]
                if saved <= 0:
                    continue
                cost = (noise[(n, f)] - noise[(n, a[n])]) / saved
                if best is None or cost < best[0]:
                    best = (cost, n, f)
            return best

        while limit is not None and total(alloc) > limit:
            mv = next_move(alloc)
            if mv is None:
                break
            moves.append((mv[1], alloc[mv[1]]))
            alloc[mv[1]] = mv[2]
        size_met = limit is None or total(alloc) <= limit
        latency = None
        if b.latency_ms is not None:  # measured: keep lowering (same greedy order) until fast enough
            latency = self._latency(model, alloc, calib, ctx)
            while latency > b.latency_ms:
                mv = next_move(alloc)
                if mv is None:
                    break
                alloc[mv[1]] = mv[2]
                latency = self._latency(model, alloc, calib, ctx)
            if latency > b.latency_ms:
                ctx.fallback(name, f"latency budget {b.latency_ms} ms not met: {latency:.3f} ms with every layer "
                             "at its cheapest format")
        if not size_met:
            ctx.fallback(name, f"size budget {limit:.0f} bytes not reachable with {order}: smallest is "
                         f"{total(alloc)} bytes")

        sqnr_data = take(calib, cfg.calibration.samples)
        base = float(ctx.metric(model, ctx.eval_data)) if use_metric else None
        trials = 0

        def measure(a) -> float:
            nonlocal trials
            trials += 1
            if all(f == "fp32" for f in a.values()):
                return 0.0 if use_metric else math.inf
            q = self._quantized_copy(model, a, calib, ctx)
            return base - float(ctx.metric(q, ctx.eval_data)) if use_metric else output_sqnr(model, q, sqnr_data, ctx.device)

        def ok(v: float) -> bool:
            if use_metric:
                return v <= b.max_metric_drop
            return min_sqnr is None or v >= min_sqnr

        value = measure(alloc) if (use_metric or min_sqnr is not None) else None
        quality_met = value is None or ok(value)
        if value is not None:
            if quality_met:  # room left: keep lowering while the whole model stays within budget
                while True:
                    mv = next_move(alloc)
                    if mv is None:
                        break
                    trial = {**alloc, mv[1]: mv[2]}
                    v = measure(trial)
                    if not ok(v):
                        break
                    alloc, value = trial, v
            elif not (limit is not None):  # quality only: nothing to undo
                pass
            if not ok(value):
                ctx.fallback(name, f"quality budget not met at the size budget: "
                             f"{'metric drop' if use_metric else 'output SQNR'} {value:.4g}")
        quality_met = value is None or ok(value)
        latency_met = latency is None or latency <= b.latency_ms

        for n, f in alloc.items():
            if f == "fp32":
                ctx.skip(name, n, "kept fp32 by the mixed-precision allocation")
        if all(f == "fp32" for f in alloc.values()):
            self._record = {"formats": alloc, "quantize": None}
            ctx.report.step(formats=alloc, budget_met=size_met and quality_met and latency_met,
                            **({} if latency is None else {"latency_ms": round(latency, 4),
                                                           "latency_budget_ms": b.latency_ms}))
            return model
        qstep = Quantize(self._qconfig(alloc), self.index)
        qstep.registered_name = name
        model = qstep.run(model, ctx)
        for n, f in alloc.items():
            if f != "fp32":
                ctx.report.layer(n, format=f)
        self._record = {"formats": alloc, "reduce_range": self._rr, "quantize": qstep.record()}
        figures: dict[str, Any] = {"formats": alloc, "size_bytes_estimate": total(alloc),
                                   "size_ratio_estimate": round(total(alloc) / fp32_total, 4),
                                   "size_budget_bytes": None if limit is None else int(limit),
                                   "budget_met": size_met and quality_met and latency_met, "trials": trials}
        if latency is not None:
            figures["latency_ms"] = round(latency, 4)
            figures["latency_budget_ms"] = b.latency_ms
        if value is not None:
            figures["metric_drop" if use_metric else "output_sqnr_db"] = value if math.isfinite(value) else None
        ctx.report.step(**figures)
        return model

    def record(self) -> dict[str, Any]:
        return self._record

    @classmethod
    def rebuild(cls, model: nn.Module, config: MixedPrecisionConfig, record: dict[str, Any]) -> nn.Module:
        if not record.get("quantize"):
            return model
        self = cls.__new__(cls)
        self.config, self._rr = config, record.get("reduce_range", False)
        return Quantize.rebuild(model, self._qconfig(record["formats"]), record["quantize"])
