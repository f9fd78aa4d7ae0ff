"""Measure a model the way the report states it: metric, parameters, bytes, latency.

Latency is the median of ``runs`` timed calls after ``warmup`` calls, at a stated batch size and
thread count, in torch and in ONNX Runtime. With ``budget_s``, a slow model (one call of a language
model on a batch of long windows takes seconds) gets fewer calls: one warm-up and as many timed calls as
fit the budget, at least 3; the figures say how many ran (``latency_runs``). Bytes are those of real
files: the ONNX model and the safetensors weight archive.

    >>> import os, tempfile, torch
    >>> from torch import nn
    >>> from nnsqueeze.evaluate import measure
    >>> from nnsqueeze.export.onnx import export_onnx
    >>> from nnsqueeze.metrics import accuracy
    >>> model = nn.Sequential(nn.Linear(8, 3)).eval()
    >>> x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    >>> with tempfile.TemporaryDirectory() as d:
    ...     path = os.path.join(d, "m.onnx")
    ...     _ = export_onnx(model, path, x)
    ...     figs = measure(model, eval_data=[(x, y)], metric=accuracy, latency_inputs=x,
    ...                    onnx_path=path, threads=1, warmup=1, runs=3)
    >>> figs["params"], figs["accuracy_torch"] == figs["accuracy_onnxruntime"], sorted(figs["latency_ms"])
    (27, True, ['onnxruntime', 'torch'])
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterable

import torch
from torch import nn

from . import cpu
from .data import call_model
from .limits import cap_threads


def count_params(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters) of the model as deployed; shared tensors are counted once.

    A module whose stored parameters differ from the weights it computes with (e.g. a clustered
    layer holding k centroids for a whole weight tensor) reports its own via ``param_counts()``.
    """
    seen, total, nonzero = set(), 0, 0
    for m in model.modules():
        if hasattr(m, "param_counts"):
            t, nz = m.param_counts()
            total, nonzero = total + t, nonzero + nz
            seen.update(id(p) for p in m.parameters(recurse=False))
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        nonzero += int(torch.count_nonzero(p.detach()))
    return total, nonzero


@contextmanager
def torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(cap_threads(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


@torch.inference_mode()
def torch_latency_ms(model: nn.Module, inputs: Any, threads: int, warmup: int = 5, runs: int = 20,
                     budget_s: float | None = None, with_runs: bool = False) -> float | tuple[float, int]:
    """Median ms of ``model(inputs)``; ``(ms, timed calls)`` with ``with_runs``
    (see :func:`nnsqueeze.cpu.timed_median`)."""
    model.eval()
    with cpu.timing(), torch_threads(threads):  # workers sharing the machine take turns (nnsqueeze.cpu)
        ms, n = cpu.timed_median(lambda: call_model(model, inputs), warmup, runs, budget_s)
    return (ms, n) if with_runs else ms


def measure(
    model: nn.Module,
    *,
    eval_data: Iterable | None,
    metric: Callable | None,
    latency_inputs: Any,
    threads: int,
    warmup: int,
    runs: int,
    onnx_path: str | None = None,
    archive_bytes: int | None = None,
    torch_latency: bool = True,
    budget_s: float | None = None,
) -> dict[str, Any]:
    """Figures for one model; ONNX figures (size, ORT latency, ORT metric) when ``onnx_path`` is given.

    ``torch_latency=False`` leaves the torch model untimed when ONNX Runtime times the exported one (the
    torch time of a fake-quant model measures the simulation, and it is the costliest figure here); with
    no ONNX model it is timed regardless, as the only latency there is. ``budget_s`` caps each latency
    figure's time (:func:`nnsqueeze.cpu.timed_median`); ``latency_runs`` says how many timed calls each took.
    """
    import os

    params, nonzero = count_params(model)
    out: dict[str, Any] = {"params": params, "nonzero_params": nonzero}
    if metric is not None and eval_data is not None:
        with torch.inference_mode():
            out["accuracy_torch"] = float(metric(model, eval_data))
        out["accuracy"] = out["accuracy_torch"]
    latency, used = {}, {}
    if torch_latency or onnx_path is None:
        latency["torch"], used["torch"] = torch_latency_ms(model, latency_inputs, threads, warmup, runs, budget_s,
                                                           with_runs=True)
    if onnx_path is not None:
        from .export.ort import OrtModule, ort_latency_ms

        out["size_bytes"] = os.path.getsize(onnx_path)
        latency["onnxruntime"], used["onnxruntime"] = ort_latency_ms(
            onnx_path, latency_inputs, threads=threads, warmup=warmup, runs=runs, budget_s=budget_s, with_runs=True)
        if metric is not None and eval_data is not None:
            # The deployable figure: the metric of the exported model run by ONNX Runtime.
            out["accuracy_onnxruntime"] = float(metric(OrtModule(onnx_path, threads=threads), eval_data))
            out["accuracy"] = out["accuracy_onnxruntime"]
    if archive_bytes is not None:
        out["archive_bytes"] = archive_bytes
    out["latency_ms"] = latency
    out["latency_runs"] = used
    return out


def latency_batch(data: Iterable, size: int | None) -> Any:
    """Inputs of exactly ``size`` examples built from the first batches (first batch if None)."""
    from .data import split

    first_inputs, _ = split(next(iter(data)))
    if size is None or not isinstance(first_inputs, torch.Tensor):
        return first_inputs
    parts, n = [], 0
    while n < size:
        for i, batch in enumerate(data):
            x, _ = split(batch)
            if not isinstance(x, torch.Tensor) or x.shape[1:] != first_inputs.shape[1:]:
                from .data import DataError, shapes

                raise DataError(f"{getattr(data, 'where', 'data')} batch {i}", f"inputs of shape {shapes(x)} differ "
                                f"from batch 0's {tuple(first_inputs.shape)}: a latency batch of {size} cannot "
                                "be assembled from them", fix="give batches of one input shape, or set "
                                "evaluate.latency_batch: null (the first batch)")
            parts.append(x)
            n += x.shape[0]
            if n >= size:
                break
    return torch.cat(parts)[:size]
