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

The runner calls :class:`LatencyGuard` through :data:`nnsqueeze.registry.GUARDS`. An applied
candidate leaves the steps' records as they are and adds the guard's own ``revert`` record
(``{"by", "candidate", "latency_ms", "layer_ms", "reverted": {"layers", "ops"}}``), which
``nsq.load`` replays after them (:func:`replay_revert`, registered in
:data:`nnsqueeze.registry.REPLAYS`): the recorded layers and op quantizers go back to float before
the stored tensors load. Falling back to the fp32 baseline keeps no step record (none of their
changes is in the model); its revert record names the ``discarded_steps``.

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

from ..errors import ArtifactError, ModelError
from ..guard import Guard, GuardInputs, GuardOutcome
from ..quant.protocol import QuantizedModule, QuantizedOp
from ..registry import GUARDS, REPLAYS

ACCURACY_RTOL = 1e-3  # a candidate may lose at most 0.1% (relative) of the compressed model's metric
REVERT = "revert"     # the name of the guard's record in the artifact's manifest


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
    """Quantized layers that can go back to float on their own (:class:`QuantizedModule` with
    ``revertible``: e.g. no activation fused into them, which left the model when it was folded in)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedModule) and m.revertible]


def quantized_ops(model: nn.Module) -> list[str]:
    """Activation-op quantizers that can go back to float (:class:`QuantizedOp`), by their own
    names: an attention module's ``AttentionQuant`` (``<attention>.attn_quant``) and the fx
    ``QuantAdd``/``QuantMatMul`` modules of a ``GraphModule`` (``nsq_<node>``)."""
    return [n for n, m in model.named_modules()
            if n and isinstance(m, QuantizedOp) and m.revertible_in(_parent(model, n))]


def _parent(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rpartition(".")[0])


def revert_(model: nn.Module, name: str) -> None:
    """Back to float in place: a layer by its ``revert_()``; an op quantizer by ``revert_in`` its
    parent (an attention quantizer is dropped; an fx op module's call goes back to the plain function)."""
    m = model.get_submodule(name)
    if isinstance(m, QuantizedModule) and m.revertible:
        m.revert_()
    elif isinstance(m, QuantizedOp) and m.revertible_in(_parent(model, name)):
        m.revert_in(_parent(model, name), name.rpartition(".")[2])
    else:
        raise ModelError(name, f"{type(m).__name__} is not a quantized layer or op that can go back to float",
                         fix="name layers from revertible_layers() and ops from quantized_ops()")


def reverted_copy(model: nn.Module, names: list[str]) -> nn.Module:
    m = copy.deepcopy(model)
    for n in names:
        revert_(m, n)
    return m.eval()


def drop_reverted(records: list[dict[str, Any]], gone: set[str]) -> list[dict[str, Any]]:
    """Step records (in place) without the layers and op quantizers in ``gone``: how artifacts written
    before the ``revert`` record encoded a guarded model (those still load: their records simply
    quantize less). The guard no longer calls it; it builds such old-form manifests for the tests.
    Edits ``layers`` (dict or list), attention ``modules`` (``quantize-dynamic``'s ``attention``,
    ``quantize``'s ``ops.attention``; a quantizer ``<module>.attn_quant`` removes ``<module>``) and
    ``ops.fx`` nodes (module ``nsq_<node>``)."""
    gone = set(gone) | {n.rpartition(".")[0] for n in gone if n.rpartition(".")[2] == "attn_quant"}
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


# ------------------------------------------------------------------------------------------------
# The revert record: what the guard put back to float, and why; nsq.load replays it
# ------------------------------------------------------------------------------------------------
@REPLAYS.register(REVERT)
def replay_revert(model: nn.Module, record: dict[str, Any]) -> nn.Module:
    """Put the recorded layers and op quantizers back to float on the model the steps' records
    rebuilt (before the weights load, so the float layers take the stored float tensors)."""
    names = record.get("reverted", {})
    if not isinstance(names, dict):
        raise ArtifactError("revert record: reverted", f"must be a mapping, got {type(names).__name__}",
                            fix="re-create the artifact")
    for key in ("layers", "ops"):
        got = names.get(key, [])
        if not isinstance(got, list) or not all(isinstance(n, str) for n in got):
            raise ArtifactError(f"revert record: reverted.{key}", "must be a list of module names",
                                fix="re-create the artifact")
        for n in got:
            revert_(model, n)
    return model


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


# ------------------------------------------------------------------------------------------------
# The guard the runner calls (nnsqueeze.guard.Guard, registered as GUARDS "latency")
# ------------------------------------------------------------------------------------------------
@GUARDS.register("latency")
class LatencyGuard(Guard):
    """Never slower: when the compressed ONNX model is slower than the baseline in ONNX Runtime,
    measure faster configurations, report them, and with ``latency_guard: true`` apply the fastest
    that keeps the accuracy, recording what went back to float in a ``revert`` record."""

    def _measure(self, model: nn.Module, path: str, g: GuardInputs) -> dict[str, Any]:
        from ..artifact import weights_bytes

        ev = g.recipe.evaluate
        return g.measure(model, eval_data=g.eval_data, metric=g.metric, latency_inputs=g.latency_inputs,
                       threads=ev.threads, warmup=ev.warmup, runs=ev.runs, onnx_path=path,
                       budget_s=ev.latency_budget_s,
                       archive_bytes=len(weights_bytes(model)), torch_latency=ev.torch_latency)

    def _candidate(self, name: str, model: nn.Module, reverted: list[str], g: GuardInputs) -> Candidate:
        path = str(g.tmp / f"guard-{len(reverted)}-{name.split()[0]}.onnx")
        onnx_cfg = g.recipe.export.onnx
        export = g.exporter(model, path, g.ctx.example_inputs, opset=onnx_cfg.opset, verify=onnx_cfg.verify,
                            samples=g.samples, atol=onnx_cfg.atol)
        figs = self._measure(model, path, g)
        return Candidate(name, figs["latency_ms"]["onnxruntime"], figs.get("accuracy"), figs.get("size_bytes"),
                         reverted, payload=(model, Path(path).read_bytes(), figs, export))

    def run(self, model: nn.Module, onnx: bytes | None, inputs: GuardInputs) -> GuardOutcome:
        from ..metrics import lower_is_better

        g, rb, ev = inputs, inputs.report, inputs.recipe.evaluate
        bl, cl = rb.baseline["latency_ms"].get("onnxruntime"), rb.compressed["latency_ms"].get("onnxruntime")
        if bl is None or cl is None or cl <= bl:
            return GuardOutcome(model, onnx)
        if not g.recipe.latency_guard:  # measuring candidates costs exports and timings: only on request
            rb.note("latency-guard", f"the compressed ONNX model is slower than the fp32 baseline in ONNX Runtime "
                    f"({cl:.4g} ms vs {bl:.4g} ms); set latency_guard: true to measure faster configurations "
                    "(slow layers back to float, or the fp32 model) and apply the fastest that keeps the accuracy")
            return GuardOutcome(model, onnx)
        # Order matters on ties (choose() keeps the earlier): the more compressed configuration wins.
        cands = [Candidate("compressed", cl, rb.compressed.get("accuracy"), rb.compressed.get("size_bytes"))]
        names = [n for n, _ in revertible_layers(model)]
        ops = quantized_ops(model)  # attention / residual op quantizers: not timed alone, reverted with "all"
        timings: dict[str, tuple[float, float]] = {}
        if names:
            timings = layer_timings(model, g.latency_inputs, ev.threads, ev.warmup, ev.runs, names)
            slow = slower_layers(timings)
            if slow and (len(slow) < len(names) or ops):
                cands.append(self._candidate("slow layers in float", reverted_copy(model, slow), slow, g))
        if names or ops:
            cands.append(self._candidate("all quantized layers in float", reverted_copy(model, names + ops),
                                         names + ops, g))
        cands.append(Candidate("baseline", bl, rb.baseline.get("accuracy"), rb.baseline.get("size_bytes"),
                               payload="baseline"))
        # choose() keeps candidates whose metric is not lower than the reference: for a metric where
        # lower is better (perplexity) it compares negated values; the report shows the real ones.
        sign = -1 if lower_is_better(g.metric) else 1
        for c in cands:
            c.metric = None if c.metric is None else sign * c.metric
        best = choose(cands, None if rb.compressed.get("accuracy") is None else sign * rb.compressed["accuracy"])
        rows = [c.row() for c in cands]
        for r in rows:
            r["metric"] = None if r["metric"] is None else sign * r["metric"]
        layer_ms = {n: {"quantized": round(q, 4), "float": round(f, 4)} for n, (q, f) in timings.items()}
        rb.export["latency_guard"] = {"baseline_ms": bl, "compressed_ms": cl, "candidates": rows,
                                      "chosen": best.name, "applied": best.name != "compressed", "layer_ms": layer_ms}
        what = (f"the compressed ONNX model is slower than the fp32 baseline in ONNX Runtime ({cl:.4g} ms vs "
                f"{bl:.4g} ms); fastest configuration that keeps the accuracy: '{best.name}' ({best.latency_ms:.4g} ms"
                + (f", {len(best.reverted)} layer(s) back to float" if best.reverted else "") + ")")
        if best.name == "compressed":
            rb.note("latency-guard", what + ": kept")
            return GuardOutcome(model, onnx)
        g.ctx.fallback("latency-guard", what + ": applied (latency_guard: true)")
        # The guard's own record: the measured reason, and what nsq.load must put back to float
        # after replaying the steps' records (which it leaves as the steps wrote them).
        why = {"by": "latency-guard", "candidate": best.name,
               "latency_ms": {"baseline": bl, "compressed": cl, "chosen": best.latency_ms}}
        if best.payload == "baseline":
            out = copy.deepcopy(g.original).to(g.ctx.device).eval()
            rb.compressed = {**rb.baseline}
            rb.export["compressed"] = rb.export["baseline"]
            # the fp32 model is kept: the steps' records no longer describe it, so they go (the
            # runner drops them) and the record says which steps were undone
            steps = [s["name"] for s in rb.steps] if isinstance(rb.steps, list) else []
            record = {**why, "discarded_steps": steps, "reverted": {"layers": [], "ops": []}}
            return GuardOutcome(out, Path(g.base_onnx).read_bytes(), revert_entry(record), keeps_steps=False)
        out, data, figs, export = best.payload
        figs["measured"] = rb.compressed.get("measured")
        rb.compressed, rb.export["compressed"] = figs, export
        reverted = {"layers": [n for n in best.reverted if n not in ops], "ops": [n for n in best.reverted if n in ops]}
        record = {**why, "reverted": reverted,
                  "layer_ms": {n: layer_ms[n] for n in reverted["layers"] if n in layer_ms}}
        return GuardOutcome(out, data, revert_entry(record))


def revert_entry(record: dict[str, Any]) -> dict[str, Any]:
    """The manifest entry of a revert record (replayed by :func:`replay_revert`)."""
    return {"name": REVERT, "config": {}, "record": record}
