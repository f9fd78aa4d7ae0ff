"""Export to ONNX, as an int8 QDQ graph for quantized models, and verify it in ONNX Runtime.

Float models export plain. For models holding fake-quant layers (:mod:`nnsqueeze.quant.modules`)
the TorchScript exporter writes QuantizeLinear/DequantizeLinear pairs, which are then rewritten so
that ONNX Runtime runs int8 kernels (QLinearConv, QGemm, QLinearMatMul...) and the file is ~4x
smaller:

- a QuantizeLinear of a constant weight becomes an int8 initializer feeding DequantizeLinear;
- a Conv/Gemm float bias becomes int32 codes of scale ``s_input * s_weight`` (what the fused
  kernels add to their accumulator; the torch simulation rounds the bias the same way);
- ``DQ -> Q`` with identical parameters (an exact round trip) is removed, and so is a ReLU that
  reads a DequantizeLinear whose zero point is the code minimum (its input is already >= 0).

Every rewrite is exact: the file computes what the torch simulation computes, up to ORT's own
int32 requantization rounding. The export is then checked in ONNX Runtime on the example inputs
(and ``samples``) and written atomically::

    >>> import torch, tempfile, os
    >>> from torch import nn
    >>> from nnsqueeze.export.onnx import export_onnx
    >>> model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3)).eval()
    >>> with tempfile.TemporaryDirectory() as d:
    ...     figures = export_onnx(model, os.path.join(d, "m.onnx"), torch.randn(5, 8))
    >>> figures["quantized"], figures["max_abs_diff"] < 1e-5
    (False, True)

A quantized model (after the ``quantize`` step) exports the same way; ``figures["ort_int8_ops"]``
then lists the int8 kernels ONNX Runtime fused, e.g. ``{"QGemm": 2, "QLinearConv": 3}``.
"""

from __future__ import annotations

import inspect
import io
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from ..data import as_tuple
from ..errors import ExportError
from ..quant.modules import export_mode, fake_quant_modules
from ..registry import EXPORTERS

INT8_OPS = {"QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat",
            "DynamicQuantizeMatMul", "MatMulNBits", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
            "QLinearAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax"}
FLOAT_COMPUTE_OPS = {"Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul", "NchwcConv"}
# A quantized model agrees with its torch simulation up to ORT's requantization rounding, which can
# move a code by one step per layer: allow this many 8-bit steps of each output's range.
QUANT_TOLERANCE_STEPS = 4.0
FP32_RTOL = 1e-4


# ------------------------------------------------------------------------------------------------
# QDQ post-processing (pure ONNX graph rewriting)
# ------------------------------------------------------------------------------------------------
class _Graph:
    """Small helper over an ONNX GraphProto: constants, producers and consumers of values."""

    def __init__(self, model) -> None:
        self.model, self.g = model, model.graph
        self._n = 0

    def const(self, name: str, _depth: int = 0) -> np.ndarray | None:
        """Value of ``name`` if it is constant: an initializer, a Constant node, or an Identity/Cast
        of one (the exporter deduplicates equal buffers into Identity nodes)."""
        from onnx import helper, numpy_helper

        for init in self.g.initializer:
            if init.name == name:
                return numpy_helper.to_array(init)
        node = self.producer(name)
        if node is None or _depth > 8:
            return None
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        elif node.op_type == "Identity":
            return self.const(node.input[0], _depth + 1)
        elif node.op_type == "Cast":
            v = self.const(node.input[0], _depth + 1)
            if v is not None:
                return v.astype(helper.tensor_dtype_to_np_dtype(_attr(node, "to", 1)))
        return None

    def producer(self, name: str):
        return next((n for n in self.g.node if name in n.output), None)

    def consumers(self, name: str) -> list:
        return [n for n in self.g.node if name in n.input]

    def is_graph_output(self, name: str) -> bool:
        return any(o.name == name for o in self.g.output)

    def add_init(self, array: np.ndarray, hint: str) -> str:
        from onnx import numpy_helper

        self._n += 1
        name = f"{hint}_nsq{self._n}"
        self.g.initializer.append(numpy_helper.from_array(array, name))
        return name

    def rewire(self, old: str, new: str) -> None:
        for n in self.g.node:
            for i, x in enumerate(n.input):
                if x == old:
                    n.input[i] = new

    def remove(self, node) -> None:
        self.g.node.remove(node)

    def prune(self) -> None:
        """Drop unused Constant nodes and initializers."""
        while True:
            used = {x for n in self.g.node for x in n.input} | {o.name for o in self.g.output}
            dead = [n for n in self.g.node if n.op_type == "Constant" and n.output[0] not in used]
            for n in dead:
                self.g.node.remove(n)
            if not dead:
                break
        used = {x for n in self.g.node for x in n.input} | {o.name for o in self.g.output}
        keep = [i for i in self.g.initializer if i.name in used]
        del self.g.initializer[:]
        self.g.initializer.extend(keep)


def _attr(node, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _bshape(param: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    if param.ndim == 0:
        return param
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return param.reshape(shape)


def _qdq_params(gr: _Graph, node) -> tuple[np.ndarray, np.ndarray] | None:
    scale = gr.const(node.input[1])
    zp = gr.const(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros((), np.uint8)
    return None if scale is None or zp is None else (scale, zp)


def _fold_weight_quantize(gr: _Graph) -> int:
    """QuantizeLinear(constant float) -> int8/uint8 initializer (ONNX rounding: half to even)."""
    count = 0
    for q in [n for n in gr.g.node if n.op_type == "QuantizeLinear"]:
        x, params = gr.const(q.input[0]), _qdq_params(gr, q)
        users = gr.consumers(q.output[0])
        if x is None or params is None or not users or any(u.op_type != "DequantizeLinear" for u in users) \
                or gr.is_graph_output(q.output[0]):
            continue
        scale, zp = params
        info = np.iinfo(zp.dtype)
        axis = _attr(q, "axis", 1)
        s, z = _bshape(scale.astype(np.float32), x.ndim, axis), _bshape(zp.astype(np.int32), x.ndim, axis)
        codes = np.clip(np.rint(x.astype(np.float32) / s) + z, info.min, info.max).astype(zp.dtype)
        gr.rewire(q.output[0], gr.add_init(codes, q.input[0].replace("::", "_") + "_quantized"))
        gr.remove(q)
        count += 1
    return count


def _transpose_constant_dq(gr: _Graph) -> None:
    """DQ(int8 constant) -> Transpose  ==>  DQ(transposed constant) (per-channel axis follows)."""
    for dq in [n for n in gr.g.node if n.op_type == "DequantizeLinear"]:
        codes = gr.const(dq.input[0])
        users = gr.consumers(dq.output[0])
        if codes is None or len(users) != 1 or users[0].op_type != "Transpose" or gr.is_graph_output(dq.output[0]):
            continue
        tr = users[0]
        perm = list(_attr(tr, "perm", list(reversed(range(codes.ndim)))))
        dq.input[0] = gr.add_init(np.ascontiguousarray(codes.transpose(perm)), dq.input[0] + "_t")
        scale = gr.const(dq.input[1])
        if scale is not None and scale.ndim == 1:
            axis = _attr(dq, "axis", 1) % codes.ndim
            for a in dq.attribute:
                if a.name == "axis":
                    a.i = perm.index(axis)
        gr.rewire(tr.output[0], dq.output[0])
        gr.remove(tr)


def _quantize_biases(gr: _Graph) -> int:
    """Conv/Gemm float bias -> DQ(int32 codes, scale s_x * s_w) when the bias is exactly such codes."""
    from onnx import helper

    count = 0
    for node in [n for n in gr.g.node if n.op_type in ("Conv", "Gemm")]:
        if len(node.input) < 3 or not node.input[2]:
            continue
        bias = gr.const(node.input[2])
        dq_x, dq_w = gr.producer(node.input[0]), gr.producer(node.input[1])
        if bias is None or bias.ndim != 1 or dq_x is None or dq_w is None or \
                dq_x.op_type != "DequantizeLinear" or dq_w.op_type != "DequantizeLinear":
            continue
        px, pw, codes_w = _qdq_params(gr, dq_x), _qdq_params(gr, dq_w), gr.const(dq_w.input[0])
        if px is None or pw is None or codes_w is None or px[0].ndim != 0:
            continue
        if node.op_type == "Gemm" and (_attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0
                                       or _attr(node, "beta", 1.0) != 1.0):
            continue
        out_axis = 0 if node.op_type == "Conv" or _attr(node, "transB", 0) else 1
        sw = pw[0].astype(np.float32)
        if sw.ndim == 1 and (_attr(dq_w, "axis", 1) % codes_w.ndim != out_axis or sw.size != bias.size):
            continue
        sb = (np.float32(px[0]) * np.broadcast_to(sw, bias.shape)).astype(np.float32)
        qb = np.clip(np.rint(bias.astype(np.float32) / sb), -2**31, 2**31 - 1).astype(np.int32)
        if not np.array_equal(qb.astype(np.float32) * sb, bias.astype(np.float32)):
            continue  # not an int32-rounded bias: a float layer, leave it
        q_name = gr.add_init(qb, node.input[2].replace("::", "_") + "_int32")
        s_name = gr.add_init(sb, node.input[2].replace("::", "_") + "_scale")
        z_name = gr.add_init(np.zeros_like(qb), node.input[2].replace("::", "_") + "_zero_point")
        out = q_name + "_dq"
        idx = list(gr.g.node).index(node)
        gr.g.node.insert(idx, helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [out], axis=0,
                                               name=out))
        node.input[2] = out
        count += 1
    return count


def _same_params(gr: _Graph, a, b) -> bool:
    pa, pb = _qdq_params(gr, a), _qdq_params(gr, b)
    if pa is None or pb is None or pa[1].dtype != pb[1].dtype:
        return False
    if _attr(a, "axis", 1) != _attr(b, "axis", 1) and pa[0].ndim > 0:
        return False
    return pa[0].shape == pb[0].shape and np.array_equal(pa[0], pb[0]) and np.array_equal(pa[1], pb[1])


def _drop_relu_after_dq(gr: _Graph) -> int:
    """Relu(DQ(q)) with zero point == code minimum is the identity (values are >= 0)."""
    count = 0
    for relu in [n for n in gr.g.node if n.op_type == "Relu"]:
        dq = gr.producer(relu.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or gr.is_graph_output(relu.output[0]):
            continue
        params = _qdq_params(gr, dq)
        if params is None or not np.all(params[1] == np.iinfo(params[1].dtype).min):
            continue
        gr.rewire(relu.output[0], relu.input[0])
        gr.remove(relu)
        count += 1
    return count


def _drop_redundant_qdq(gr: _Graph) -> int:
    """DQ(s, z) -> Q(s, z) is an exact round trip: the Q's readers read the DQ's input instead."""
    count = 0
    for q in [n for n in gr.g.node if n.op_type == "QuantizeLinear"]:
        dq = gr.producer(q.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or gr.is_graph_output(q.output[0]) \
                or not _same_params(gr, dq, q):
            continue
        gr.rewire(q.output[0], dq.input[0])
        gr.remove(q)
        if not gr.consumers(dq.output[0]) and not gr.is_graph_output(dq.output[0]):
            gr.remove(dq)
        count += 1
    return count


def qdq_postprocess(model) -> dict[str, int]:
    """Rewrite an exported QDQ ``onnx.ModelProto`` in place (see the module docstring). Returns counts."""
    gr = _Graph(model)
    stats = {"int8_weights": _fold_weight_quantize(gr)}
    _transpose_constant_dq(gr)
    stats["int32_biases"] = _quantize_biases(gr)
    stats["relu_removed"] = _drop_relu_after_dq(gr)
    stats["qdq_pairs_removed"] = _drop_redundant_qdq(gr)
    gr.prune()
    return stats


# ------------------------------------------------------------------------------------------------
# Export + verification
# ------------------------------------------------------------------------------------------------
def _flatten_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flatten_outputs(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _flatten_outputs(v)]
    if hasattr(out, "to_tuple"):  # transformers ModelOutput
        return _flatten_outputs(out.to_tuple())
    raise ExportError("export", f"model output contains a {type(out).__name__}",
                      fix="return tensors (or tuples/dicts of tensors) from forward")


def _input_names(model: nn.Module, example: Any) -> list[str]:
    if isinstance(example, dict):
        try:
            order = list(inspect.signature(model.forward).parameters)
        except (TypeError, ValueError):
            order = []
        return [k for k in order if k in example] + [k for k in example if k not in order]
    n = len(as_tuple(example))
    return ["input"] if n == 1 else [f"input_{i}" for i in range(n)]


class _KwargsAdapter(nn.Module):
    """``forward(*tensors)`` calling ``model(**dict(zip(names, tensors)))``."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, list(names)

    def forward(self, *args: Any) -> Any:
        return self.model(**dict(zip(self.names, args)))


def _call(model: Any, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(*as_tuple(inputs))


def _tolerance(ref: torch.Tensor, quantized: bool, atol: float | None) -> float:
    if atol is not None:
        return float(atol)
    ref = ref.detach().double()
    if not ref.is_floating_point() or ref.numel() == 0:
        return 0.0
    fp32_tol = FP32_RTOL * max(1.0, float(ref.abs().max()))
    if quantized:
        return max(QUANT_TOLERANCE_STEPS * float(ref.max() - ref.min()) / 255.0, fp32_tol)
    return fp32_tol


def verify_onnx(model: nn.Module, onnx_bytes: bytes, batches: list, quantized: bool,
                atol: float | None = None, where: str = "export", statistic: str = "max") -> dict[str, Any]:
    """Compare ONNX Runtime with the torch model on ``batches`` (model inputs). Raises ExportError.

    ``statistic="mean"`` checks the mean absolute difference against the tolerance instead of the
    maximum: for run-time (dynamic) activation quantization, float differences of 1e-7 between torch
    and ORT upstream flip a few activation codes, and deep models amplify those flips into
    differences as large as the quantization noise itself on some elements, with the same accuracy.
    """
    from .ort import OrtModule, optimized_op_types

    ort_model = OrtModule(onnx_bytes)
    max_diff, worst_ratio, agree, total, n_samples = 0.0, 0.0, 0, 0, 0
    tol_used, mean_diff, max_seen = 0.0, 0.0, 0.0
    for bi, inputs in enumerate(batches):
        with torch.no_grad():
            ref = _flatten_outputs(_call(model, inputs))
        got = _flatten_outputs(_call(ort_model, inputs))
        if len(ref) != len(got):
            raise ExportError(where, f"ONNX model returns {len(got)} outputs, torch returns {len(ref)}",
                              fix="return a fixed structure of tensors from forward")
        for oi, (r, g) in enumerate(zip(ref, got)):
            r = r.detach().cpu()
            if tuple(r.shape) != tuple(g.shape):
                raise ExportError(where, f"output {oi}: ONNX shape {tuple(g.shape)} != torch {tuple(r.shape)} "
                                  f"(batch {bi})", fix="avoid shape logic that the tracer freezes (e.g. Python "
                                  "ints from tensor.size() in arithmetic)")
            if not r.is_floating_point():
                d = float((r.long() != g.long()).any())
            else:
                dd = (r.double() - g.double()).abs()
                d = float(dd.max()) if r.numel() else 0.0
                mean_diff = max(mean_diff, float(dd.mean()) if r.numel() else 0.0)
                if statistic == "mean":
                    max_seen = max(max_seen, d)
                    d = float(dd.mean()) if r.numel() else 0.0
            tol = _tolerance(r, quantized, atol)
            max_diff, tol_used = max(max_diff, d), max(tol_used, tol)
            if d > tol or d != d:
                fix = ("check custom ops in forward; compare with verify=False and inspect the graph")
                if quantized:
                    fix = ("on x86 CPUs without VNNI, ORT's u8s8 kernels saturate int16 sums with 8-bit weights: "
                           "quantize on this machine with weights.reduce_range: auto (the default) or true; "
                           "otherwise pass atol=... if the difference is acceptable")
                raise ExportError(where, f"ONNX Runtime output {oi} differs from the torch model by {d:.4g} "
                                  f"({'mean' if statistic == 'mean' else 'max'} abs) "
                                  f"(tolerance {tol:.4g}) on verification batch {bi}", fix=fix)
            if tol > 0:
                worst_ratio = max(worst_ratio, d / tol)
        main = ref[0]
        if main.is_floating_point() and main.dim() == 2 and main.shape[1] > 1:
            agree += int((main.argmax(1) == got[0].argmax(1)).sum())
            total += main.shape[0]
        n_samples += int(main.shape[0]) if main.dim() else 1
    ops = Counter(optimized_op_types(onnx_bytes))
    return {
        "verified_batches": len(batches), "verified_samples": n_samples, "check": f"{statistic} abs diff",
        "max_abs_diff": max(max_diff, max_seen), "mean_abs_diff": mean_diff, "tolerance": tol_used, "diff_to_tolerance": round(worst_ratio, 4),
        "top1_agreement": (agree / total) if total else None,
        "ort_int8_ops": {k: v for k, v in sorted(ops.items()) if k in INT8_OPS},
        "ort_float_ops": {k: v for k, v in sorted(ops.items()) if k in FLOAT_COMPUTE_OPS},
    }


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@EXPORTERS.register("onnx")
def export_onnx(model: nn.Module, path: str | os.PathLike, example_inputs: Any, opset: int = 17,
                verify: bool = True, samples: Iterable | None = None, atol: float | None = None,
                dynamic_axes: dict[str, dict[int, str]] | None = None) -> dict[str, Any]:
    """Export ``model`` to ``path`` (int8 QDQ if it holds fake-quant layers) and check it in ORT.

    ``example_inputs``: a tensor, a tuple of positional tensors, or a dict of keyword tensors; the
    batch dimension (dim 0 of every input and output) is dynamic. ``samples``: more model inputs to
    verify on (each like ``example_inputs``; targets already split off). Tolerance: ``atol`` if
    given, else 1e-4 relative for float models and 4 steps of an 8-bit grid over each output's range
    for quantized ones. ``dynamic_axes``: more dynamic axes by input/output name, merged with the batch
    axis (e.g. ``{"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}}``). Returns JSON-able figures (sizes, max_abs_diff, top1_agreement, ORT op types).
    """
    import onnx

    path = Path(path)
    where = f"export onnx ({path.name})"
    if opset < 13:
        raise ExportError(where, f"opset {opset} is too old for per-channel QDQ", fix="use opset >= 13 (default 17)")
    quantized = any(True for _ in fake_quant_modules(model)) or \
        any(getattr(m, "onnx_quantized", False) for m in model.modules())
    custom_opsets = {}
    for m in model.modules():
        custom_opsets.update(getattr(m, "onnx_custom_opsets", {}))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref_out = _flatten_outputs(_call(model, example_inputs))
        in_names = _input_names(model, example_inputs)
        out_names = ["output"] if len(ref_out) == 1 else [f"output_{i}" for i in range(len(ref_out))]
        dyn = {n: {0: "batch"} for n in in_names + out_names}
        for n, axes in (dynamic_axes or {}).items():
            dyn.setdefault(n, {}).update(axes)
        buf = io.BytesIO()
        args = as_tuple(example_inputs)
        traced: nn.Module = model
        if isinstance(example_inputs, dict):
            # Keyword inputs go in positionally through an adapter: the TorchScript exporter fills
            # unnamed parameters from the signature, which breaks decorated forwards (transformers).
            traced, args = _KwargsAdapter(model, in_names).eval(), tuple(example_inputs[n] for n in in_names)
        try:
            with export_mode(model), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(traced, args, buf, dynamo=False, opset_version=opset, input_names=in_names,
                                  output_names=out_names, dynamic_axes=dyn, do_constant_folding=True,
                                  custom_opsets=custom_opsets or None)
        except Exception as e:
            raise ExportError(where, f"torch.onnx.export failed: {type(e).__name__}: {e}",
                              fix="make forward traceable (no data-dependent Python control flow)") from e
        raw = buf.getvalue()
        proto = onnx.load_from_string(raw)
        stats = qdq_postprocess(proto) if quantized else {}
        if any(getattr(m, "onnx_bf16_storage", False) for m in model.modules()):
            from .half import bf16_storage

            stats["bf16_constants"] = bf16_storage(proto)
        try:
            onnx.checker.check_model(proto)
        except Exception as e:
            raise ExportError(where, f"the exported graph is invalid: {e}", fix="report this as a bug") from e
        data = proto.SerializeToString()
        figures: dict[str, Any] = {"format": "onnx", "opset": opset, "quantized": quantized,
                                   "size_bytes": len(data), "fp32_size_bytes": len(raw),
                                   "size_ratio": round(len(data) / len(raw), 4), **stats}
        if verify:
            batches = [example_inputs] + list(samples or [])
            statistic = "mean" if any(getattr(m, "onnx_verify_mean", False) for m in model.modules()) else "max"
            figures.update(verify_onnx(model, data, batches, quantized, atol, where, statistic))
            if quantized and not figures["ort_int8_ops"]:
                figures["warning"] = "ONNX Runtime fused no int8 kernel: the model runs in float"
        _write_atomic(path, data)
    finally:
        model.train(was_training)
    return figures
