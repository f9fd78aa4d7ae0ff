"""QDQ post-processing: a Clip (ReLU6) after a DequantizeLinear goes only when it cannot change a value."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from nnsqueeze.export.qdq import qdq_postprocess


def _graph(scale: float, zp: int, lo: float = 0.0, hi: float = 6.0) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(np.array(scale, np.float32), "s"),
             numpy_helper.from_array(np.array(zp, np.uint8), "z"),
             numpy_helper.from_array(np.array(lo, np.float32), "lo"),
             numpy_helper.from_array(np.array(hi, np.float32), "hi")]
    nodes = [helper.make_node("DequantizeLinear", ["x", "s", "z"], ["d"]),
             helper.make_node("Clip", ["d", "lo", "hi"], ["c"]),
             helper.make_node("Neg", ["c"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, [4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _ops(m):
    return [n.op_type for n in m.graph.node]


def test_clip_covering_every_code_is_dropped():
    s = np.float32(6.0) / np.float32(255)
    while np.float32(s) * np.float32(255) > np.float32(6.0):
        s = np.nextafter(np.float32(s), np.float32(0))
    m = _graph(float(s), 0)
    stats = qdq_postprocess(m)
    assert "Clip" not in _ops(m) and stats["relu_removed"] == 1
    assert m.graph.node[-1].input[0] == "d"


@pytest.mark.parametrize("scale, zp, lo, hi", [
    (0.03, 0, 0.0, 6.0),        # top code 7.65 > 6: the Clip cuts
    (6.0 / 255 * 0.9, 10, 0.0, 6.0),  # codes below the zero point are negative
    (0.01, 0, 0.5, 6.0),        # the Clip raises small values
])
def test_clip_that_can_change_a_value_stays(scale, zp, lo, hi):
    m = _graph(scale, zp, lo, hi)
    qdq_postprocess(m)
    assert "Clip" in _ops(m)


def test_dropped_clip_computes_the_same_in_ort():
    import onnxruntime as ort

    s = np.float32(5.0 / 255)
    m = _graph(float(s), 0)
    x = np.array([0, 1, 128, 255], np.uint8)
    before = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    qdq_postprocess(m)
    after = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert "Clip" not in _ops(m) and np.array_equal(before, after)
