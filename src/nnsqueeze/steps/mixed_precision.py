"""The ``mixed`` step: a weight format per layer among candidates (e.g. int4 / int8 / fp16 / fp32)
chosen to meet a size budget (bytes), a latency budget (measured in ONNX Runtime) and/or a quality
budget (max metric drop, or min output SQNR), keeping the most sensitive layers at higher precision.
Recipe::

    - mixed:
        formats: [int4, int8, fp16, fp32]      # also bf16 and every nnsqueeze.sensitivity.FORMATS name
        budget: {size_ratio: 0.3, max_metric_drop: 0.003}   # also size_bytes, min_sqnr_db, latency_ms
        calibration: {method: minmax, samples: 512}
        search: lower                          # or raise (below)

The result is the ``half`` step's conversion on the fp16/bf16 layers (2 bytes per parameter), then one
``quantize`` step per float format (``fp8-e4m3``, ``mxfp4``, ... :mod:`nnsqueeze.steps.mixed_float`) on
its layers, then the ``quantize`` step with per-layer ``layer_weights`` on the integer layers (fp32,
half and float layers ignored), so export and rebuild are theirs; each layer's format and byte
figures are in the report.

This is the one mixed-precision allocator. ``mixed-int8`` (:mod:`nnsqueeze.steps.mixed`) is this
step with ``formats: [int8, fp32], search: raise``, and ``half``'s ``keep_fp32`` is it with
``formats: [fp16 or bf16, fp32], search: raise``: both map their configs onto
:meth:`MixedPrecision.allocate` and keep their own records, so their artifacts load as before.

This file is the step; its parts live beside it: the recipe keys and quality rule in
:mod:`~nnsqueeze.steps.mixed_config`, the allocation maths in :mod:`~nnsqueeze.steps.mixed_alloc`,
the whole-model trials in :mod:`~nnsqueeze.steps.mixed_trials` (their names are re-exported here).
"""

from __future__ import annotations

import math
from typing import Any, Callable

from torch import nn

from ..errors import DataError
from ..registry import STEPS
from .base import Step, recorded_module
from .mixed_alloc import Allocation, cheapest_allocation, format_bytes, raise_until
from .mixed_config import MixedBudget, MixedPrecisionConfig, Quality, quality_budget
from .mixed_trials import Trials, convert_half_layers, ort_latency
from .quantize import Quantize

__all__ = ["Allocation", "MixedBudget", "MixedPrecision", "MixedPrecisionConfig", "Quality", "Trials",
           "cheapest_allocation", "convert_half_layers", "format_bytes", "quality_budget", "raise_until"]


@STEPS.register("mixed")
class MixedPrecision(Step):
    """Per-layer format allocation; see the ``mixed`` recipe in docs/quantization.md.

    1. Sensitivity: every layer alone in every candidate format (int formats through the
       ``quantize`` step, fp16/bf16 through the ``half`` step's conversion), as output noise power
       ``10**(-SQNR/10)`` against fp32 on the calibration data.
    2. Size budget: the assignment with the least summed noise whose estimated bytes fit, found
       exactly (Pareto front over the layers; greedy past 20000 front states). A budget below the
       smallest achievable size is a :class:`RecipeError` naming both figures.
    3. Latency / quality budgets (``search: lower``): from there, repeatedly take the one-layer move to
       a cheaper format with the least added noise per byte saved: while the ONNX Runtime latency
       (measured) is over ``latency_ms``, then while the WHOLE model (measured) stays within
       ``max_metric_drop`` / ``min_sqnr_db``. ``search: raise`` instead starts from every layer at its
       cheapest format and raises the k most sensitive ones (ranked alone in that format: by metric
       drop when the budget uses the metric, else by SQNR) to their most precise format, for
       k = ``min_raised``, ... until the whole model meets the quality budget or the size budget stops it.
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
        from ..sensitivity import FLOAT_FORMATS, FORMATS, HALF_FORMATS

        known = {"fp32", *HALF_FORMATS, *FORMATS, *FLOAT_FORMATS}
        bad = [f for f in config.formats if f not in known]
        if bad or not config.formats:
            raise RecipeError(f"{self.where}.formats", f"unknown formats {bad}" if bad else "no format given",
                              fix=f"choose among fp32, {', '.join(HALF_FORMATS)}, {', '.join(FORMATS)}, "
                                  f"{', '.join(FLOAT_FORMATS)}")
        if config.search == "raise" and config.budget.latency_ms is not None:
            raise RecipeError(f"{self.where}.budget.latency_ms", "a latency budget needs search: lower",
                              fix="use search: lower, or drop latency_ms")
        self._record: dict[str, Any] = {}
        # What the aliases change (mixed-int8 keeps its own byte estimate and size-cap behaviour):
        self.layer_bytes: Callable[[nn.Module, str], int] = format_bytes
        self.size_error = True          # a size budget below the smallest size is a RecipeError
        self.keep_one_lowered = False   # search raise: at least one layer stays at its cheapest format
        self._rr = False

    def onnx_limit(self) -> str | None:
        from .mixed_float import float_onnx_limit

        return float_onnx_limit(list(self.config.formats))

    def _qconfig(self, alloc: dict[str, str]) -> Any:
        from ..sensitivity import FORMATS, quantize_weights

        ints = [n for n, f in alloc.items() if f in FORMATS]
        lw = {n: {**quantize_weights(FORMATS[alloc[n]]), "reduce_range": self._rr} for n in ints}
        return Quantize.Config.model_validate({
            "targets": ints or list(self.config.targets),
            "ignore": list(self.config.ignore) + [n for n in alloc if n not in lw], "layer_weights": lw,
            "calibration": self.config.calibration.model_dump()})

    def _latency(self, trials: Trials, alloc: dict[str, str], calib) -> float:
        """Median ONNX Runtime latency (ms) of the model quantized with ``alloc``, first calib batch."""
        b = self.config.budget
        return ort_latency(trials.build(alloc), calib, b.latency_threads, b.latency_runs)

    def allocate(self, model: nn.Module, ctx, calib, *, names: list[str] | None = None,
                 quality: Quality | None = None, metric: Callable | None = None,
                 whole_sqnr: bool | None = None) -> Allocation:
        """Choose a format per layer of ``names`` (default: the selected Linear/Conv layers); ``model``
        is not modified. ``quality`` defaults to :func:`quality_budget` of the config's budget;
        ``metric`` (default: the context's, when the quality uses it) ranks the layers (search raise)
        and measures the trials; ``whole_sqnr`` also measures the trials' SQNR when the quality does
        not need it."""
        from ..errors import RecipeError
        from ..sensitivity import HALF_FORMATS, half_layers, quantizable_layers, resolve_reduce_range, sensitivity

        cfg, name, b = self.config, self.registered_name, self.config.budget
        self._rr = resolve_reduce_range({"bits": 8})["reduce_range"]
        if names is None:
            names = [n for n, _ in quantizable_layers(model, list(cfg.targets) or None, list(cfg.ignore))]
        # Formats each layer can take (the half step leaves subclasses and bf16 string-padded convs),
        # from most to fewest bytes; ties keep the recipe's order.
        can_half = {f: {n for n, _ in half_layers(model, names, list(cfg.ignore), d)} for f, d in HALF_FORMATS.items()}
        size = {(n, f): self.layer_bytes(model.get_submodule(n), f) for n in names for f in cfg.formats}
        order = {n: sorted([f for f in cfg.formats if f not in HALF_FORMATS or n in can_half[f]],
                           key=lambda f, n=n: -size[(n, f)]) for n in names}
        fp32_total = sum(p.numel() * 4 for p in model.parameters())
        other = fp32_total - sum(self.layer_bytes(model.get_submodule(n), "fp32") for n in names)
        limit = min([x for x in (b.size_bytes, None if b.size_ratio is None else b.size_ratio * fp32_total)
                     if x is not None], default=None)
        a = Allocation({}, size, order, {}, [], Quality(), fp32_total, other, limit)
        smallest = a.smallest()
        if self.size_error and limit is not None and a.bytes(smallest) > limit:  # say so before measuring
            key = "size_bytes" if b.size_bytes is not None and b.size_bytes <= limit else "size_ratio"
            least = a.bytes(smallest)
            raise RecipeError(f"{self.where}.budget.{key}",
                              f"size budget {limit:.0f} bytes ({limit / fp32_total:.4f} of fp32) cannot be met "
                              f"with formats {list(cfg.formats)}: the smallest achievable is {least} "
                              f"bytes ({least / fp32_total:.4f} of fp32), every layer at its cheapest "
                              f"format{'' if other == 0 else f', {other} bytes of other parameters in fp32'}",
                              fix=f"raise the budget to at least {least} bytes, or add a cheaper format "
                                  "(e.g. int4)")
        a.quality = quality if quality is not None else quality_budget(b.max_metric_drop, b.min_sqnr_db, ctx, name)
        if metric is None and a.quality.max_metric_drop is not None:
            metric = ctx.metric
        measured = [f for f in cfg.formats if f != "fp32"]
        ranked_by_metric = cfg.search == "raise" and metric is not None
        a.rows = sensitivity(model, calib, eval_data=ctx.eval_data if ranked_by_metric else None,
                             metric=metric if ranked_by_metric else None, formats=measured, targets=names,
                             ignore=list(cfg.ignore), calibration=cfg.calibration.model_dump(),
                             reduce_range=self._rr, device=ctx.device) if measured else []
        a.sqnr = {(r["layer"], r["format"]): r["sqnr_db"] for r in a.rows}
        for n in names:
            a.sqnr[(n, "fp32")] = math.inf
        sqnr = a.quality.min_sqnr_db is not None or metric is None if whole_sqnr is None else whole_sqnr
        trials = Trials(model, calib, ctx, self._qconfig, cfg.calibration.samples, metric=metric,
                        eval_data=ctx.eval_data if metric is not None else None, sqnr=sqnr)
        if cfg.search == "raise":
            self._raise(a, trials)
        else:
            self._lower(a, trials, calib, ctx)
        a.trials = trials.count
        return a

    def _raise(self, a: Allocation, trials: Trials) -> None:
        """search raise: the k most sensitive layers at their most precise format, the rest at their
        cheapest; k from ``min_raised`` up until the whole model meets the quality budget."""
        b, smallest = self.config.budget, a.smallest()
        a.allocator = "raise"
        a.ranking = [r["layer"] for r in a.rows if r["format"] == smallest[r["layer"]]]

        def at(k: int) -> dict[str, str]:
            top = set(a.ranking[:k])
            return {n: (fs[0] if n in top else fs[-1]) for n, fs in a.order.items()}

        def fits(alloc: dict[str, str]) -> bool:
            total = a.bytes(alloc)
            return (b.size_bytes is None or total <= b.size_bytes) and \
                (b.size_ratio is None or total / a.fp32_bytes <= b.size_ratio)

        k_max = len(a.ranking) - (1 if self.keep_one_lowered else 0)
        while k_max > 0 and not fits(at(k_max)):
            k_max -= 1
        a.raise_max = k_max
        a.raised, a.whole, a.quality_met = raise_until(a.quality, lambda k: trials.measure(at(k)),
                                                       min(self.config.min_raised, k_max), k_max)
        a.formats = at(a.raised)

    def _lower(self, a: Allocation, trials: Trials, calib, ctx) -> None:
        """search lower: least noise within the size budget, then lower while latency / quality allow."""
        name, b, order, size, limit = self.registered_name, self.config.budget, a.order, a.size, a.limit
        names = list(order)
        noise = {k: (0.0 if v == math.inf else 10 ** (-v / 10)) for k, v in a.sqnr.items()}
        if limit is None:
            alloc = {n: order[n][0] for n in names}
        else:
            alloc = cheapest_allocation({n: [(f, size[(n, f)], noise[(n, f)]) for f in order[n]] for n in names},
                                        limit - a.other_bytes) or None
            a.allocator = "exact" if alloc else "greedy"
            alloc = alloc or {n: order[n][0] for n in names}

        def next_move(al):
            """(noise added per byte saved, layer, format) of the best one-layer move to fewer bytes."""
            best = None
            for n in names:
                for f in order[n]:
                    saved = size[(n, al[n])] - size[(n, f)]
                    if saved <= 0:
                        continue
                    new, cur = noise[(n, f)], noise[(n, al[n])]
                    cost = (0.0 if new == cur else new - cur) / saved  # inf - inf: no change
                    if best is None or (cost, -saved) < best[:2]:
                        best = (cost, -saved, n, f)
            return None if best is None else (best[0], best[2], best[3])

        while limit is not None and a.bytes(alloc) > limit:  # greedy (huge fronts only); all-cheapest fits
            _, n_, f_ = next_move(alloc)
            alloc[n_] = f_
        if b.latency_ms is not None:  # measured: keep lowering (same greedy order) until fast enough
            a.latency = self._latency(trials, alloc, calib)
            while a.latency > b.latency_ms:
                mv = next_move(alloc)
                if mv is None:
                    break
                alloc[mv[1]] = mv[2]
                a.latency = self._latency(trials, alloc, calib)
            if a.latency > b.latency_ms:
                ctx.fallback(name, f"latency budget {b.latency_ms} ms not met: {a.latency:.3f} ms with every layer "
                             "at its cheapest format")
        if a.quality.given:
            a.whole = trials.measure(alloc)
            if a.quality.holds(a.whole):  # room left: keep lowering while the whole model stays within budget
                while (mv := next_move(alloc)) is not None:
                    trial = {**alloc, mv[1]: mv[2]}
                    fig = trials.measure(trial)
                    if not a.quality.holds(fig):
                        break
                    alloc, a.whole = trial, fig
            else:
                key = "metric_drop" if a.quality.max_metric_drop is not None else "output_sqnr_db"
                ctx.fallback(name, f"quality budget not met at the size budget: "
                             f"{'metric drop' if key == 'metric_drop' else 'output SQNR'} {a.whole[key]:.4g}")
            a.quality_met = a.quality.holds(a.whole)
        a.formats = alloc

    def run(self, model: nn.Module, ctx) -> nn.Module:
        from ..sensitivity import FLOAT_FORMATS, FORMATS, HALF_FORMATS, format_args
        from .mixed_float import quantize_float_layers

        name, b = self.registered_name, self.config.budget
        calib = ctx.calib_data if ctx.calib_data is not None else ctx.train_data
        if calib is None:
            raise DataError(f"{self.where}.calibration", "mixed precision needs calibration data",
                            fix="pass calib_data=... (a few hundred representative examples)")
        model.eval()
        a = self.allocate(model, ctx, calib)
        alloc, size, order = a.formats, a.size, a.order
        latency_met = a.latency is None or a.latency <= b.latency_ms
        value = None
        if a.whole:
            value = a.whole["metric_drop" if a.quality.max_metric_drop is not None else "output_sqnr_db"]

        for n, f in alloc.items():
            if f == "fp32":
                ctx.skip(name, n, "kept fp32 by the mixed-precision allocation")
        if all(f == "fp32" for f in alloc.values()):
            self._record = {"formats": alloc, "quantize": None}
            ctx.report.step(formats=alloc, budget_met=a.quality_met and latency_met,
                            **({} if a.latency is None else {"latency_ms": round(a.latency, 4),
                                                             "latency_budget_ms": b.latency_ms}))
            return model
        half = convert_half_layers(model, alloc)
        model, floats = quantize_float_layers(model, alloc, ctx, self.config.calibration.model_dump(), name=name,
                                              index=self.index)
        qrec = None
        if any(f in FORMATS for f in alloc.values()):
            qstep = Quantize(self._qconfig(alloc), self.index)
            qstep.registered_name = name
            model = qstep.run(model, ctx)
            qrec = qstep.record()
        for n, f in alloc.items():  # the format and the figures that chose it
            cands = {g: {"bytes": size[(n, g)], "sqnr_db_alone": _finite(a.sqnr.get((n, g)))} for g in order[n]}
            fields: dict[str, Any] = {"format": f, "bytes_estimate": size[(n, f)], "candidates": cands}
            if f in HALF_FORMATS:
                fields.update(bits=16, act_bits=16, scheme=HALF_FORMATS[f])
            elif f in FLOAT_FORMATS:
                fields.update(bits=format_args(f).bits)
            ctx.report.layer(n, **fields)
        self._record = {"formats": alloc, "reduce_range": self._rr, "half": half, "quantize": qrec,
                        **({"float": floats} if floats else {})}
        figures: dict[str, Any] = {"formats": alloc, "size_bytes_estimate": a.bytes(),
                                   "size_ratio_estimate": round(a.bytes() / a.fp32_bytes, 4),
                                   "size_budget_bytes": None if a.limit is None else int(a.limit),
                                   "smallest_size_bytes": a.bytes(a.smallest()), "allocator": a.allocator,
                                   "budget_met": a.quality_met and latency_met, "trials": a.trials}
        if a.allocator == "raise":
            figures["raised"] = a.ranking[:a.raised]
        if a.latency is not None:
            figures["latency_ms"] = round(a.latency, 4)
            figures["latency_budget_ms"] = b.latency_ms
        if value is not None:
            figures["metric_drop" if a.quality.max_metric_drop is not None else "output_sqnr_db"] = \
                value if math.isfinite(value) else None
        ctx.report.step(**figures)
        return model

    def record(self) -> dict[str, Any]:
        return self._record

    @classmethod
    def rebuild(cls, model: nn.Module, config: MixedPrecisionConfig, record: dict[str, Any]) -> nn.Module:
        from ..quant.convert import convert, half_args
        from ..quant.half import HalfMixin

        for lname, dtype in record.get("half", {}).items():  # first, as in run()
            mod = recorded_module(model, lname, (nn.Module,), "mixed record")
            if not isinstance(mod, HalfMixin):
                convert(mod, half_args(dtype))
        if record.get("float"):   # then the float formats, as in run()
            from .mixed_float import rebuild_float_layers

            model = rebuild_float_layers(model, record["float"], config.calibration.model_dump())
        if not record.get("quantize"):
            return model
        self = cls.__new__(cls)
        self.config, self._rr = config, record.get("reduce_range", False)
        return Quantize.rebuild(model, self._qconfig(record["formats"]), record["quantize"])


def _finite(v: float | None) -> float | str | None:
    """JSON-safe SQNR: infinities as 'inf' / '-inf'."""
    return v if v is None or math.isfinite(v) else ("inf" if v > 0 else "-inf")
