"""Metrics: ``metric(model, data) -> float``, registered by name.

``model`` is anything callable on batch inputs: a torch module or an ONNX Runtime stand-in
(:class:`nnsqueeze.export.ort.OrtModule`), so the same metric measures both.

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.metrics import get_metric
    >>> metric, name = get_metric("accuracy")
    >>> x = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 1.0], [0.0, 1.0]])   # (4, 2): the logits themselves
    >>> y = torch.tensor([0, 1, 1, 1])                                        # the third is wrong
    >>> name, metric(nn.Identity(), [(x, y)])
    ('accuracy', 0.75)

A model with uniform logits over V tokens has perplexity exactly V:

    >>> ppl, _ = get_metric("perplexity")
    >>> round(ppl(lambda ids: torch.zeros(*ids.shape, 5), [torch.randint(0, 5, (2, 8))]), 6)
    5.0
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Callable, Iterable

import torch

from .data import at_stage, call_model, describe, logits, split
from .errors import DataError, MetricError, NnsqueezeError
from .registry import METRICS


@METRICS.register("accuracy")
@torch.no_grad()
def accuracy(model: Any, data: Iterable) -> float:
    """Top-1 accuracy of the model's logits against integer class targets."""
    if hasattr(model, "eval"):
        model.eval()
    correct = total = 0
    for i, batch in enumerate(data):
        inputs, targets = split(batch)
        if targets is None:
            raise DataError(at_stage(f"eval_data batch {i}"), "accuracy needs targets, the batch has none",
                            fix="give (inputs, targets) batches or pass metric=callable")
        out = logits(call_model(model, inputs))
        pred = out.argmax(-1)
        if pred.shape != targets.shape:
            raise DataError(at_stage(f"eval_data batch {i}"), f"predictions of shape {tuple(pred.shape)} do not match "
                            f"targets {tuple(targets.shape)}", fix="accuracy expects class logits (batch, classes)")
        if targets.is_floating_point() or targets.is_complex():
            raise DataError(at_stage(f"eval_data batch {i}"),
                            f"accuracy needs integer class targets, got {targets.dtype}",
                            fix="give class indices (torch.long) or pass metric=callable")
        # A label the model cannot predict would silently count as wrong: an accuracy of 0 for a
        # labelling mistake (1-based labels, another label set).
        lo, hi, classes = int(targets.min()), int(targets.max()), out.shape[-1]
        if targets.numel() and (lo < 0 or hi >= classes):
            raise DataError(at_stage(f"eval_data batch {i}"), f"labels range over [{lo}, {hi}] but the model has "
                            f"{classes} outputs (classes 0..{classes - 1})",
                            fix="give labels in 0..classes-1 (e.g. subtract 1 from 1-based labels) or a model "
                            "with one output per class")
        correct += int((pred == targets).sum())
        total += int(targets.numel())
    if total == 0:
        raise DataError("eval_data", "no examples to evaluate", fix="give at least one non-empty batch")
    return correct / total


@METRICS.register("agreement")
def agreement(model: Any, data: Iterable) -> float:
    """Top-1 agreement with a reference model: accuracy against targets that are the reference's own
    top-1 predictions (``images:DIR`` data labels unlabelled images with the fp32 model's)."""
    return accuracy(model, data)


@METRICS.register("perplexity")
@torch.no_grad()
def perplexity(model: Any, data: Iterable) -> float:
    """Perplexity of a causal LM over batches of token windows (LongTensor ``(b, seq_len)`` or dicts
    with ``input_ids``): the protocol of :mod:`nnsqueeze.llm.perplexity`, i.e. within each window
    token t is predicted from tokens < t, the first token is unscored, ``exp(mean NLL)`` in float64.
    Lower is better."""
    import torch.nn.functional as F

    if hasattr(model, "eval"):
        model.eval()
    total, scored = 0.0, 0
    for i, batch in enumerate(data):
        inputs, _ = split(batch)
        ids = inputs.get("input_ids") if isinstance(inputs, dict) else inputs
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
            raise DataError(at_stage(f"eval_data batch {i}"), "perplexity needs token ids: a (batch, seq_len) integer "
                            "tensor or a dict with input_ids", fix="use nnsqueeze.hf_io.load_text_data for the data")
        out = logits(call_model(model, inputs))
        if out.dim() != 3 or out.shape[:2] != ids.shape:
            raise DataError(at_stage(f"eval_data batch {i}"), f"the model's logits of shape {tuple(out.shape)} are not "
                            f"(batch, seq_len, vocab) for input_ids {tuple(ids.shape)}",
                            fix="perplexity is for causal LMs (task causal-lm)")
        # Position t predicts token t+1.
        total += float(F.cross_entropy(out[:, :-1].double().reshape(-1, out.shape[-1]),
                                       ids[:, 1:].reshape(-1).to(out.device), reduction="sum"))
        scored += ids[:, 1:].numel()
    if scored == 0:
        raise DataError("eval_data", "no tokens to score", fix="give windows of at least 2 tokens")
    return math.exp(total / scored)


perplexity.lower_is_better = True  # the report and the latency guard read this


@METRICS.register("cosine")
@torch.no_grad()
def cosine(model: Any, data: Iterable) -> float:
    """Mean cosine similarity (float64) between the model's output vectors and the batch targets, the
    reference model's outputs for the same inputs: embedding fidelity for sentence encoders and other
    models whose output is a vector per example. Each example's ``(..., dim)`` output is compared row by
    row along the last axis; 1.0 means the same directions. Higher is better."""
    if hasattr(model, "eval"):
        model.eval()
    total, n = 0.0, 0
    for i, batch in enumerate(data):
        inputs, targets = split(batch)
        if targets is None or not isinstance(targets, torch.Tensor) or not targets.is_floating_point():
            raise DataError(at_stage(f"eval_data batch {i}"), "cosine needs float reference outputs as targets",
                            fix="give (inputs, reference_outputs) batches: the original model's outputs")
        out = logits(call_model(model, inputs))
        if out.shape != targets.shape:
            raise DataError(at_stage(f"eval_data batch {i}"), f"outputs of shape {tuple(out.shape)} do not match the "
                            f"reference outputs {tuple(targets.shape)}",
                            fix="give the original model's outputs for the same inputs as targets")
        a, b = out.double().reshape(-1, out.shape[-1]), targets.double().reshape(-1, out.shape[-1])
        cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-300)
        total += float(cos.sum())
        n += cos.numel()
    if n == 0:
        raise DataError("eval_data", "no examples to evaluate", fix="give at least one non-empty batch")
    return total / n


def lower_is_better(metric: Callable | None) -> bool:
    """Whether smaller values of ``metric`` are better (set ``fn.lower_is_better = True`` on a callable)."""
    return bool(getattr(metric, "lower_is_better", False))


def get_metric(metric: str | Callable | None) -> tuple[Callable | None, str | None]:
    """(callable, name) for a metric name or a user callable ``(model, data) -> float``."""
    if metric is None:
        return None, None
    if callable(metric):
        return metric, getattr(metric, "__name__", "metric")
    if not isinstance(metric, str):
        raise MetricError("metric", f"expected a metric name or a callable (model, data) -> float, got "
                          f"{type(metric).__name__}", fix=f"use one of: {', '.join(METRICS.names())}")
    return METRICS.get(metric, where="metric"), metric


def as_number(value: Any, name: str) -> float:
    """A metric's value as a finite float, else :class:`MetricError` (never a silent NaN in a report)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            raise MetricError(at_stage(f"metric {name!r}"), f"returned a tensor of shape {tuple(value.shape)}, "
                              "expected one number", fix="return a float, e.g. tensor.mean().item()")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise MetricError(at_stage(f"metric {name!r}"), f"returned {type(value).__name__} {str(value)[:60]!r}, "
                          "expected a number", fix="return a float from the metric callable")
    value = float(value)
    if not math.isfinite(value):
        raise MetricError(at_stage(f"metric {name!r}"), f"is {value}: the model's outputs or the metric are "
                          "not finite on eval_data", fix="check the eval data and the metric; after a step, "
                          "the step broke the model (e.g. an fp16 overflow: keep that layer in fp32)")
    return value


def checked(metric: Callable, name: str) -> Callable[[Any, Iterable], float]:
    """``metric`` that returns a finite float or raises a typed error naming the stage; an exception
    from a user metric becomes a :class:`MetricError` raised from it."""

    @functools.wraps(metric)
    def run(model: Any, data: Iterable) -> float:
        try:
            value = metric(model, data)
        except NnsqueezeError:
            raise
        except Exception as e:
            raise MetricError(at_stage(f"metric {name!r}"), f"raised {describe(e)}",
                              fix="fix the metric callable (rerun with --debug for its traceback)") from e
        return as_number(value, name)

    return run
