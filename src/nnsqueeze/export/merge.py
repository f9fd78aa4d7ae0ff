"""Merge dynamic int8 Linears that read the same tensor into one wider matmul (pure ONNX rewriting).

A transformer's query, key and value projections (and any Linears sharing an input) each export
as ``[Mul r ->] DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul(x_scale * w_scale) -> Add(bias)``
(:mod:`nnsqueeze.quant.dynamic`). When they read the same tensor with the same smoothing
multiplier ``r``, their run-time quantization is identical, so one ``DynamicQuantizeLinear`` and
one ``MatMulInteger`` over the concatenated weight columns ``(K, N1+N2+...)`` followed by
``Split`` compute exactly the same numbers: every output column still sees the same codes,
accumulator, scale product and bias. ONNX Runtime then quantizes the input once and runs one
``DynamicQuantizeMatMul`` three times wider, which is faster than three small ones.

``merge_dynamic_siblings(model_proto)`` edits the proto in place and returns how many layers it
merged (called by :func:`nnsqueeze.export.onnx.export_onnx` for dynamically quantized models)::

    import onnx
    from nnsqueeze.export.merge import merge_dynamic_siblings
    proto = onnx.load("model.onnx")
    merge_dynamic_siblings(proto)     # e.g. 18 on all-MiniLM-L6-v2 (q, k, v of 6 layers)
    onnx.save(proto, "model.onnx")
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .qdq import _Graph


@dataclass
class _Member:
    key: tuple
    nodes: list          # in graph order: [Mul r], DQL, MatMulInteger, Cast, Mul(scales), Mul, Add
    w: np.ndarray        # (K, N) int8/uint8 codes
    wzp: np.ndarray      # (N,) or 0-d
    ws: np.ndarray       # (N,) or 0-d float32
    bias: np.ndarray     # (N,) float32
    out: str
    mul_r: object | None
    dql: object


def _only(gr: _Graph, name: str, op: str):
    users = gr.consumers(name)
    if len(users) != 1 or users[0].op_type != op or gr.is_graph_output(name):
        return None
    return users[0]


def _member(gr: _Graph, dql) -> _Member | None:
    xq, xs, xz = dql.output
    mmi = _only(gr, xq, "MatMulInteger")
    if mmi is None or len(mmi.input) < 4 or mmi.input[0] != xq or mmi.input[2] != xz:
        return None
    if [u.name for u in gr.consumers(xz)] != [mmi.name] or len(gr.consumers(xz)) != 1:
        return None
    w, wzp = gr.const(mmi.input[1]), gr.const(mmi.input[3])
    cast = _only(gr, mmi.output[0], "Cast")
    smul = _only(gr, xs, "Mul")
    if w is None or wzp is None or w.ndim != 2 or cast is None or smul is None:
        return None
    ws = gr.const(smul.input[1] if smul.input[0] == xs else smul.input[0])
    ymul = _only(gr, cast.output[0], "Mul")
    if ws is None or ymul is None or set(ymul.input) != {cast.output[0], smul.output[0]} \
            or _only(gr, smul.output[0], "Mul") is not ymul:
        return None
    add = _only(gr, ymul.output[0], "Add")
    if add is None:
        return None
    bias = gr.const(add.input[1] if add.input[0] == ymul.output[0] else add.input[0])
    n = w.shape[1]
    if bias is None or bias.shape != (n,) or ws.size not in (1, n) or wzp.size not in (1, n):
        return None
    src, mul_r, r_key = dql.input[0], None, None
    prod = gr.producer(src)
    if prod is not None and prod.op_type == "Mul" and _only(gr, src, "DynamicQuantizeLinear") is dql:
        consts = [(i, gr.const(x)) for i, x in enumerate(prod.input)]
        cidx = [i for i, c in consts if c is not None]
        if len(cidx) == 1:
            r = consts[cidx[0]][1]
            mul_r, r_key = prod, (r.dtype.str, r.shape, r.tobytes())
            src = prod.input[1 - cidx[0]]
    nodes = ([mul_r] if mul_r is not None else []) + [dql, mmi, cast, smul, ymul, add]
    key = (src, r_key, w.dtype.str, w.shape[0], wzp.dtype.str)
    return _Member(key, nodes, w, wzp, ws.astype(np.float32), bias.astype(np.float32), add.output[0], mul_r, dql)


def _full(a: np.ndarray, n: int) -> np.ndarray:
    return np.broadcast_to(a.reshape(-1), (n,)) if a.size == 1 else a.reshape(-1)


def merge_dynamic_siblings(model) -> int:
    """Merge sibling dynamic int8 Linears in ``model`` (an onnx ModelProto, edited in place)."""
    from onnx import helper

    gr = _Graph(model)
    groups: dict[tuple, list[_Member]] = {}
    for dql in [n for n in gr.g.node if n.op_type == "DynamicQuantizeLinear"]:
        m = _member(gr, dql)
        if m is not None:
            groups.setdefault(m.key, []).append(m)
    merged = 0
    for members in groups.values():
        if len(members) < 2:
            continue
        first = members[0]
        sizes = [m.w.shape[1] for m in members]
        tag = first.out.replace("::", "_").rsplit("/", 1)[0] + "/merged"
        w = gr.add_init(np.concatenate([m.w for m in members], axis=1), tag + "_w")
        wzp = gr.add_init(np.concatenate([_full(m.wzp, m.w.shape[1]) for m in members]).astype(first.wzp.dtype),
                          tag + "_wzp")
        ws = gr.add_init(np.concatenate([_full(m.ws, m.w.shape[1]) for m in members]).astype(np.float32),
                         tag + "_ws")
        bias = gr.add_init(np.concatenate([m.bias for m in members]).astype(np.float32), tag + "_b")
        split = gr.add_init(np.asarray(sizes, dtype=np.int64), tag + "_split")
        xq, xs, xz = first.dql.output
        new = [helper.make_node("MatMulInteger", [xq, w, xz, wzp], [tag + "_acc"]),
               helper.make_node("Cast", [tag + "_acc"], [tag + "_accf"], to=1),
               helper.make_node("Mul", [xs, ws], [tag + "_scale"]),
               helper.make_node("Mul", [tag + "_accf", tag + "_scale"], [tag + "_y"]),
               helper.make_node("Add", [tag + "_y", bias], [tag + "_out"]),
               helper.make_node("Split", [tag + "_out", split], [m.out for m in members], axis=-1)]
        keep = first.nodes[:-5]  # the shared [Mul r], DynamicQuantizeLinear
        drop = [n for m in members for n in m.nodes if not any(n is k for k in keep)]
        for n in drop:
            gr.remove(n)
        pos = next(i for i, n in enumerate(gr.g.node) if n is first.dql) + 1
        for i, n in enumerate(new):
            gr.g.node.insert(pos + i, n)
        merged += len(members)
    if merged:
        gr.prune()
    return merged
