"""bf16 storage for exported ONNX graphs (ONNX Runtime has no bf16 MatMul/Conv on CPU).

The exporter constant-folds ``Cast(bf16 weight -> float)`` into fp32 constants, doubling the file.
:func:`bf16_storage` undoes that exactly: every fp32 constant (initializer or ``Constant`` node)
whose values are all representable in bf16 (low 16 bits zero) and that has at least ``min_size``
elements is stored as bf16 and cast back to fp32 in the graph, bit for bit the same values::

    >>> import numpy as np, onnx
    >>> from onnx import helper, numpy_helper
    >>> w = (np.arange(32, dtype=np.float32) / 4).reshape(4, 8)       # exact in bf16
    >>> g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
    ...     [helper.make_tensor_value_info("x", 1, [1, 4])], [helper.make_tensor_value_info("y", 1, None)],
    ...     [numpy_helper.from_array(w, "w")])
    >>> m = helper.make_model(g); bf16_storage(m)
    1
    >>> [n.op_type for n in m.graph.node], m.graph.initializer[0].data_type
    (['Cast', 'MatMul'], 16)
"""

from __future__ import annotations

import numpy as np


def _to_bf16_tensor(arr: np.ndarray, name: str):
    from onnx import TensorProto, helper

    bits = (arr.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    t = helper.make_tensor(name, TensorProto.BFLOAT16, list(arr.shape), bits.tobytes(), raw=True)
    return t


def _to_fp16_tensor(arr: np.ndarray, name: str):
    from onnx import numpy_helper

    return numpy_helper.from_array(arr.astype(np.float16), name)


def _bf16_exact(arr: np.ndarray) -> bool:
    return not np.any(arr.view(np.uint32) & 0xFFFF)


def _fp16_exact(arr: np.ndarray) -> bool:
    with np.errstate(over="ignore"):
        h = arr.astype(np.float16)
    return bool(np.all(np.isfinite(h)) and np.array_equal(h.astype(np.float32), arr))


def bf16_storage(model, min_size: int = 16) -> int:
    """Rewrite ``model`` (onnx.ModelProto) in place; returns how many constants now live in bf16."""
    return _narrow_storage(model, min_size, _bf16_exact, _to_bf16_tensor, "_bf16")


def fp16_storage(model, min_size: int = 1024) -> int:
    """Same for fp16: fp32 constants of at least ``min_size`` elements whose values are all exact
    fp16 numbers (e.g. int8 embedding row scales and float outlier weights, which nnsqueeze rounds
    to fp16 on purpose) are stored in fp16 and cast back, bit for bit. Returns how many."""
    return _narrow_storage(model, min_size, _fp16_exact, _to_fp16_tensor, "_fp16")


def _narrow_storage(model, min_size: int, exact, make, suffix: str) -> int:
    from onnx import helper, numpy_helper

    g = model.graph
    count = 0
    new_nodes = []
    for init in list(g.initializer):
        if init.data_type != 1:
            continue
        arr = numpy_helper.to_array(init)
        if arr.size < min_size or not exact(arr):
            continue
        name = init.name
        g.initializer.remove(init)
        g.initializer.append(make(arr, name + suffix))
        new_nodes.append(helper.make_node("Cast", [name + suffix], [name], to=1, name=name + "_cast"))
        count += 1
    for node in list(g.node):
        if node.op_type != "Constant" or len(node.attribute) != 1 or node.attribute[0].name != "value":
            continue
        t = node.attribute[0].t
        if t.data_type != 1:
            continue
        arr = numpy_helper.to_array(t)
        if arr.size < min_size or not exact(arr):
            continue
        out = node.output[0]
        g.initializer.append(make(arr, out + suffix))
        idx = list(g.node).index(node)
        g.node.remove(node)
        g.node.insert(idx, helper.make_node("Cast", [out + suffix], [out], to=1, name=out + "_cast"))
        count += 1
    for i, n in enumerate(new_nodes):
        g.node.insert(i, n)
    return count
