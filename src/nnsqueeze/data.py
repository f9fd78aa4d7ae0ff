"""Data handling shared by all steps: batches are ``(inputs, targets)`` tuples or dicts.

- tuple/list batch: ``inputs = batch[0]`` (a tensor, or a tuple of tensors passed positionally),
  ``targets = batch[1]`` (optional);
- dict batch (Hugging Face style): passed as keyword arguments; ``labels`` is the target.

    >>> data = [(torch.randn(32, 1, 40), torch.randint(0, 10, (32,)))]
    >>> out = call_model(model, data[0])
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from .errors import DataError

Batch = Any


def as_batches(data: Iterable | None, where: str, required: bool = False) -> list | Iterable | None:
    """Validate ``data``: re-iterable and non-empty. One-shot iterators are materialised once."""
    if data is None:
        if required:
            raise DataError(where, "no data given", fix=f"pass {where}=... (an iterable of (inputs, targets) batches)")
        return None
    if isinstance(data, torch.Tensor):
        raise DataError(where, "got a bare tensor, expected an iterable of batches",
                        fix="wrap it: [(inputs, targets)] or use a torch DataLoader")
    try:
        it = iter(data)
    except TypeError:
        raise DataError(where, f"{type(data).__name__} is not iterable",
                        fix="pass a list of (inputs, targets) batches or a DataLoader") from None
    if it is data:  # a generator: would be exhausted after the first pass
        data = list(it)
        it = iter(data)
    try:
        first = next(it)
    except StopIteration:
        raise DataError(where, "data is empty", fix="give at least one batch") from None
    if not isinstance(first, (tuple, list, dict, torch.Tensor)):
        raise DataError(where, f"a batch is a {type(first).__name__}",
                        fix="each batch must be (inputs, targets), a dict of tensors, or an input tensor")
    return data


def split(batch: Batch) -> tuple[Any, Any]:
    """(inputs, targets) of a batch; targets may be None."""
    if isinstance(batch, dict):
        return batch, batch.get("labels")
    if isinstance(batch, torch.Tensor):
        return batch, None
    if len(batch) == 0:
        raise DataError("batch", "empty batch tuple", fix="batches are (inputs, targets)")
    return batch[0], (batch[1] if len(batch) > 1 else None)


def to_device(obj: Any, device: torch.device | str) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def call_model(model: nn.Module | Any, inputs: Any) -> Any:
    """Run ``model`` on batch inputs (tensor, tuple of tensors, or dict of keyword arguments)."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def logits(output: Any) -> torch.Tensor:
    """The main tensor of a model output (tensor, tuple, or object with ``.logits``)."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, dict):
        return output["logits"] if "logits" in output else next(iter(output.values()))
    if isinstance(output, (tuple, list)):
        return output[0]
    raise DataError("model output", f"cannot find a tensor in a {type(output).__name__}",
                    fix="return a tensor, a tuple, or an object with .logits")


def as_tuple(inputs: Any) -> tuple:
    """Example inputs as the positional tuple torch.onnx.export expects."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, dict):
        return (inputs,)  # exported with kwargs dict as the last positional argument
    return tuple(inputs)


def take(data: Iterable, samples: int | None) -> list:
    """First batches of ``data`` covering at least ``samples`` examples (all if None)."""
    out, n = [], 0
    for batch in data:
        out.append(batch)
        inputs, _ = split(batch)
        t = next(iter(inputs.values())) if isinstance(inputs, dict) else (
            inputs[0] if isinstance(inputs, (tuple, list)) else inputs)
        n += int(t.shape[0]) if t.dim() else 1
        if samples is not None and n >= samples:
            break
    return out
