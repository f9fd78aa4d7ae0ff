"""QDQ post-processing: pure ONNX graph rewriting so ONNX Runtime runs int8 kernels.

- a QuantizeLinear of a constant weight becomes an int8 initializer feeding DequantizeLinear;
- a Conv/Gemm float bias becomes int32 codes of scale ``s_input * s_weight`` (what the fused
  kernels add to their accumulator; the torch simulation rounds the bias the same way);
- ``DQ -> Q`` with identical parameters (an exact round trip) is removed, and so is a ReLU that
  reads a DequantizeLinear whose zero point is the code minimum (its input is already >= 0);
- a zero ``Pad`` in front of a conv's input ``Q -> DQ`` (TF-"SAME" asymmetric padding, a
  ``ZeroPad2d``) moves into the ``Conv``'s ``pads``: ``Q(0)`` is the zero point, which
  QLinearConv pads with, so the codes are the same and ORT runs no float Pad (which also broke
  its NHWC int8 chain: measured on EfficientNet-Lite0, Pad + the Q/DQ around it took 48% of the time).

Every rewrite is exact. ``qdq_postprocess(model_proto)`` edits the proto in place and returns
counts of what it rewrote (used by :mod:`nnsqueeze.export.onnx`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

class Graph:
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
                return v.astype(helper.tensor_dtype_to_np_dtype(node_attr(node, "to", 1)))
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
        """Drop nodes (of the standard domain) whose outputs nobody reads, and unused initializers."""
        while True:
            used = {x for n in self.g.node for x in n.input} | {o.name for o in self.g.output}
            dead = [n for n in self.g.node if n.domain in ("", "ai.onnx")
                    and not any(o in used for o in n.output if o)]
            for n in dead:
                self.g.node.remove(n)
            if not dead:
                break
        used = {x for n in self.g.node for x in n.input} | {o.name for o in self.g.output}
        keep = [i for i in self.g.initializer if i.name in used]
        del self.g.initializer[:]
        self.g.initializer.extend(keep)


def node_attr(node, name: str, default: Any) -> Any:
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


def _qdq_params(gr: Graph, node) -> tuple[np.ndarray, np.ndarray] | None:
    scale = gr.const(node.input[1])
    zp = gr.const(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros((), np.uint8)
    return None if scale is None or zp is None else (scale, zp)


def _fold_weight_quantize(gr: Graph) -> int:
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
        axis = node_attr(q, "axis", 1)
        s, z = _bshape(scale.astype(np.float32), x.ndim, axis), _bshape(zp.astype(np.int32), x.ndim, axis)
        codes = np.clip(np.rint(x.astype(np.float32) / s) + z, info.min, info.max).astype(zp.dtype)
        gr.rewire(q.output[0], gr.add_init(codes, q.input[0].replace("::", "_") + "_quantized"))
        gr.remove(q)
        count += 1
    return count


def _transpose_constant_dq(gr: Graph) -> None:
    """DQ(int8 constant) -> Transpose  ==>  DQ(transposed constant) (per-channel axis follows)."""
    for dq in [n for n in gr.g.node if n.op_type == "DequantizeLinear"]:
        codes = gr.const(dq.input[0])
        users = gr.consumers(dq.output[0])
        if codes is None or len(users) != 1 or users[0].op_type != "Transpose" or gr.is_graph_output(dq.output[0]):
            continue
        tr = users[0]
        perm = list(node_attr(tr, "perm", list(reversed(range(codes.ndim)))))
        dq.input[0] = gr.add_init(np.ascontiguousarray(codes.transpose(perm)), dq.input[0] + "_t")
        scale = gr.const(dq.input[1])
        if scale is not None and scale.ndim == 1:
            axis = node_attr(dq, "axis", 1) % codes.ndim
            for a in dq.attribute:
                if a.name == "axis":
                    a.i = perm.index(axis)
        gr.rewire(tr.output[0], dq.output[0])
        gr.remove(tr)


def quantize_biases(gr: Graph) -> int:
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
        if node.op_type == "Gemm" and (node_attr(node, "transA", 0) or node_attr(node, "alpha", 1.0) != 1.0
                                       or node_attr(node, "beta", 1.0) != 1.0):
            continue
        out_axis = 0 if node.op_type == "Conv" or node_attr(node, "transB", 0) else 1
        sw = pw[0].astype(np.float32)
        if sw.ndim == 1 and (node_attr(dq_w, "axis", 1) % codes_w.ndim != out_axis or sw.size != bias.size):
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


def _same_params(gr: Graph, a, b) -> bool:
    pa, pb = _qdq_params(gr, a), _qdq_params(gr, b)
    if pa is None or pb is None or pa[1].dtype != pb[1].dtype:
        return False
    if node_attr(a, "axis", 1) != node_attr(b, "axis", 1) and pa[0].ndim > 0:
        return False
    return pa[0].shape == pb[0].shape and np.array_equal(pa[0], pb[0]) and np.array_equal(pa[1], pb[1])


def _clip_is_identity(gr: Graph, clip, scale: np.ndarray, zp: np.ndarray) -> bool:
    """Clip(min, max) of a per-tensor DQ's output changes nothing: every dequantized code (float32,
    as ORT computes them) lies in [min, max]."""
    lo = gr.const(clip.input[1]) if len(clip.input) > 1 and clip.input[1] else None
    hi = gr.const(clip.input[2]) if len(clip.input) > 2 and clip.input[2] else None
    if (len(clip.input) > 1 and clip.input[1] and lo is None) \
            or (len(clip.input) > 2 and clip.input[2] and hi is None) or scale.ndim or zp.ndim:
        return False
    info = np.iinfo(zp.dtype)
    s, z = np.float32(scale), np.int32(zp)
    first = np.float32(np.int32(info.min) - z) * s
    last = np.float32(np.int32(info.max) - z) * s
    return (lo is None or first >= np.float32(lo)) and (hi is None or last <= np.float32(hi))


def _drop_relu_after_dq(gr: Graph) -> int:
    """Relu(DQ(q)) with zero point == code minimum is the identity (values are >= 0), and so is a
    Clip (ReLU6) whose range holds every dequantized code."""
    count = 0
    for relu in [n for n in gr.g.node if n.op_type in ("Relu", "Clip")]:
        dq = gr.producer(relu.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or gr.is_graph_output(relu.output[0]):
            continue
        params = _qdq_params(gr, dq)
        if params is None:
            continue
        if relu.op_type == "Clip":
            if not _clip_is_identity(gr, relu, *params):
                continue
        elif not np.all(params[1] == np.iinfo(params[1].dtype).min):
            continue
        gr.rewire(relu.output[0], relu.input[0])
        gr.remove(relu)
        count += 1
    return count


def _const_subgraph(gr: Graph, name: str) -> np.ndarray | None:
    """Value of ``name`` when it is computed from constants only (the exporter's pad arithmetic:
    ConstantOfShape, Concat, Slice, Transpose, Reshape, Cast), evaluated with onnx's reference
    runtime; None when it depends on a graph input."""
    value = gr.const(name)
    if value is not None or not name:
        return value
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    inits = {i.name: i for i in gr.g.initializer}
    nodes, seen, todo = [], set(), [name]
    while todo:
        v = todo.pop()
        if v in seen or v in inits or not v:
            continue
        seen.add(v)
        node = gr.producer(v)
        if node is None or len(nodes) > 64:  # a graph input (or too large to be pad arithmetic)
            return None
        if node not in nodes:
            nodes.append(node)
            todo.extend(node.input)
    order = [n for n in gr.g.node if n in nodes]  # graph order is topological
    used = {x for n in order for x in n.input}
    graph = helper.make_graph(order, "const", [], [helper.make_value_info(name, helper.TypeProto())],
                              [inits[x] for x in used if x in inits])
    model = helper.make_model(graph, opset_imports=list(gr.model.opset_import))
    try:
        return np.asarray(ReferenceEvaluator(model).run(None, {})[0])
    except Exception:  # noqa: BLE001 - not evaluable: leave the Pad
        return None


def _fold_pad_into_conv(gr: Graph) -> int:
    """``Pad(x, zeros) -> Q -> DQ -> Conv`` ==> ``x -> Q -> DQ -> Conv(pads + Pad's)``, when the Pad
    is constant-mode with value 0 on the spatial axes only and every reader of its output is such a
    Q -> DQ -> Conv chain (exact: the conv pads the codes with the zero point, ``DQ(Q(0)) = 0``)."""
    count = 0
    for pad in [n for n in gr.g.node if n.op_type == "Pad"]:
        if node_attr(pad, "mode", b"constant") not in (b"constant", "constant") or len(pad.input) < 2 \
                or gr.is_graph_output(pad.output[0]) or (len(pad.input) > 4 and pad.input[4]):
            continue
        value = _const_subgraph(gr, pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(())
        pads = _const_subgraph(gr, pad.input[1])
        if value is None or pads is None or np.any(value != 0) or pads.ndim != 1 or pads.size % 2 \
                or pads.size < 6 or np.any(pads < 0):
            continue
        rank = pads.size // 2
        begin, end = pads[:rank], pads[rank:]
        if begin[:2].any() or end[:2].any():
            continue
        qs = gr.consumers(pad.output[0])
        convs = []
        for q in qs:
            if q.op_type != "QuantizeLinear" or q.input[0] != pad.output[0] or gr.is_graph_output(q.output[0]):
                break
            dqs = gr.consumers(q.output[0])
            if not dqs or any(d.op_type != "DequantizeLinear" or gr.is_graph_output(d.output[0]) for d in dqs):
                break
            readers = [c for d in dqs for c in gr.consumers(d.output[0])]
            if not readers or any(c.op_type != "Conv" or c.input[0] not in {d.output[0] for d in dqs}
                                  or node_attr(c, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
                                  for c in readers):
                break
            convs += readers
        else:
            if not qs:
                continue
            from onnx import helper

            for conv in convs:
                old = list(node_attr(conv, "pads", [0] * (2 * (rank - 2))))
                new = [int(a) + int(b) for a, b in zip(old, list(begin[2:]) + list(end[2:]))]
                kept = [a for a in conv.attribute if a.name != "pads"]
                del conv.attribute[:]
                conv.attribute.extend(kept + [helper.make_attribute("pads", new)])
            for q in qs:
                q.input[0] = pad.input[0]
            gr.remove(pad)
            count += 1
    return count


def _drop_redundant_qdq(gr: Graph) -> int:
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
    gr = Graph(model)
    stats = {"int8_weights": _fold_weight_quantize(gr)}
    _transpose_constant_dq(gr)
    stats["int32_biases"] = quantize_biases(gr)
    stats["relu_removed"] = _drop_relu_after_dq(gr)
    stats["pads_folded"] = _fold_pad_into_conv(gr)
    stats["qdq_pairs_removed"] = _drop_redundant_qdq(gr)
    gr.prune()
    return stats


