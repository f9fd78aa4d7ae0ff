"""Whole-model trials of the ``mixed`` step (:mod:`nnsqueeze.steps.mixed_precision`): an allocation
``{layer: format}`` built on a copy of the model as the step builds it (half layers, then the
``quantize`` step) and measured (output SQNR, metric drop, ONNX Runtime latency). ::

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.steps.mixed_trials import convert_half_layers
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> convert_half_layers(model, {"0": "fp16", "2": "fp32"}), model[0].weight.dtype, model[2].weight.dtype
    ({'0': 'float16'}, torch.float16, torch.float32)
"""

from __future__ import annotations

import math
from typing import Any, Callable

from torch import nn

from .quantize import Quantize


def convert_half_layers(model: nn.Module, alloc: dict[str, str]) -> dict[str, str]:
    """The half step's conversion of the fp16/bf16 layers of ``alloc``, in place; {layer: dtype}."""
    from ..quant.convert import convert, half_args
    from ..sensitivity import HALF_FORMATS

    half = {n: HALF_FORMATS[f] for n, f in alloc.items() if f in HALF_FORMATS}
    for n, dtype in half.items():
        convert(model.get_submodule(n), half_args(dtype))
    return half


class Trials:
    """Whole-model trials of allocations ``{layer: format}``, each built on a copy of ``model`` as the
    step builds it (fp16/bf16 layers by the half step's conversion, then ``qconfig(alloc)``'s quantize
    step on the int layers) and measured against ``model``: output SQNR (dB) on the first ``samples``
    calibration examples (when ``sqnr``) and, given ``metric``, the metric drop on ``eval_data``."""

    def __init__(self, model: nn.Module, calib, ctx, qconfig: Callable[[dict[str, str]], Any], samples: int, *,
                 metric: Callable | None = None, eval_data=None, sqnr: bool = True):
        from ..data import take

        self.model, self.calib, self.ctx, self.qconfig = model, calib, ctx, qconfig
        self.sqnr_data = take(calib, samples) if sqnr else None
        self.metric, self.eval_data = metric, eval_data
        self.base = float(metric(model, eval_data)) if metric is not None else None
        self.count = 0  # measured trials

    def build(self, alloc: dict[str, str]) -> nn.Module:
        import copy
        import logging

        from ..context import Context
        from ..sensitivity import FLOAT_FORMATS, FORMATS
        from .mixed_float import quantize_float_layers

        q = copy.deepcopy(self.model).eval()
        convert_half_layers(q, alloc)
        if not any(f in FORMATS or f in FLOAT_FORMATS for f in alloc.values()):
            return q
        qctx = Context(calib_data=self.calib, progress=False, log=logging.getLogger("nnsqueeze.mixed.trial"),
                       device=self.ctx.device)
        qctx.report.begin_step("quantize", {})
        q, _ = quantize_float_layers(q, alloc, qctx, self.qconfig(alloc).calibration.model_dump())
        if not any(f in FORMATS for f in alloc.values()):
            return q.eval()
        return Quantize(self.qconfig(alloc)).run(q, qctx).eval()

    def measure(self, alloc: dict[str, str]) -> dict[str, float]:
        """{'output_sqnr_db', 'metric_drop'} of the whole model built with ``alloc`` (those asked for)."""
        from ..sensitivity import output_sqnr

        self.count += 1
        fig: dict[str, float] = {}
        if all(f == "fp32" for f in alloc.values()):  # the fp32 model itself
            if self.sqnr_data is not None:
                fig["output_sqnr_db"] = math.inf
            if self.metric is not None:
                fig["metric_drop"] = 0.0
            return fig
        q = self.build(alloc)
        if self.sqnr_data is not None:
            fig["output_sqnr_db"] = output_sqnr(self.model, q, self.sqnr_data, self.ctx.device)
        if self.metric is not None:
            fig["metric_drop"] = self.base - float(self.metric(q, self.eval_data))
        return fig


def ort_latency(model: nn.Module, calib, threads: int, runs: int) -> float:
    """Median ONNX Runtime latency (ms) of ``model`` exported on the first calibration batch
    (3 warm-up runs, then ``runs`` timed ones on ``threads`` intra-op threads)."""
    import statistics
    import tempfile
    import time
    from pathlib import Path

    from ..data import split
    from ..export.onnx import export_onnx
    from ..export.ort import OrtModule

    x, _ = split(next(iter(calib)))
    with tempfile.TemporaryDirectory() as d:
        export_onnx(model, Path(d) / "m.onnx", x, verify=False)
        ort_model = OrtModule((Path(d) / "m.onnx").read_bytes(), threads=threads)
    for _ in range(3):
        ort_model(x)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        ort_model(x)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)
