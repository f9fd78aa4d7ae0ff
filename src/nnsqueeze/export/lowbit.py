"""Low-bit weights stored at their real width in the exported ONNX (int4/uint4/int8/uint8 codes).

Fake-quant layers whose weights are not plain int8 (2..4-bit uniform, per-group, asymmetric,
non-uniform ``levels``; see :mod:`nnsqueeze.quant.scheme`) trace their quantized weight through
:func:`lowbit_weight`, which writes one marker node ``nnsqueeze::LowBitWeight(w, scale[, zp |
levels])``. :func:`lowbit_postprocess` (called by :func:`nnsqueeze.export.onnx.export_onnx`) replaces
every marker by codes + a small decoding subgraph, so the file holds codes, not float32 weights.
2..4-bit codes go in 4-bit containers (INT4/UINT4, two per byte), 5..8-bit codes in INT8/UINT8.
INT4 needs opset 21, so a model with 4-bit codes is first converted from the exporter's opset (17)
to 21 with ONNX's version converter (``figures["lowbit_opset_upgrade"]`` says what happened):

- uniform per-channel/per-tensor (what ORT's int8 kernels read): ``Cast(int4 -> int8)`` (uint4 ->
  uint8) -> ``DequantizeLinear(axis 0)`` -> Conv/Gemm. ORT constant-folds the Cast at load and fuses
  QLinearConv/QGemm, so a w4 model runs the int8 kernels of a w8 model from a file half the size;
- per-group: codes as the scheme's rows ``(C_out * G, group_size)``, ``DequantizeLinear`` along axis
  0 (one scale per group), ``Reshape`` to the weight shape (no blocked quantization needed). When
  ``group_size`` does not divide a row, the partial last groups are a second code block ``(C_out, r)``
  with their own scales: both decode, ``Reshape`` to ``(C_out, .)`` and ``Concat`` (no padding codes);
- ``pow2`` / ``nf4`` / ``kmeans``: level indices, the level table and the row scales:
  ``Gather(levels, indices) * scale`` (indices decoded through DequantizeLinear, see below).

Per-group and level-table weights have no int8 kernel: their Conv/Gemm runs in float on weights
decoded at every inference. ORT never constant-folds DequantizeLinear, and that is on purpose here:
a folded float weight between quantized activations is re-quantized by ORT itself to per-tensor
int8 (its WeightBiasQuantization pass), which changes the numbers (the export before this module
failed parity on the demo CNN with nf4 weights for that reason). Decoding is one float32 multiply
per weight, as in the torch simulation; the pass checks the decoded weight equals the simulated one
bit for bit (else ExportError). Where the opset upgrade fails, 4-bit codes use ORT's
``com.microsoft`` DequantizeLinear (int4 at any opset, float kernels) and symmetric per-channel
weights keep int8 codes (int8 kernels). ::

    >>> import torch, tempfile, os
    >>> from torch import nn
    >>> from nnsqueeze.export.onnx import export_onnx
    >>> from nnsqueeze.quant.modules import convert_
    >>> from nnsqueeze.quant.scheme import WeightScheme
    >>> model = nn.Sequential(nn.Linear(256, 64)).eval()
    >>> _ = convert_(model[0], scheme=WeightScheme(bits=4, granularity="per-group", group_size=32))
    >>> with tempfile.TemporaryDirectory() as d:
    ...     figs = export_onnx(model, os.path.join(d, "m.onnx"), torch.randn(3, 256))
    >>> figs["lowbit_weights"], figs["size_bytes"] < 0.3 * figs["fp32_size_bytes"]
    ({'int4': 1}, True)
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import torch

from ..errors import ExportError
from ..ops.quant import code_range
# The tracing side (the marker a quantized layer's export forward emits) lives with the layers, below
# the exporters; the names stay importable from here, where the pass that replaces the marker is.
from ..quant.lowbit_marker import (DOMAIN, INT4_FOR_INT8_KERNEL_SCHEMES, MARKER, LowBitWeightFn, lowbit_weight,
                                   stores_lowbit)
from .qdq import node_attr

__all__ = ["DOMAIN", "MARKER", "INT4_FOR_INT8_KERNEL_SCHEMES", "LowBitWeightFn", "lowbit_weight", "stores_lowbit",
           "lowbit_postprocess"]

Tensor = torch.Tensor

def _codes(w: np.ndarray, scale: np.ndarray, extra: np.ndarray | None, bits: int, symmetric: bool,
           table: bool) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes (R, D) of the rows of ``w`` and the decoded rows (float32, as ORT decodes)."""
    rows = w.reshape(scale.size, -1).astype(np.float32)
    s = scale.astype(np.float32).reshape(-1, 1)
    if table:
        lv = extra.astype(np.float32)
        mid = (lv[1:] + lv[:-1]) / np.float32(2)          # nearest level, ties low (= ops.quant.nearest_level)
        q = np.searchsorted(mid, rows / s, side="left").astype(np.int64)
        return q, lv[q] * s
    z = np.zeros_like(s, dtype=np.int32) if extra is None else extra.astype(np.int32).reshape(-1, 1)
    q = (np.rint(rows / s) + z).astype(np.int64)        # half to even, like torch.round and ONNX
    return q, (q - z).astype(np.float32) * s


def _container(bits: int, signed: bool) -> tuple[int, str]:
    from onnx import TensorProto

    if bits <= 4:
        return (TensorProto.INT4, "int4") if signed else (TensorProto.UINT4, "uint4")
    return (TensorProto.INT8, "int8") if signed else (TensorProto.UINT8, "uint8")


def _raw_tensor(name: str, dtype: int, shape: list[int], q: np.ndarray, bits: int, signed: bool):
    """A TensorProto holding integer codes ``q`` in ``raw_data``: 4-bit containers two per byte
    (flattened, element 2i in the low nibble, two's complement for INT4: ONNX's layout and the
    artifact's :func:`~nnsqueeze.ops.int4.pack_int4`), else one byte each."""
    from onnx import helper

    from ..ops.int4 import pack_int4

    flat = q.reshape(-1).astype(np.int64)
    if bits <= 4:
        raw = pack_int4(torch.from_numpy((flat & 0xF).astype(np.uint8))).numpy().tobytes()
    else:
        raw = flat.astype(np.int8 if signed else np.uint8).tobytes()
    return helper.make_tensor(name, dtype, shape, raw, raw=True)


def _upgrade_to_21(model) -> str | None:
    """Convert ``model`` (in place) to opset 21 with ONNX's version converter; None if done, else why not."""
    import onnx
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(model, 21)
        # the markers are not known to the checker; everything else must be a valid opset-21 graph
        onnx.checker.check_model(converted)
    except Exception as e:  # e.g. no adapter for some op: keep the opset, use com.microsoft for int4
        return f"{type(e).__name__}: {str(e)[:200]}"
    model.CopyFrom(converted)
    return None


def _transpose_consumer(gr, out: str):
    users = gr.consumers(out)
    if len(users) == 1 and users[0].op_type == "Transpose" and not gr.is_graph_output(out):
        return users[0]
    return None


def _blocks(w: np.ndarray, scale: np.ndarray, extra: np.ndarray | None, group: int,
            table: bool) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """The weight as blocks of rows ``(w_rows, scale, extra)``: one block (the scheme's (R, L) rows),
    or, when the group length ``group`` does not divide the ``D`` weights of an output channel, the
    full groups ``(C_out * (G-1), L)`` and the partial last groups ``(C_out, D - (G-1) * L)``."""
    c_out = w.shape[0]
    d = w.size // max(c_out, 1)
    if group <= 0 or d % group == 0:
        return [(w.reshape(scale.size, -1), scale, extra)]
    g = -(-d // group)
    full = (g - 1) * group
    w2, s2 = w.reshape(c_out, d), scale.reshape(c_out, g)
    if extra is None or table:   # no zero points, or one level table shared by all rows
        e_full = e_tail = extra
    else:                        # zero points (C_out * G,)
        e2 = extra.reshape(c_out, g)
        e_full, e_tail = e2[:, :-1].reshape(-1), e2[:, -1]
    return [(w2[:, :full].reshape(-1, group), s2[:, :-1].reshape(-1), e_full), (w2[:, full:], s2[:, -1], e_tail)]


def _decode_rows(gr, c_name: str, rows: str, q: np.ndarray, scale: np.ndarray, extra: np.ndarray | None, bits: int,
                 symmetric: bool, table: bool, four_bit: bool, signed: bool, dtype: int, base: str,
                 dq_domain: str) -> list:
    """Stores codes ``q`` (R, L) as initializer ``c_name`` and returns the nodes decoding them into
    the float rows ``rows``: DequantizeLinear (axis 0, one scale per row) or a level-table Gather."""
    from onnx import TensorProto, helper

    new = []
    gr.g.initializer.append(_raw_tensor(c_name, dtype, list(q.shape), q, bits, signed))
    if table:
        # Indices -> float (exact) -> int32 for Gather, through DequantizeLinear rather than a
        # Cast: ORT does not constant-fold DequantizeLinear, so it cannot turn the decoded table
        # into a float weight and re-quantize that to per-tensor int8 (WeightBiasQuantization).
        one = gr.add_init(np.ones((), np.float32), base + "_one")
        new.append(helper.make_node("DequantizeLinear", [c_name, one], [c_name + "_f"], domain=dq_domain,
                                    name=c_name + "_idx"))
        new.append(helper.make_node("Cast", [c_name + "_f"], [c_name + "_i32"], to=TensorProto.INT32,
                                    name=c_name + "_cast"))
        lv = gr.add_init(extra.astype(np.float32).reshape(-1), base + "_levels")
        new.append(helper.make_node("Gather", [lv, c_name + "_i32"], [c_name + "_lv"], axis=0,
                                    name=c_name + "_gather"))
        s = gr.add_init(scale.reshape(-1, 1), base + "_scale")
        new.append(helper.make_node("Mul", [c_name + "_lv", s], [rows], name=c_name + "_mul"))
        return new
    ins = [c_name, gr.add_init(np.ascontiguousarray(scale.reshape(-1)), base + "_scale")]
    if not symmetric:
        z_name = f"{base}_zero_point{gr._n}"
        gr._n += 1
        zp = extra.astype(np.int64).reshape(-1)
        gr.g.initializer.append(_raw_tensor(z_name, dtype, [zp.size], zp, bits if four_bit else 8, signed))
        ins.append(z_name)
    new.append(helper.make_node("DequantizeLinear", ins, [rows], axis=0, domain=dq_domain, name=c_name + "_dq"))
    return new


def _replace(gr, node, opset21: bool) -> str:
    """Replace one marker node by codes + decoding nodes; returns the container name."""
    from onnx import TensorProto, helper

    g = gr.g
    where = f"export onnx (weight {node.input[0]})"
    w, scale = gr.const(node.input[0]), gr.const(node.input[1])
    extra = gr.const(node.input[2]) if len(node.input) > 2 else None
    if w is None or scale is None or (len(node.input) > 2 and extra is None):
        raise ExportError(where, "a low-bit weight, its scales or zero points are not constants in the graph",
                          fix="export in eval mode with nnsqueeze.export.onnx.export_onnx")
    bits = node_attr(node, "bits", 8)
    symmetric, table = bool(node_attr(node, "symmetric", 1)), bool(node_attr(node, "table", 0))
    scale = scale.astype(np.float32).reshape(-1)
    blocks = _blocks(w, scale, extra, int(node_attr(node, "group", 0)), table)
    coded = [_codes(bw, bs, be, bits, symmetric, table) for bw, bs, be in blocks]
    q = coded[0][0] if len(coded) == 1 else np.concatenate([c[0].reshape(w.shape[0], -1) for c in coded], 1)
    decoded = np.concatenate([c[1].reshape(w.shape[0], -1) for c in coded], 1)
    if not np.array_equal(decoded.reshape(w.shape), w.astype(np.float32)):
        raise ExportError(where, f"the {bits}-bit codes do not reproduce the simulated weight exactly "
                          f"(max diff {float(np.abs(decoded.reshape(w.shape) - w).max()):.3g})",
                          fix="report this as a bug")
    signed = symmetric and not table
    lo, hi = code_range(bits, signed)
    if q.size and (q.min() < lo or q.max() > hi):
        raise ExportError(where, f"codes in [{q.min()}, {q.max()}] exceed the {bits}-bit range",
                          fix="report this as a bug")
    four_bit = bits <= 4
    # Uniform per-channel/per-tensor rows (R = C_out) are what ORT's int8 kernels read.
    kernel_able = not table and scale.size == w.shape[0]
    if four_bit and kernel_able and not opset21 and symmetric:
        four_bit = False   # no foldable int4 -> int8 below opset 21: int8 codes keep the int8 kernels
    dtype, label = _container(bits if four_bit else 8, signed)
    base = node.input[0].replace("::", "_").replace("/", "_").strip("_") or "w"
    c_name = f"{base}_codes{gr._n}"
    gr._n += 1
    out, new = node.output[0], []
    dq_domain = "com.microsoft" if four_bit and not opset21 else ""
    perm, tr = None, None
    if kernel_able and (not four_bit or opset21):
        # Codes in the weight's own shape, DequantizeLinear straight into the Conv/Gemm: ORT fuses its
        # int8 kernels (QLinearConv/QGemm, int8 or uint8 per-channel weights). 4-bit codes go through a
        # Cast to 8 bits first (opset 21), which ORT constant-folds at load: small file, int8 kernels.
        tr = _transpose_consumer(gr, out)
        codes = q.reshape(w.shape)
        axis = 0
        if tr is not None:   # Linear as MatMul(x, W^T): store W^T, the per-channel axis follows
            perm = list(node_attr(tr, "perm", list(reversed(range(codes.ndim)))))
            codes, axis = np.ascontiguousarray(codes.transpose(perm)), perm.index(0)
            out = tr.output[0]
        g.initializer.append(_raw_tensor(c_name, dtype, list(codes.shape), codes, bits if four_bit else 8, signed))
        src = c_name
        if four_bit:
            to = TensorProto.INT8 if signed else TensorProto.UINT8
            new.append(helper.make_node("Cast", [c_name], [c_name + "_8bit"], to=to, name=c_name + "_cast"))
            src = c_name + "_8bit"
        # An explicit zero point, zeros when symmetric: ORT fuses QGemm only with one present.
        zp = np.zeros(scale.size, np.int64) if symmetric else extra.astype(np.int64).reshape(-1)
        ins = [src, gr.add_init(scale, base + "_scale"),
               gr.add_init(zp.astype(np.int8 if signed else np.uint8), base + "_zero_point")]
        new.append(helper.make_node("DequantizeLinear", ins, [out], axis=axis, name=c_name + "_dq"))
    else:
        # Rows (R, L) + Reshape: per-group rows, level tables, and 4-bit codes that no int8 kernel can
        # read here. A DequantizeLinear never feeds the Conv/Gemm directly, which keeps ORT from
        # rounding the float bias to int32 for a fusion that cannot happen (its
        # WeightBiasQuantization pass): ORT computes exactly the simulated numbers, in float.
        # A partial last group (group_size not dividing C_in/groups * k) is a second block of rows
        # (C_out, r) with its own codes and scales: Reshape both to (C_out, .) and Concat along the
        # inputs. No padding is stored or decoded, so every stored code is a real weight.
        parts = []
        for k, ((_bw, bs, be), (bq, _)) in enumerate(zip(blocks, coded)):
            name = c_name if k == 0 else f"{base}_codes{gr._n}"
            gr._n += k > 0
            rows = out + (f"_rows{k}" if k else "_rows")
            new.extend(_decode_rows(gr, name, rows, bq, bs, be, bits, symmetric, table, four_bit, signed, dtype,
                                    base, dq_domain))
            if len(blocks) > 1:
                flat = gr.add_init(np.array([w.shape[0], -1], np.int64), base + "_block_shape")
                new.append(helper.make_node("Reshape", [rows, flat], [rows + "_2d"], name=name + "_reshape2d"))
                rows += "_2d"
            parts.append(rows)
        if len(parts) > 1:
            new.append(helper.make_node("Concat", parts, [out + "_cat"], axis=1, name=c_name + "_concat"))
            parts = [out + "_cat"]
        shape = gr.add_init(np.array(w.shape, np.int64), base + "_shape")
        new.append(helper.make_node("Reshape", [parts[0], shape], [out], name=c_name + "_reshape"))
    at = list(g.node).index(node)
    g.node.remove(node)
    if perm is not None:
        g.node.remove(tr)
    for k, n in enumerate(new):
        g.node.insert(at + k, n)
    return label


def lowbit_postprocess(model, upgrade_opset: bool = True) -> dict[str, Any]:
    """Replace every ``nnsqueeze::LowBitWeight`` marker of an exported ``onnx.ModelProto`` (in place)
    by stored codes and their decoding nodes (see the module docstring). With 4-bit codes and
    ``upgrade_opset``, a model below opset 21 is converted to opset 21 first (ONNX's version
    converter); if that fails, 4-bit codes use ``com.microsoft`` DequantizeLinear and int8-kernel
    schemes keep int8 codes. Returns ``{"lowbit_weights": {container: count}, ...}`` ({} without markers)."""
    from onnx import helper

    from .qdq import Graph, quantize_biases

    markers = [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == MARKER]
    if not markers:
        return {}
    stats: dict[str, Any] = {}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 21 and upgrade_opset and any(node_attr(n, "bits", 8) <= 4 for n in markers):
        why = _upgrade_to_21(model)
        if why is None:
            stats["lowbit_opset_upgrade"] = f"{opset} -> 21 (int4 storage)"
            opset = 21
        else:
            stats["lowbit_opset_upgrade"] = f"not possible ({why}): int4 via com.microsoft DequantizeLinear"
    gr = Graph(model)
    markers = [n for n in gr.g.node if n.domain == DOMAIN and n.op_type == MARKER]
    counts = Counter(_replace(gr, n, opset >= 21) for n in markers)
    # Int8-kernel layers: their (already int32-rounded) float bias becomes int32 codes, as in qdq.py.
    stats["int32_biases_lowbit"] = quantize_biases(gr)
    gr.prune()
    keep = [o for o in model.opset_import if o.domain != DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    if any(n.domain == "com.microsoft" for n in gr.g.node) and not any(o.domain == "com.microsoft"
                                                                        for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    if any(k in counts for k in ("int4", "uint4")):
        model.ir_version = max(model.ir_version, 10)   # INT4/UINT4 tensors: IR version 10
    return {"lowbit_weights": dict(sorted(counts.items())), **stats}
