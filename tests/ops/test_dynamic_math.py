"""Dynamic activation quantization math against ONNX Runtime's DynamicQuantizeLinear/MatMulInteger."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nnsqueeze.ops.dynamic import dynamic_qparams, dynamic_quantize, int_linear


def _ort_dql(x: np.ndarray):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "s", "z"])
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                          [helper.make_tensor_value_info(n, t, None) for n, t in
                           (("y", TensorProto.UINT8), ("s", TensorProto.FLOAT), ("z", TensorProto.UINT8))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})


@pytest.mark.parametrize("case", ["normal", "positive", "negative", "zeros", "halves"])
def test_dynamic_quantize_matches_ort_bit_exact(case):
    g = torch.Generator().manual_seed(1)
    x = {"normal": torch.randn(7, 13, generator=g) * 3, "positive": torch.rand(5, 11, generator=g) + 0.5,
         "negative": -torch.rand(3, 9, generator=g), "zeros": torch.zeros(4, 5),
         "halves": torch.tensor([-1.0, 0.0, 2.0, 0.5, 1.5, 2.5 / 255 * 3])}[case]
    y, s, z = _ort_dql(x.numpy())
    scale, zp = dynamic_qparams(x)
    assert float(scale) == float(s) and int(zp) == int(z)
    assert np.array_equal(dynamic_quantize(x).numpy(), y)


def test_int_linear_is_exact_integer_product():
    g = torch.Generator().manual_seed(2)
    x, codes = torch.randn(3, 5, 37, generator=g), torch.randint(-127, 128, (11, 37), generator=g)
    ws = torch.rand(11, generator=g) / 100
    b = torch.randn(11, generator=g)
    y = int_linear(x, codes, ws, None, b)
    s, z = dynamic_qparams(x)
    a = dynamic_quantize(x).long() - int(z)
    acc = torch.einsum("btk,nk->btn", a, codes.long())  # exact int64 reference
    ref = acc.to(torch.float32) * (s * ws) + b
    assert torch.equal(y, ref)
