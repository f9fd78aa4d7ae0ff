"""The explicit run context passed to every step: data, device, seed, teacher, logger, report.

Steps never reach for globals; what they need is here. Steps may leave training callbacks in
``ctx.callbacks`` (e.g. gradual pruning) that the next training step (``finetune``) calls.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

import torch
from torch import nn

from .report import ReportBuilder

log = logging.getLogger("nnsqueeze")


class TrainCallback(Protocol):
    """Called by training steps. ``step`` counts optimizer steps from 0 to ``total`` - 1.

    A callback may also define ``penalty(model) -> Tensor``: a loss term the training step adds to
    the task loss at every optimizer step (e.g. a regularizer toward the quantization grid).
    """

    def on_train_begin(self, model: nn.Module, total: int) -> None: ...

    def on_step_end(self, model: nn.Module, step: int, total: int) -> None: ...

    def on_train_end(self, model: nn.Module) -> None: ...


@dataclass
class Context:
    train_data: Iterable | None = None
    calib_data: Iterable | None = None
    eval_data: Iterable | None = None
    example_inputs: Any = None
    metric: Callable[[Any, Iterable], float] | None = None
    metric_name: str | None = None
    loss_fn: Callable | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    # The model as it was before the recipe ran (never modified); the default distillation teacher.
    teacher: nn.Module | None = None
    report: ReportBuilder = field(default_factory=ReportBuilder)
    log: logging.Logger = log
    callbacks: list[TrainCallback] = field(default_factory=list)
    progress: bool = True

    def skip(self, step: str, layer: str, reason: str) -> None:
        """A layer left alone: logged and listed in the report, never silent."""
        self.log.info("%s: skipping %s (%s)", step, layer, reason)
        self.report.skip(step, layer, reason)

    def fallback(self, step: str, what: str) -> None:
        """A fallback taken: logged as a warning and listed in the report."""
        self.log.warning("%s: %s", step, what)
        self.report.note(step, what)
