"""QuantAdd's eval forward reproduces ONNX Runtime's QLinearAdd element for element (``ort_isa``:
also under emulated AVX2), and stays within one code of the exact (float64) sum."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from nnsqueeze.ops.quant import quantize
from nnsqueeze.quant.functional import QuantAdd
from nnsqueeze.quant.integer import qlinear_add_codes
from nnsqueeze.quant.observers import MinMaxObserver


def _ort_qlinear_add(qa: np.ndarray, qb: np.ndarray, sa, za, sb, zb, sc, zc) -> np.ndarray:
    node = helper.make_node("QLinearAdd", ["a", "sa", "za", "b", "sb", "zb", "sc", "zc"], ["c"],
                            domain="com.microsoft")
    inits = [helper.make_tensor(k, TensorProto.FLOAT, [], [float(v)]) for k, v in (("sa", sa), ("sb", sb), ("sc", sc))]
    inits += [helper.make_tensor(k, TensorProto.UINT8, [], [int(v)]) for k, v in (("za", za), ("zb", zb), ("zc", zc))]
    shape = list(qa.shape)
    graph = helper.make_graph([node], "add", [helper.make_tensor_value_info("a", TensorProto.UINT8, shape),
                                              helper.make_tensor_value_info("b", TensorProto.UINT8, shape)],
                              [helper.make_tensor_value_info("c", TensorProto.UINT8, shape)], inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"a": qa, "b": qb})[0]


@pytest.mark.ort_isa
@pytest.mark.parametrize("shape", [(3, 13, 7, 5), (2, 33, 9, 9), (1, 1000)])
def test_qlinear_add_codes_equal_ort(shape):
    g = torch.Generator().manual_seed(sum(shape))
    mismatches, total = 0, 0
    for _ in range(20):
        sa, sb, sc = (torch.empty(()).uniform_(0.004, 0.2, generator=g) for _ in range(3))
        za, zb, zc = (torch.randint(0, 256, (), generator=g, dtype=torch.int32) for _ in range(3))
        qa = torch.randint(0, 256, shape, generator=g)
        qb = torch.randint(0, 256, shape, generator=g)
        a, b = (qa - za) * sa, (qb - zb) * sb  # dequantized inputs, as the previous layers hand them over
        ours = qlinear_add_codes(a, b, sa, za, sb, zb, sc, zc, 0, 255)
        theirs = _ort_qlinear_add(qa.numpy().astype(np.uint8), qb.numpy().astype(np.uint8), sa, za, sb, zb, sc, zc)
        mismatches += int((ours.numpy().astype(np.uint8) != theirs).sum())
        total += ours.numel()
        # closed form in float64: the codes are the rounded exact sum, up to float32 round-off at a boundary
        exact = ((qa - za).double() * float(sa) + (qb - zb).double() * float(sb)) / float(sc) + int(zc)
        assert (ours.double() - exact.round().clamp(0, 255)).abs().max() <= 1
    assert total > 1000 and mismatches == 0


def test_quant_add_eval_uses_the_integer_add():
    torch.manual_seed(0)
    add = QuantAdd()
    add.start_calibration(MinMaxObserver, "add")
    a, b = torch.randn(4, 7, 5, 3), torch.randn(4, 7, 5, 3) * 3
    add(a, b)
    add.finish_calibration()
    add.eval()
    x, y = torch.randn(2, 7, 5, 3), torch.randn(2, 7, 5, 3) * 3
    with torch.no_grad():
        got = add(x, y)
    codes = qlinear_add_codes(x, y, add.a_scale_, add.a_zero_point_, add.b_scale_, add.b_zero_point_,
                              add.output_scale_, add.output_zero_point_, 0, 255)
    assert torch.equal(got, (codes - add.output_zero_point_.float()) * add.output_scale_)
    # within one output step of the float simulation Q(DQ(a) + DQ(b)), and on its grid
    sim = add._fq(add._fq(x, "a") + add._fq(y, "b"), "output")
    assert (got - sim).abs().max() <= float(add.output_scale_) * 1.001
    q = quantize(got, add.output_scale_, add.output_zero_point_, 0, 255)
    assert torch.allclose((q - add.output_zero_point_).float() * add.output_scale_, got)
    # straight-through gradients when asked for
    xg = x.clone().requires_grad_(True)
    add(xg, y).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
