"""Never slower: when the compressed ONNX graph runs slower than the fp32 graph in ONNX Runtime on
this CPU, measure faster configurations that keep the accuracy and offer (or apply) the fastest.

Candidates, each exported, verified and timed in ORT like the compressed model:

- ``compressed``: the model as the recipe made it;
- ``slow layers in float``: quantized layers whose int8 kernel is slower than their float kernel
  on this CPU (each layer timed alone in ORT on the input it sees on the latency batch) are
  reverted to float; the others stay quantized;
- ``all quantized layers in float``: every revertible layer reverted, and the activation-op
  quantizers removed too (Hugging Face attention matmuls of :mod:`nnsqueeze.quant.attention`,
  residual adds / matmuls of :mod:`nnsqueeze.quant.functional`); other compression kept;
- ``baseline``: the fp32 model the recipe started from.

A candidate keeps the accuracy when its metric is at least the compressed model's minus
``ACCURACY_RTOL`` (relative), or when there is no metric (reverting layers to float only removes
quantization error). :func:`choose` picks the fastest candidate that keeps the accuracy. The
pipeline applies it with ``latency_guard: true`` in the recipe and otherwise only reports the
offer::

    latency_guard: true
    steps:
      - quantize-dynamic: {}

Pure decision logic (no timing) so it can be tested on injected timings::

    >>> from nnsqueeze.export.latency_guard import Candidate, choose
    >>> c = [Candidate("compressed", 2.0, 0.90), Candidate("slow layers in float", 1.2, 0.905),
    ...      Candidate("all quantized layers in float", 1.1, 0.85), Candidate("baseline", 1.2, 0.91)]
    >>> choose(c, reference_metric=0.90).name   # 1.1 ms loses accuracy; the tie goes to the earlier
    'slow layers in float'
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

ACCURACY_RTOL = 1e-3  # a candidate may lose at most 0.1% (relative) of the compressed model's metric


@dataclass
class Candidate:
    name: str
    latency_ms: float
    metric: float | None = None
    size_bytes: int | None = None
    reverted: list[str] = field(default_factory=list)
    payload: Any = None  # what applying it needs (model, onnx bytes, figures); not reported

    def row(self) -> dict[str, Any]:
        return {"name": self.name, "latency_ms": round(self.latency_ms, 4), "metric": self.metric,
                "size_bytes": self.size_bytes, "reverted_layers": len(self.reverted)}


def keeps_accuracy(metric: float | None, reference: float | None, rtol: float = ACCURACY_RTOL) -> bool:
    if metric is None or reference is None:
        return True
    return metric >= reference - rtol * abs(reference)


def choose(candidates: list[Candidate], reference_metric: float | None, rtol: float = ACCURACY_RTOL) -> Candidate:
    """The fastest candidate whose metric keeps ``reference_metric`` (ties: the earlier one)."""
    ok = [c for c in candidates if keeps_accuracy(c.metric, reference_metric, rtol)]
    if not ok:
        raise ValueError("no candidate keeps the accuracy")
    return min(ok, key=lambda c: c.latency_ms)


def slower_layers(timings: dict[str, tuple[float, float]]) -> list[str]:
    """Layer names whose quantized time exceeds their float time; ``timings``: name -> (q_ms, f_ms)."""
    return [n for n, (q, f) in timings.items() if q > f]


# ------------------------------------------------------------------------------------------------
# Module walking and measuring
# ------------------------------------------------------------------------------------------------
def revertible_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Quantized layers that can go back to float on their own: they have ``revert_()`` and no
    activation fused into them (a fused ReLU left the model when it was folded in)."""
    return [(n, m) for n, m in model.named_modules()
            if callable(getattr(m, "revert_", None)) and getattr(m, "act", None) is None]


def quantized_ops(model: nn.Module) -> list[str]:
    """Activation-op quantizers that can go back to float: attention modules holding an
    ``AttentionQuant`` (the attention module's name) and fx ``QuantAdd``/``QuantMatMul`` modules of
    a ``GraphModule`` (their own names, ``nsq_<node>``)."""
    from ..quant.attention import ATTR, AttentionQuant
    from ..quant.functional import OpQuant

    out = []
    for n, m in model.named_modules():
        if isinstance(m._modules.get(ATTR), AttentionQuant):
            out.append(n)
        elif isinstance(m, OpQuant) and isinstance(_parent(model, n), torch.fx.GraphModule):
            out.append(n)
    return out


def _parent(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rpartition(".")[0])


def revert_(model: nn.Module, name: str) -> None:
    """Back to float in place: a layer by its ``revert_()``; an attention module by dropping its
    quantizer (``nnsqueeze_int8`` without one is eager float attention); an fx op module by routing
    its call back to the plain torch function (the module leaves the graph)."""
    from ..quant.attention import ATTR
    from ..quant.functional import restore_op

    m = model.get_submodule(name)
    if callable(getattr(m, "revert_", None)):
        m.revert_()
    elif ATTR in m._modules:
        del m._modules[ATTR]
    else:
        restore_op(_parent(model, name), name.rpartition(".")[2])


def reverted_copy(model: nn.Module, names: list[str]) -> nn.Module:
    m = copy.deepcopy(model)
    for n in names:
        revert_(m, n)
    return m.eval()


def drop_reverted(records: list[dict[str, Any]], gone: set[str]) -> list[dict[str, Any]]:
    """Step records (in place) without the layers and op quantizers in ``gone``, so that replaying
    them re-quantizes only what stayed quantized: ``layers`` (dict or list), attention ``modules``
    (``quantize-dynamic``'s ``attention``, ``quantize``'s ``ops.attention``) and ``ops.fx`` nodes
    (module ``nsq_<node>``)."""
    for r in records:
        rec = r.get("record")
        if not isinstance(rec, dict):
            continue
        layers = rec.get("layers")
        if isinstance(layers, dict):
            rec["layers"] = {k: v for k, v in layers.items() if k not in gone}
        elif isinstance(layers, list):
            rec["layers"] = [k for k in layers if k not in gone]
        ops = rec.get("ops") if isinstance(rec.get("ops"), dict) else {}
        for att in (rec.get("attention"), ops.get("attention")):
            if isinstance(att, dict) and isinstance(att.get("modules"), list):
                att["modules"] = [k for k in att["modules"] if k not in gone]
        if isinstance(ops.get("fx"), dict):
            ops["fx"] = {k: v for k, v in ops["fx"].items() if f"nsq_{k}" not in gone}
    return records


def layer_timings(model: nn.Module, inputs: Any, threads: int, warmup: int, runs: int,
                  names: list[str]) -> dict[str, tuple[float, float]]:
    """name -> (quantized ms, float ms): each layer alone in ORT on the input it sees for ``inputs``."""
    from ..data import call_model
    from .onnx import export_onnx
    from .ort import ort_latency_ms

    seen: dict[str, torch.Tensor] = {}
    mods = {n: model.get_submodule(n) for n in names}
    hooks = [m.register_forward_pre_hook(lambda mod, inp, n=n: seen.setdefault(n, inp[0].detach()))
             for n, m in mods.items()]
    try:
        with torch.no_grad():
            call_model(model.eval(), inputs)
    finally:
        for h in hooks:
            h.remove()
    out: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="nnsqueeze-guard-") as d:
        for n in names:
            if n not in seen:
                continue
            x = seen[n]
            times = []
            for kind, layer in (("q", copy.deepcopy(mods[n])), ("f", copy.deepcopy(mods[n]).revert_())):
                p = Path(d) / f"{kind}.onnx"
                export_onnx(layer.eval(), p, x, verify=False)
                times.append(ort_latency_ms(p, x, threads=threads, warmup=warmup, runs=runs))
            out[n] = (times[0], times[1])
    return out
