"""The ``mixed`` step: a weight format per layer among candidates (e.g. int4 / int8 / fp16 / fp32)
chosen to meet a size budget (bytes), a latency budget (measured in ONNX Runtime) and/or a quality
budget (max metric drop, or min output SQNR), keeping the most sensitive layers at higher precision.
Recipe::

    - mixed:
        formats: [int4, int8, fp16, fp32]      # also bf16 and every nnsqueeze.sensitivity.FORMATS name
        budget: {size_ratio: 0.3, max_metric_drop: 0.003}   # also size_bytes, min_sqnr_db, latency_ms
        calibration: {method: minmax, samples: 512}

The result is the ``half`` step's conversion on the fp16/bf16 layers (2 bytes per parameter), then the
``quantize`` step with per-layer ``layer_weights`` on the integer layers (fp32 and half layers
ignored), so export and rebuild are theirs; each layer's format and byte figures are in the report.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from ..errors import DataError
from ..limits import cap_threads
from ..registry import STEPS
from .base import Step, StepConfig, recorded_module
from .quantize import CalibrationConfig, Quantize


class _StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MixedBudget(_StrictModel):
    size_bytes: int | None = Field(None, ge=1, description="largest estimated weight bytes (packed codes, "
                                   "scales, biases; fp32 layers at 4 bytes per parameter, fp16/bf16 at 2)")
    size_ratio: float | None = Field(None, gt=0, description="largest estimated bytes / fp32 bytes")
    max_metric_drop: float | None = Field(None, ge=0, description="largest metric drop of the whole model "
                                          "(needs eval data and a metric); else min_sqnr_db applies")
    min_sqnr_db: float | None = Field(None, description="smallest output SQNR (dB) vs fp32 on calib data")
    latency_ms: float | None = Field(None, gt=0, description="largest ONNX Runtime latency (ms, median) of the "
                                     "exported model on the first calibration batch, measured on this machine")
    latency_threads: int = Field(1, ge=1, description="intra-op threads for the latency measurement")
    latency_runs: int = Field(20, ge=3, description="timed runs (median)")

    @field_validator("latency_threads")
    @classmethod
    def _cap_threads(cls, v: int) -> int:
        return cap_threads(v, "latency_threads")


class MixedPrecisionConfig(StepConfig):
    formats: list[str] = Field(default_factory=lambda: ["int8", "int4", "fp32"],
                               description="candidate formats (nnsqueeze.sensitivity.FORMATS names, fp16, "
                               "bf16 or fp32)")
    budget: MixedBudget = Field(default_factory=MixedBudget)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)


def format_bytes(layer: nn.Module, fmt: str) -> int:
    """Estimated stored bytes of a layer's parameters in ``fmt`` (what the artifact packs)."""
    from ..sensitivity import FORMATS, HALF_FORMATS

    n_w = layer.weight.numel()
    n_b = 0 if layer.bias is None else layer.bias.numel()
    if fmt == "fp32":
        return 4 * (n_w + n_b)
    if fmt in HALF_FORMATS:  # the half step stores weight and bias in 16 bits
        return 2 * (n_w + n_b)
    bits = FORMATS[fmt]["bits"]
    codes = (n_w + 1) // 2 if bits <= 4 else n_w
    rows = layer.weight.shape[0]
    return codes + 4 * rows + 4 * n_b + (64 if FORMATS[fmt].get("levels") else 0)


def cheapest_allocation(options: dict[str, list[tuple[str, int, float]]], limit: float,
                        max_states: int = 20000) -> dict[str, str] | None:
    """Exact multiple-choice knapsack: the format per layer with the least total ``noise`` whose total
    ``bytes`` is at most ``limit``. ``options``: {layer: [(format, bytes, noise), ...]}.

    Walks the layers keeping only the Pareto front of partial assignments (fewer bytes or less noise
    than every other), pruned of those that cannot fit even with the cheapest formats left. Returns
    ``None`` when the front grows past ``max_states`` (the caller then uses the greedy), ``{}`` when
    nothing fits. Ties in noise go to fewer bytes. ::

        >>> cheapest_allocation({"a": [("fp32", 40, 0.0), ("int8", 10, 0.1)],
        ...                      "b": [("fp32", 40, 0.0), ("int8", 10, 0.2)]}, limit=50)
        {'a': 'int8', 'b': 'fp32'}
    """
    names = list(options)
    rest = [0] * (len(names) + 1)  # cheapest bytes of layers i.. (to prune hopeless partial states)
    for i in range(len(names) - 1, -1, -1):
        rest[i] = rest[i + 1] + min(b for _, b, _ in options[names[i]])
    front: list[tuple[int, float, tuple[str, ...]]] = [(0, 0.0, ())]
    for i, n in enumerate(names):
        grown = [(b + fb, z + fz, ch + (f,)) for b, z, ch in front for f, fb, fz in options[n]
                 if b + fb + rest[i + 1] <= limit]
        grown.sort(key=lambda s: (s[0], s[1]))
        front = []
        for st in grown:  # bytes ascending: keep a state only if it beats every cheaper one on noise
            if not front or st[1] < front[-1][1]:
                front.append(st)
        if len(front) > max_states:
            return None
    if not front:
        return {}
    best = min(front, key=lambda s: (s[1], s[0]))
    return dict(zip(names, best[2]))


@STEPS.register("mixed")
class MixedPrecision(Step):
    """Per-layer format allocation; see the ``mixed`` recipe in docs/quantization.md.

    1. Sensitivity: every layer alone in every candidate format (int formats through the
       ``quantize`` step, fp16/bf16 through the ``half`` step's conversion), as output noise power
       ``10**(-SQNR/10)`` against fp32 on the calibration data.
    2. Size budget: the assignment with the least summed noise whose estimated bytes fit, found
       exactly (Pareto front over the layers; greedy past 20000 front states). A budget below the
       smallest achievable size is a :class:`RecipeError` naming both figures.
    3. Latency / quality budgets: from there, repeatedly take the one-layer move to a cheaper format
       with the least added noise per byte saved: while the ONNX Runtime latency (measured) is over
       ``latency_ms``, then while the WHOLE model (measured) stays within ``max_metric_drop`` /
       ``min_sqnr_db``.
    4. The fp16/bf16 layers are converted as the ``half`` step converts them, then the int layers
       are quantized by the ``quantize`` step (``layer_weights``; fp32 and half layers ignored), so
       calibration sees the half layers as they will run. Each layer's format is in the report.
    """
    needs_float = True
    quantizes = True
    trainable_after = False

    Config = MixedPrecisionConfig
    default_targets = ["Linear", "Conv1d", "Conv2d"]

    def __init__(self, config: MixedPrecisionConfig, index: int = 0):
        super().__init__(config, index)
        from ..errors import RecipeError
        from ..sensitivity import FORMATS, HALF_FORMATS

        bad = [f for f in config.formats if f != "fp32" and f not in FORMATS and f not in HALF_FORMATS]
        if bad or not config.formats:
            raise RecipeError(f"{self.where}.formats", f"unknown formats {bad}" if bad else "no format given",
                              fix=f"choose among fp32, {', '.join(HALF_FORMATS)}, {', '.join(FORMATS)}")
        self._record: dict[str, Any] = {}

    def _qconfig(self, alloc: dict[str, str]) -> Any:
        from ..sensitivity import FORMATS

        ints = [n for n, f in alloc.items() if f in FORMATS]
        lw = {n: {**FORMATS[alloc[n]], "reduce_range": self._rr} for n in ints}
        return Quantize.Config.model_validate({
            "targets": ints or list(self.config.targets),
            "ignore": list(self.config.ignore) + [n for n in alloc if n not in lw], "layer_weights": lw,
            "calibration": self.config.calibration.model_dump()})

    @staticmethod
    def _convert_half(model: nn.Module, alloc: dict[str, str]) -> dict[str, str]:
        """The half step's conversion of the fp16/bf16 layers of ``alloc``, in place; {layer: dtype}."""
        from ..quant.half import DTYPES, convert_half_
        from ..sensitivity import HALF_FORMATS

        half = {n: HALF_FORMATS[f] for n, f in alloc.items() if f in HALF_FORMATS}
        for n, dtype in half.items():
            convert_half_(model.get_submodule(n), DTYPES[dtype])
        return half

    def _quantized_copy(self, model: nn.Module, alloc: dict[str, str], calib, ctx) -> nn.Module:
        import copy
        import logging

        from ..context import Context
        from ..sensitivity import FORMATS

        q = copy.deepcopy(model).eval()
        self._convert_half(q, alloc)
        if not any(f in FORMATS for f in alloc.values()):
            return q
        qctx = Context(calib_data=calib, progress=False, log=logging.getLogger("nnsqueeze.mixed.trial"),
                       device=ctx.device)
        qctx.report.begin_step("quantize", {})
        return Quantize(self._qconfig(alloc), self.index).run(q, qctx).eval()

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
        from ..errors import RecipeError
        from ..sensitivity import (FORMATS, HALF_FORMATS, resolve_reduce_range, half_layers, output_sqnr,
                                   quantizable_layers, sensitivity)

        cfg, name, b = self.config, self.registered_name, self.config.budget
        calib = ctx.calib_data if ctx.calib_data is not None else ctx.train_data
        if calib is None:
            raise DataError(f"{self.where}.calibration", "mixed precision needs calibration data",
                            fix="pass calib_data=... (a few hundred representative examples)")
        self._rr = resolve_reduce_range({"bits": 8})["reduce_range"]
        model.eval()
        names = [n for n, _ in quantizable_layers(model, list(cfg.targets) or None, list(cfg.ignore))]
        # Formats each layer can take (the half step leaves subclasses and bf16 string-padded convs),
        # from most to fewest bytes; ties keep the recipe's order.
        can_half = {f: {n for n, _ in half_layers(model, names, list(cfg.ignore), d)} for f, d in HALF_FORMATS.items()}
        size = {(n, f): format_bytes(model.get_submodule(n), f) for n in names for f in cfg.formats}
        order = {n: sorted([f for f in cfg.formats if f not in HALF_FORMATS or n in can_half[f]],
                           key=lambda f, n=n: -size[(n, f)]) for n in names}
        fp32_total = sum(p.numel() * 4 for p in model.parameters())
        other = fp32_total - sum(format_bytes(model.get_submodule(n), "fp32") for n in names)
        limit = min([x for x in (b.size_bytes, None if b.size_ratio is None else b.size_ratio * fp32_total)
                     if x is not None], default=None)
        total = lambda a: other + sum(size[(n, f)] for n, f in a.items())  # noqa: E731
        smallest = {n: order[n][-1] for n in names}
        if limit is not None and total(smallest) > limit:  # no assignment fits: say so before measuring
            key = "size_bytes" if b.size_bytes is not None and b.size_bytes <= limit else "size_ratio"
            raise RecipeError(f"{self.where}.budget.{key}",
                              f"size budget {limit:.0f} bytes ({limit / fp32_total:.4f} of fp32) cannot be met "
                              f"with formats {list(cfg.formats)}: the smallest achievable is {total(smallest)} "
                              f"bytes ({total(smallest) / fp32_total:.4f} of fp32), every layer at its cheapest "
                              f"format{'' if other == 0 else f', {other} bytes of other parameters in fp32'}",
                              fix=f"raise the budget to at least {total(smallest)} bytes, or add a cheaper format "
                                  "(e.g. int4)")
        use_metric = b.max_metric_drop is not None and ctx.eval_data is not None and ctx.metric is not None
        if b.max_metric_drop is not None and not use_metric:
            ctx.fallback(name, "max_metric_drop needs eval data and a metric; using min_sqnr_db (30 dB if unset)")
        min_sqnr = b.min_sqnr_db if b.min_sqnr_db is not None else (
            30.0 if b.max_metric_drop is not None and not use_metric else None)
        measured = [f for f in cfg.formats if f != "fp32"]
        rows = sensitivity(model, calib, formats=measured, targets=names, ignore=list(cfg.ignore),
                           calibration=cfg.calibration.model_dump(), reduce_range=self._rr,
                           device=ctx.device) if measured else []
        sqnr = {(r["layer"], r["format"]): r["sqnr_db"] for r in rows}
        for n in names:
            sqnr[(n, "fp32")] = math.inf
        noise = {k: (0.0 if v == math.inf else 10 ** (-v / 10)) for k, v in sqnr.items()}

        allocator = None
        if limit is None:
            alloc = {n: order[n][0] for n in names}
        else:
            alloc = cheapest_allocation({n: [(f, size[(n, f)], noise[(n, f)]) for f in order[n]] for n in names},
                                        limit - other) or None
            allocator = "exact" if alloc else "greedy"
            alloc = alloc or {n: order[n][0] for n in names}

        def next_move(a):
            """(noise added per byte saved, layer, format) of the best one-layer move to fewer bytes."""
            best = None
            for n in names:
                for f in order[n]:
                    saved = size[(n, a[n])] - size[(n, f)]
                    if saved <= 0:
                        continue
                    new, cur = noise[(n, f)], noise[(n, a[n])]
                    cost = (0.0 if new == cur else new - cur) / saved  # inf - inf: no change
                    if best is None or (cost, -saved) < best[:2]:
                        best = (cost, -saved, n, f)
            return None if best is None else (best[0], best[2], best[3])

        while limit is not None and total(alloc) > limit:  # greedy (huge fronts only); all-cheapest fits
            _, n_, f_ = next_move(alloc)
            alloc[n_] = f_
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

        sqnr_data = take(calib, cfg.calibration.samples)
        base = float(ctx.metric(model, ctx.eval_data)) if use_metric else None
        trials = 0

        def measure(a) -> float:
            nonlocal trials
            trials += 1
            if all(f == "fp32" for f in a.values()):
                return 0.0 if use_metric else math.inf
            q = self._quantized_copy(model, a, calib, ctx)
            if use_metric:
                return base - float(ctx.metric(q, ctx.eval_data))
            return output_sqnr(model, q, sqnr_data, ctx.device)

        def ok(v: float) -> bool:
            if use_metric:
                return v <= b.max_metric_drop
            return min_sqnr is None or v >= min_sqnr

        value = measure(alloc) if (use_metric or min_sqnr is not None) else None
        if value is not None:
            if ok(value):  # room left: keep lowering while the whole model stays within budget
                while True:
                    mv = next_move(alloc)
                    if mv is None:
                        break
                    trial = {**alloc, mv[1]: mv[2]}
                    v = measure(trial)
                    if not ok(v):
                        break
                    alloc, value = trial, v
            else:
                ctx.fallback(name, f"quality budget not met at the size budget: "
                             f"{'metric drop' if use_metric else 'output SQNR'} {value:.4g}")
        quality_met = value is None or ok(value)
        latency_met = latency is None or latency <= b.latency_ms

        for n, f in alloc.items():
            if f == "fp32":
                ctx.skip(name, n, "kept fp32 by the mixed-precision allocation")
        if all(f == "fp32" for f in alloc.values()):
            self._record = {"formats": alloc, "quantize": None}
            ctx.report.step(formats=alloc, budget_met=quality_met and latency_met,
                            **({} if latency is None else {"latency_ms": round(latency, 4),
                                                           "latency_budget_ms": b.latency_ms}))
            return model
        half = self._convert_half(model, alloc)
        qrec = None
        if any(f in FORMATS for f in alloc.values()):
            qstep = Quantize(self._qconfig(alloc), self.index)
            qstep.registered_name = name
            model = qstep.run(model, ctx)
            qrec = qstep.record()
        for n, f in alloc.items():  # the format and the figures that chose it
            cands = {g: {"bytes": size[(n, g)], "sqnr_db_alone": _finite(sqnr.get((n, g)))} for g in order[n]}
            fields: dict[str, Any] = {"format": f, "bytes_estimate": size[(n, f)], "candidates": cands}
            if f in HALF_FORMATS:
                fields.update(bits=16, act_bits=16, scheme=HALF_FORMATS[f])
            ctx.report.layer(n, **fields)
        self._record = {"formats": alloc, "reduce_range": self._rr, "half": half, "quantize": qrec}
        figures: dict[str, Any] = {"formats": alloc, "size_bytes_estimate": total(alloc),
                                   "size_ratio_estimate": round(total(alloc) / fp32_total, 4),
                                   "size_budget_bytes": None if limit is None else int(limit),
                                   "smallest_size_bytes": total(smallest), "allocator": allocator,
                                   "budget_met": quality_met and latency_met, "trials": trials}
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
        from ..quant.half import DTYPES, HalfMixin, convert_half_

        for lname, dtype in record.get("half", {}).items():  # first, as in run()
            mod = recorded_module(model, lname, (nn.Module,), "mixed record")
            if not isinstance(mod, HalfMixin):
                convert_half_(mod, DTYPES[dtype])
        if not record.get("quantize"):
            return model
        self = cls.__new__(cls)
        self.config, self._rr = config, record.get("reduce_range", False)
        return Quantize.rebuild(model, self._qconfig(record["formats"]), record["quantize"])


def _finite(v: float | None) -> float | str | None:
    """JSON-safe SQNR: infinities as 'inf' / '-inf'."""
    return v if v is None or math.isfinite(v) else ("inf" if v > 0 else "-inf")
