"""FP8 in ONNX: the float-format layers' markers become float8 QuantizeLinear/DequantizeLinear.

While :func:`torch.onnx.export` traces a :mod:`nnsqueeze.quant.floatq` layer, each FP8 tensor goes
through one marker node ``nnsqueeze::FloatQDQ(x, scale)`` (attributes ``fmt``, ``axis``).
:func:`fp8_postprocess` (called by :func:`nnsqueeze.export.onnx.export_onnx`) first moves the file to
opset 19, the first with float8 types in Q/DQ, then replaces every marker:

- a weight (an initializer): its codes are stored as a ``FLOAT8E4M3FN`` / ``FLOAT8E5M2`` initializer
  (one byte per weight, the bit patterns of :func:`nnsqueeze.ops.fp8.fp8_quantize`), decoded by
  ``DequantizeLinear(codes, scale, zero_point[, axis=0])``;
- an activation: ``QuantizeLinear(x, scale, zp) -> DequantizeLinear(q, scale, zp)``, ``saturate=1``
  (the default, as the simulation).

A dynamic activation (marker ``nnsqueeze::FloatDynQDQ(x)``, attributes ``fmt``, ``token``, ``block``)
computes its scale in the graph, as :func:`nnsqueeze.ops.fp8.fp8_dynamic_scale` does:
``s = Max(Div(ReduceMax(Abs(x)), max_finite), tiny)``, then ``QuantizeLinear(x, s) -> DequantizeLinear``.
Per tensor, ``s`` is a scalar (opset 19); per token, ``ReduceMax`` keeps the last axis and the Q/DQ
pair is blocked along it with ``block_size`` = the row length (opset 21, the first with blocked
Q/DQ: the file moves there; no zero point, ``output_dtype`` names the float8 type).

Zero points are float8 zeros of the scale's shape. ONNX Runtime's CPU provider runs these Q/DQ pairs
with float kernels around them (Conv/Gemm on the decoded values); x / scale is a float32 division and
rounding is to nearest-even there and in :mod:`nnsqueeze.ops.fp8`, so the file computes the torch
simulation up to float summation order. The block formats (MX, NVFP4) have no CPU kernel:
``export_onnx`` refuses them before tracing (:attr:`~nnsqueeze.quant.protocol.ExportHints.onnx_unsupported`).

    >>> import torch, tempfile, os
    >>> from torch import nn
    >>> from nnsqueeze.export.onnx import export_onnx
    >>> from nnsqueeze.quant.args import QuantArgs
    >>> from nnsqueeze.quant.floatq import convert_float_
    >>> model = nn.Sequential(nn.Linear(64, 8)).eval()
    >>> _ = convert_float_(model[0], QuantArgs(format="fp8-e4m3"), QuantArgs(format="fp8-e4m3", granularity="tensor"))
    >>> model[0].input_scale_.fill_(4.0 / 448)
    tensor(0.0089)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     figs = export_onnx(model, os.path.join(d, "m.onnx"), torch.randn(3, 64))
    >>> figs["opset"], figs["fp8_tensors"], figs["max_abs_diff"] < 1e-5
    (19, {'weights': 1, 'activations': 1}, True)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import ExportError
from ..ops.fp8 import fp8_quantize
from ..quant.floatq import DOMAIN, DYN_MARKER, MARKER

FP8_OPSET = 19
BLOCKED_OPSET = 21   # blocked QuantizeLinear / DequantizeLinear: per-token dynamic scales
_MAX = {"fp8-e4m3": 448.0, "fp8-e5m2": 57344.0}


def _elem_type(fmt: str) -> int:
    from onnx import TensorProto

    return {"fp8-e4m3": TensorProto.FLOAT8E4M3FN, "fp8-e5m2": TensorProto.FLOAT8E5M2}[fmt]


def _upgrade(model, where: str, target: int = FP8_OPSET) -> None:
    """Move ``model`` to opset ``target`` in place (the markers are custom-domain nodes the converter keeps)."""
    from onnx import version_converter

    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), target)
    if current >= target:
        return
    try:
        model.CopyFrom(version_converter.convert_version(model, target))
    except Exception as e:
        raise ExportError(where, f"float8 Q/DQ needs opset {target} and ONNX's version converter failed: "
                          f"{type(e).__name__}: {str(e)[:200]}", fix=f"export with opset {target} or later "
                          f"(export: {{onnx: {{opset: {target}}}}})") from None


def _dynamic_nodes(n, attrs: dict[str, Any], g, consts: dict[str, str], k: int) -> list:
    """The nodes replacing one ``FloatDynQDQ`` marker ``n``: the run-time scale, then Q/DQ."""
    from onnx import TensorProto, helper

    fmt = attrs["fmt"].decode() if isinstance(attrs["fmt"], bytes) else attrs["fmt"]
    token, elem, x, out, p = bool(attrs["token"]), _elem_type(fmt), n.input[0], n.output[0], n.output[0]

    def const(key: str, dtype: int, dims: list[int], vals: list | bytes) -> str:
        if key not in consts:
            consts[key] = f"fp8_dyn_{key}"
            raw = isinstance(vals, bytes)
            g.initializer.append(helper.make_tensor(consts[key], dtype, dims, vals, raw=raw))
        return consts[key]

    nodes = [helper.make_node("Abs", [x], [f"{p}_abs"], name=f"{n.name or k}_abs")]
    if token:
        axes = const("axes_last", TensorProto.INT64, [1], [-1])
        nodes.append(helper.make_node("ReduceMax", [f"{p}_abs", axes], [f"{p}_amax"], keepdims=1,
                                      name=f"{n.name or k}_amax"))
    else:
        nodes.append(helper.make_node("ReduceMax", [f"{p}_abs"], [f"{p}_amax"], keepdims=0, name=f"{n.name or k}_amax"))
    nodes.append(helper.make_node("Div", [f"{p}_amax", const(f"max_{fmt}", TensorProto.FLOAT, [], [_MAX[fmt]])],
                                  [f"{p}_ratio"], name=f"{n.name or k}_div"))
    tiny = const("tiny", TensorProto.FLOAT, [], [float(np.finfo(np.float32).tiny)])
    nodes.append(helper.make_node("Max", [f"{p}_ratio", tiny], [f"{p}_scale"], name=f"{n.name or k}_scale"))
    s, q = f"{p}_scale", f"{p}_fp8"
    if token:   # blocked along the last axis, one block per row: no zero point (its shape is dynamic)
        blk = {"axis": -1, "block_size": int(attrs["block"])}
        nodes.append(helper.make_node("QuantizeLinear", [x, s], [q], output_dtype=elem, name=f"{n.name or k}_q", **blk))
        nodes.append(helper.make_node("DequantizeLinear", [q, s], [out], name=f"{n.name or k}_dq", **blk))
    else:
        zp = const(f"zero_{fmt}", elem, [], bytes(1))
        nodes.append(helper.make_node("QuantizeLinear", [x, s, zp], [q], name=f"{n.name or k}_q"))
        nodes.append(helper.make_node("DequantizeLinear", [q, s, zp], [out], name=f"{n.name or k}_dq"))
    return nodes


def fp8_postprocess(model, where: str = "export onnx") -> dict[str, Any]:
    """Replace every ``FloatQDQ`` marker of ``model`` (an ``onnx.ModelProto``, in place); figures."""
    from onnx import TensorProto, helper, numpy_helper

    markers = [n for n in model.graph.node if n.domain == DOMAIN and n.op_type in (MARKER, DYN_MARKER)]
    if not markers:
        return {}
    token = any(n.op_type == DYN_MARKER and helper.get_attribute_value(next(a for a in n.attribute
                if a.name == "token")) for n in markers)
    _upgrade(model, where, BLOCKED_OPSET if token else FP8_OPSET)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    # the exporter shares equal constants through Identity nodes (two layers with one input scale)
    alias = {n.output[0]: n.input[0] for n in g.node if n.op_type == "Identity"}

    def value(name: str) -> np.ndarray | None:
        while name in alias and name not in inits:
            name = alias[name]
        if name in inits:
            return numpy_helper.to_array(inits[name])
        if name in consts:
            return numpy_helper.to_array(consts[name].attribute[0].t)
        return None

    uses: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    counts = {"weights": 0, "activations": 0}
    dyn_consts: dict[str, str] = {}
    out_nodes, fp8_q = [], set()   # fp8_q: the QuantizeLinear nodes written here (by name)
    for k, n in enumerate(g.node):
        if n.domain == DOMAIN and n.op_type == DYN_MARKER:
            new = _dynamic_nodes(n, {a.name: helper.get_attribute_value(a) for a in n.attribute}, g, dyn_consts, k)
            out_nodes.extend(new)
            fp8_q.update(m.name for m in new if m.op_type == "QuantizeLinear")
            counts["dynamic_activations"] = counts.get("dynamic_activations", 0) + 1
            continue
        if not (n.domain == DOMAIN and n.op_type == MARKER):
            out_nodes.append(n)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        fmt, axis = attrs["fmt"].decode() if isinstance(attrs["fmt"], bytes) else attrs["fmt"], int(attrs["axis"])
        x, s = n.input[0], n.input[1]
        scale = value(s)
        if scale is None:
            raise ExportError(where, f"the scale of fp8 tensor {x!r} is not a constant", fix="report this as a bug")
        elem = _elem_type(fmt)
        zp = f"{n.output[0]}_fp8_zero"
        g.initializer.append(helper.make_tensor(zp, elem, list(scale.shape), bytes(scale.size), raw=True))
        extra = {"axis": axis} if axis >= 0 else {}
        w = value(x)
        if w is not None:  # a weight: stored as its float8 codes
            codes = fp8_quantize(torch.from_numpy(w.astype(np.float32)), torch.from_numpy(scale.astype(np.float32)),
                                 fmt, None if axis < 0 else axis)
            cname = f"{n.output[0]}_fp8_codes"
            g.initializer.append(helper.make_tensor(cname, elem, list(w.shape), codes.numpy().tobytes(), raw=True))
            out_nodes.append(helper.make_node("DequantizeLinear", [cname, s, zp], [n.output[0]],
                                              name=f"{n.name or k}_dq", **extra))
            if uses.get(x, 0) == 1 and x in inits:  # the float weight is gone from the file
                g.initializer.remove(inits.pop(x))
            counts["weights"] += 1
        else:
            q = f"{n.output[0]}_fp8"
            out_nodes.append(helper.make_node("QuantizeLinear", [x, s, zp], [q], name=f"{n.name or k}_q", **extra))
            fp8_q.add(out_nodes[-1].name)
            out_nodes.append(helper.make_node("DequantizeLinear", [q, s, zp], [n.output[0]],
                                              name=f"{n.name or k}_dq", **extra))
            counts["activations"] += 1
    # ORT's ReluQuantFusion drops a Relu that feeds a QuantizeLinear whose zero point is 0, which is
    # right for uint8 codes (Q clamps at 0) and wrong for float8 ones (negative codes exist). Max(x, 0)
    # computes the same values and is not matched (measured: ORT 1.32, max diff 0.16 -> 3e-8).
    fp8_q_inputs = {n.input[0] for n in out_nodes if n.op_type == "QuantizeLinear" and n.name in fp8_q}
    zero, relu_as_max = None, 0
    for i, n in enumerate(out_nodes):
        if n.op_type == "Relu" and n.output[0] in fp8_q_inputs:
            if zero is None:
                zero = "fp8_relu_zero"
                g.initializer.append(helper.make_tensor(zero, TensorProto.FLOAT, [], [0.0]))
            out_nodes[i] = helper.make_node("Max", [n.input[0], zero], list(n.output), name=f"{n.name}_max")
            relu_as_max += 1
    del g.node[:]
    g.node.extend(out_nodes)
    if not any(n.domain == DOMAIN for n in g.node):
        keep = [o for o in model.opset_import if o.domain != DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(keep)
    return {"fp8_tensors": counts, **({"fp8_relu_as_max": relu_as_max} if relu_as_max else {})}
