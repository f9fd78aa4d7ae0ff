"""The interface between the runner and the guards that run after export (today: the latency guard,
:mod:`nnsqueeze.export.latency_guard`), so that :mod:`nnsqueeze.pipeline` knows no technique.

A guard is registered in :data:`nnsqueeze.registry.GUARDS`. The runner hands it the exported
result and what it measured (:class:`GuardInputs`); the guard returns a :class:`GuardOutcome`:
the model and ONNX bytes to keep and, when it changed the model, its own *record* (a manifest
entry ``{"name", "config", "record"}``) that the runner appends after the steps' records.
``nsq.load`` replays that entry with the function registered under its name in
:data:`nnsqueeze.registry.REPLAYS`. A guard never edits a step's record; when it keeps none of
the steps' changes (``keeps_steps=False``: the fp32 model instead) the runner drops their records,
since they no longer describe the saved model. ::

    >>> from nnsqueeze.guard import GuardOutcome
    >>> out = GuardOutcome(model=None, onnx=None)
    >>> out.record is None and out.keeps_steps
    True
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn


@dataclass
class GuardInputs:
    """What the runner measured and how, for a guard to measure alternatives the same way."""

    recipe: Any                 # the resolved Recipe (latency_guard flag, evaluate and export settings)
    report: Any                 # the ReportBuilder: baseline / compressed figures, notes
    ctx: Any                    # the run's Context (example inputs, device, fallback notes)
    exporter: Callable[..., dict[str, Any]]  # the registered ONNX exporter
    samples: list               # extra verification inputs
    latency_inputs: Any         # the latency batch
    eval_data: Any
    metric: Callable | None     # metric(model, eval_data) -> float, or None
    tmp: Path                   # a scratch directory that lives for the run
    original: nn.Module         # the fp32 model the recipe started from
    base_onnx: str              # path of the exported fp32 baseline
    measure: Callable[..., dict[str, Any]]  # nnsqueeze.evaluate.measure (the runner's own figures)


@dataclass
class GuardOutcome:
    model: nn.Module
    onnx: bytes | None
    record: dict[str, Any] | None = None  # manifest entry to append ({"name", "config", "record"})
    keeps_steps: bool = True              # False: the model is the baseline; the steps' records go


class Guard(ABC):
    """A stage after export that may replace the result (and then says so in its own record)."""

    @abstractmethod
    def run(self, model: nn.Module, onnx: bytes | None, inputs: GuardInputs) -> GuardOutcome:
        """Check the exported ``model`` / ``onnx`` and return what to keep."""
