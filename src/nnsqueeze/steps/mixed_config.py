"""The ``mixed`` step's recipe keys (:class:`MixedPrecisionConfig`, :class:`MixedBudget`) and its
quality rule (:class:`Quality`, :func:`quality_budget`), shared with ``mixed-int8`` and ``half``'s
``keep_fp32`` (:mod:`nnsqueeze.steps.mixed_precision`). ::

    >>> from nnsqueeze.steps.mixed_config import MixedPrecisionConfig
    >>> cfg = MixedPrecisionConfig(formats=["int4", "fp32"], budget={"size_ratio": 0.3})
    >>> cfg.budget.size_ratio, cfg.search, cfg.calibration.method
    (0.3, 'lower', 'minmax')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..limits import cap_threads
from .base import StepConfig
from .quantize_config import CalibrationConfig


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
    search: Literal["lower", "raise"] = Field(
        "lower", description="lower: from the least-noise allocation that fits the size budget, lower one "
        "layer at a time (least noise per byte saved first) while the latency / quality budget allows. raise: "
        "every layer at its cheapest format, then the most sensitive layers (ranked alone in that format) "
        "go to their most precise format, one more at a time, until the whole model meets the quality budget")
    min_raised: int = Field(0, ge=0, description="search: raise: raise at least this many of the most "
                            "sensitive layers, whatever the figures say")


@dataclass
class Quality:
    """Bounds on the WHOLE model's measured figures; every bound given must hold. ::

        >>> Quality(max_metric_drop=0.01).holds({"metric_drop": 0.02, "output_sqnr_db": 40.0})
        False
        >>> Quality(min_sqnr_db=30.0).holds({"output_sqnr_db": 31.0}), Quality().given
        (True, False)
    """
    max_metric_drop: float | None = None
    min_sqnr_db: float | None = None

    @property
    def given(self) -> bool:
        return self.max_metric_drop is not None or self.min_sqnr_db is not None

    def holds(self, fig: dict[str, float]) -> bool:
        return (self.max_metric_drop is None or fig["metric_drop"] <= self.max_metric_drop) and \
            (self.min_sqnr_db is None or fig["output_sqnr_db"] >= self.min_sqnr_db)


def quality_budget(max_metric_drop: float | None, min_sqnr_db: float | None, ctx, step: str) -> Quality:
    """The quality rule of ``mixed`` and ``mixed-int8``: ``max_metric_drop`` when there are eval data
    and a metric, else ``min_sqnr_db`` (30 dB when only ``max_metric_drop`` was given; noted)."""
    if max_metric_drop is not None and ctx.eval_data is not None and ctx.metric is not None:
        return Quality(max_metric_drop=max_metric_drop)
    if max_metric_drop is not None:
        min_sqnr_db = 30.0 if min_sqnr_db is None else min_sqnr_db
        ctx.fallback(step, f"max_metric_drop needs eval data and a metric; using output SQNR >= {min_sqnr_db} dB "
                     "vs fp32 on the calibration data instead")
    return Quality(min_sqnr_db=min_sqnr_db)
