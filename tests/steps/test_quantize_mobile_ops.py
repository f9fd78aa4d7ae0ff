"""A TF-style mobile CNN (asymmetric "SAME" padding as ZeroPad2d before stride-2 depthwise convs,
odd channel counts, squeeze-excite, residual adds) quantized with ``ops: [add]`` runs all-integer in
ONNX Runtime (no Pad, no float Add, QLinearAdd for every residual add) and equals the torch
simulation (``ort_isa``: also under emulated AVX2)."""

import copy

import onnx
import pytest
import torch
from torch import nn

from nnsqueeze.context import Context
from nnsqueeze.export.onnx import export_onnx
from nnsqueeze.export.ort import OrtModule, optimized_op_types
from nnsqueeze.export.qdq import qdq_postprocess
from nnsqueeze.steps.quantize import Quantize
from ort_parity import ort_vs_sim  # tests/ is on sys.path (rootdir conftest)


def cbr(cin, cout, k=1, stride=1, groups=1, act=True, pad=None):
    conv = nn.Conv2d(cin, cout, k, stride, k // 2 if pad is None else 0, groups=groups, bias=False)
    layers = ([nn.ZeroPad2d(pad)] if pad is not None else []) + [conv, nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU6()) if act else nn.Sequential(*layers)


class SE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(c, 5, 1), nn.Conv2d(5, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.expand(torch.relu(self.reduce(x.mean((2, 3), keepdim=True)))))


class Block(nn.Module):
    def __init__(self, cin, cout, stride=1, k=3, se=False):
        super().__init__()
        mid = cin * 3
        pad = (k // 2 - 1, k // 2, k // 2 - 1, k // 2) if stride == 2 else None  # TF "SAME", stride 2
        self.expand = cbr(cin, mid)
        self.dw = cbr(mid, mid, k, stride, groups=mid, pad=pad)
        self.se = SE(mid) if se else nn.Identity()
        self.project = cbr(mid, cout, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.residual else y


class TFMobile(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 13, 3, 2, pad=(0, 1, 0, 1))
        self.blocks = nn.Sequential(Block(13, 13), Block(13, 13, se=True), Block(13, 19, stride=2, k=5),
                                    Block(19, 19, k=5), Block(19, 19))
        self.head = cbr(19, 41)
        self.fc = nn.Linear(41, 7)

    def forward(self, x):
        return self.fc(self.head(self.blocks(self.stem(x))).mean((2, 3)))


N_PADS, N_ADDS = 2, 4


def trained_bn(model: nn.Module) -> nn.Module:
    """Give ``model``'s BatchNorms trained-looking statistics and affine parameters (random init has
    mean 0, var 1, weight 1, bias 0), drawn from torch's global generator."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.3)
    return model


@pytest.fixture(scope="module")
def quantized():
    torch.manual_seed(0)
    model = TFMobile()
    trained_bn(model)
    model.eval()
    ctx = Context(calib_data=[(torch.randn(16, 3, 33, 31), None) for _ in range(2)])
    ctx.report.begin_step("quantize", {})
    q = Quantize(Quantize.Config(ops=["add"])).run(copy.deepcopy(model), ctx)
    return model, q


@pytest.mark.ort_isa
def test_all_integer_and_equal_to_the_simulation(quantized, tmp_path):
    fp, q = quantized
    torch.manual_seed(1)
    x = torch.randn(8, 3, 33, 31)
    path = tmp_path / "q.onnx"
    figs = export_onnx(q, path, x, samples=[torch.randn(5, 3, 33, 31)])
    assert figs["pads_folded"] == N_PADS
    ops = optimized_op_types(path.read_bytes())
    assert "Pad" not in ops and "Add" not in ops and "Conv" not in ops
    assert ops.count("QLinearAdd") == N_ADDS
    assert ops.count("QLinearConv") == sum(isinstance(m, nn.Conv2d) for m in q.modules())
    with torch.no_grad():
        ref = q(x)
    got = OrtModule(path)(x)
    step = float(ref.max() - ref.min()) / 255
    assert (got - ref).abs().max() <= 0.02 * step  # ORT's integer kernels reproduced: float32 round-off only
    assert (got.argmax(1) == ref.argmax(1)).all()
    with torch.no_grad():
        assert (fp(x).argmax(1) == ref.argmax(1)).float().mean() >= 0.75


@pytest.mark.ort_isa
def test_pad_fold_is_exact(quantized, monkeypatch):
    """The same export post-processed with and without moving the Pads into the convs: identical
    ORT outputs."""
    import io

    from nnsqueeze.export import qdq
    from nnsqueeze.quant.modules import export_mode

    _, q = quantized
    x = torch.randn(3, 3, 33, 31)
    buf = io.BytesIO()
    with export_mode(q), torch.no_grad():
        torch.onnx.export(q, (x,), buf, dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": {0: "b"}, "output": {0: "b"}})
    folded, kept = onnx.load_from_string(buf.getvalue()), onnx.load_from_string(buf.getvalue())
    assert qdq_postprocess(folded)["pads_folded"] == N_PADS
    monkeypatch.setattr(qdq, "_fold_pad_into_conv", lambda gr: 0)
    qdq_postprocess(kept)
    assert sum(n.op_type == "Pad" for n in kept.graph.node) == N_PADS
    assert not any(n.op_type == "Pad" for n in folded.graph.node)
    assert torch.equal(OrtModule(kept.SerializeToString())(x), OrtModule(folded.SerializeToString())(x))


def test_nonzero_pad_is_left_alone():
    from onnx import TensorProto, helper

    pads = helper.make_tensor("pads", TensorProto.INT64, [8], [0, 0, 1, 1, 0, 0, 1, 1])
    value = helper.make_tensor("value", TensorProto.FLOAT, [], [1.0])
    s = helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])
    z = helper.make_tensor("z", TensorProto.UINT8, [], [0])
    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 2, 1, 1], [1.0, 0.0, 0.0, 1.0])
    nodes = [helper.make_node("Pad", ["x", "pads", "value"], ["p"]),
             helper.make_node("QuantizeLinear", ["p", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
             helper.make_node("Conv", ["d", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [pads, value, s, z, w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert qdq_postprocess(model)["pads_folded"] == 0
    assert [n.op_type for n in model.graph.node].count("Pad") == 1


# ort_isa (also run under emulated AVX2 by .ci/avx2) on the cheapest method only: mse and kl calibration
# take minutes under qemu; the tie they need is the same, and all four run natively here
@pytest.mark.parametrize("method,ops", [("mse", ["add"]), ("mse", []),
                                        pytest.param("percentile", ["add"], marks=pytest.mark.ort_isa),
                                        ("kl", ["add"])])
def test_clipping_calibration_equal_to_the_simulation(method, ops, tmp_path):
    """A clipping method gives a ZeroPad2d'ed conv input another range than the output it pads (the
    pad's zeros enter its observer); ORT runs the producer's codes and scale there, so the step ties
    them, and ORT equals the simulation as with minmax (untied: 0.3-0.7 steps of the logit range)."""
    torch.manual_seed(0)
    model = trained_bn(TFMobile()).eval()
    ctx = Context(calib_data=[(torch.randn(16, 3, 33, 31), None) for _ in range(2)])
    ctx.report.begin_step("quantize", {})
    q = Quantize(Quantize.Config(ops=ops, calibration={"method": method})).run(copy.deepcopy(model), ctx)
    assert ctx.report.steps[-1]["figures"]["inputs_tied"] >= 1
    assert any("take the qparams" in n["note"] for n in ctx.report.notes)
    dw, expand = q.get_submodule("blocks.2.dw.1"), q.get_submodule("blocks.2.expand.0")
    assert torch.equal(dw.input_scale_, expand.output_scale_)  # the padded conv reads its producer's codes
    torch.manual_seed(1)
    x = torch.randn(8, 3, 33, 31)
    got, ref, step = ort_vs_sim(q, x, [torch.randn(5, 3, 33, 31)], tmp_path / "q.onnx")
    assert (got - ref).abs().max() <= 0.02 * step
