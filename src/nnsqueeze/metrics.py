"""Metrics: ``metric(model, data) -> float``, registered by name.

``model`` is anything callable on batch inputs: a torch module or an ONNX Runtime stand-in
(:class:`nnsqueeze.export.ort.OrtModule`), so the same metric measures both.

    >>> from nnsqueeze.metrics import get_metric
    >>> acc = get_metric("accuracy")(model, [(x, y)])
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from .data import call_model, logits, split
from .errors import DataError
from .registry import METRICS


@METRICS.register("accuracy")
@torch.no_grad()
def accuracy(model: Any, data: Iterable) -> float:
    """Top-1 accuracy of the model's logits against integer class targets."""
    if hasattr(model, "eval"):
        model.eval()
    correct = total = 0
    for batch in data:
        inputs, targets = split(batch)
        if targets is None:
            raise DataError("eval_data", "accuracy needs targets, the batch has none",
                            fix="give (inputs, targets) batches or pass metric=callable")
        out = logits(call_model(model, inputs))
        pred = out.argmax(-1)
        if pred.shape != targets.shape:
            raise DataError("eval_data", f"predictions of shape {tuple(pred.shape)} do not match targets "
                            f"{tuple(targets.shape)}", fix="accuracy expects class logits (batch, classes)")
        correct += int((pred == targets).sum())
        total += int(targets.numel())
    if total == 0:
        raise DataError("eval_data", "no examples to evaluate", fix="give at least one non-empty batch")
    return correct / total


def get_metric(metric: str | Callable | None) -> tuple[Callable | None, str | None]:
    """(callable, name) for a metric name or a user callable ``(model, data) -> float``."""
    if metric is None:
        return None, None
    if callable(metric):
        return metric, getattr(metric, "__name__", "metric")
    return METRICS.get(metric, where="metric"), metric
