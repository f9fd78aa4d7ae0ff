"""FP8 in ONNX (nnsqueeze.export.fp8): float8 QuantizeLinear/DequantizeLinear at opset 19, weights stored
as float8 codes bit for bit, ONNX Runtime (CPU) against the torch simulation, and the refusal of the
block formats that ORT's CPU provider cannot run."""

from __future__ import annotations

import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper
from torch import nn

import nnsqueeze as nsq
from nnsqueeze.context import Context
from nnsqueeze.errors import ExportError
from nnsqueeze.export.onnx import export_onnx
from nnsqueeze.export.ort import OrtModule
from nnsqueeze.ops.fp8 import fp8_quantize
from nnsqueeze.recipe import Recipe
from nnsqueeze.steps.quantize import Quantize

from tiny_cnn import TinyCNN, make_data

# ORT's float8 Q/DQ kernels: also checked on an emulated AVX2-only CPU (.ci/avx2)
pytestmark = pytest.mark.ort_isa

ELEM = {"fp8-e4m3": TensorProto.FLOAT8E4M3FN, "fp8-e5m2": TensorProto.FLOAT8E5M2}
# ORT computes Conv/Gemm in float32 on exactly the simulated dequantized values; what differs is the
# order of the float32 sums (and, through it, an activation code now and then in a later layer):
# allow 1e-4 of the output range, far below one FP8 step (1/16 of a value for E4M3).
REL_TOL = 1e-4


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 5 * 3, 7), nn.ReLU(),
                         nn.Linear(7, 3)).eval()


def _data(n: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 7, 5, generator=g), None) for _ in range(n)]


def _quantized(weights, activations=None):
    cfg = {"weights": weights} | ({"activations": activations} if activations else {})
    ctx = Context(calib_data=_data())
    ctx.report.begin_step("quantize", cfg)
    return Quantize(Quantize.Config.model_validate(cfg)).run(_net(), ctx)


@pytest.mark.parametrize("fmt", ["fp8-e4m3", "fp8-e5m2"])
@pytest.mark.parametrize("gran", ["per-tensor", "per-channel"])
@pytest.mark.parametrize("acts", [True, False])
def test_fp8_qdq_in_ort_matches_the_simulation(tmp_path, fmt, gran, acts):
    model = _quantized({"format": fmt, "granularity": gran}, {"format": fmt} if acts else None)
    path = tmp_path / "m.onnx"
    figs = export_onnx(model, path, _data()[0][0], samples=[b[0] for b in _data(2, seed=7)])
    assert figs["opset"] == 19 and figs["fp8_tensors"] == {"weights": 3, "activations": 3 if acts else 0}
    assert "warning" not in figs and figs.get("fp8_relu_as_max", 0) == (1 if acts else 0)  # Relu -> Linear 5
    proto = onnx.load(str(path))
    assert all(o.domain != "nnsqueeze" for o in proto.opset_import)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("DequantizeLinear") == (6 if acts else 3) and ops.count("QuantizeLinear") == (3 if acts else 0)
    inits = {t.name: t for t in proto.graph.initializer}
    fp8 = [t for t in proto.graph.initializer if t.data_type == ELEM[fmt]]
    assert not any(t.data_type == TensorProto.FLOAT and t.name.endswith("weight") for t in fp8)
    # each weight's codes in the file are the simulation's codes, bit for bit
    dq_weights = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                  and inits[n.input[0]].data_type == ELEM[fmt]]
    assert len(dq_weights) == 3
    for n, i in zip(dq_weights, (0, 3, 5)):
        layer = model[i]
        axis = 0 if gran == "per-channel" else None
        want = fp8_quantize(layer.weight.detach(), layer.weight_scale_, fmt, axis)
        got = torch.frombuffer(bytearray(inits[n.input[0]].raw_data), dtype=torch.uint8).reshape(want.shape)
        assert torch.equal(got, want)
        assert torch.equal(torch.from_numpy(numpy_helper.to_array(inits[n.input[1]]).copy()),
                           layer.weight_scale_.detach())
        assert [a.i for a in n.attribute if a.name == "axis"] == ([0] if axis == 0 else [])
    # ORT on fresh inputs of odd shape, against the torch simulation
    ort = OrtModule(str(path))
    for x, _ in _data(3, seed=11):
        with torch.no_grad():
            ref = model(x).double()
        got = ort(x).double()
        assert float((got - ref).abs().max()) <= REL_TOL * float(ref.max() - ref.min())


def test_fp8_through_the_pipeline(tmp_path):
    train = make_data(2, 16)
    recipe = Recipe.from_dict({"steps": [{"quantize": {"weights": {"format": "fp8-e4m3"},
                                                       "activations": {"format": "fp8-e4m3"}}}],
                               "export": {"onnx": {"opset": 17}}})
    result = nsq.compress(TinyCNN(), recipe, calib_data=train, eval_data=train, metric="accuracy")
    exp = result.report["export"]["compressed"]
    assert exp["opset"] == 19 and exp["fp8_tensors"] == {"weights": 4, "activations": 4}
    assert exp["max_abs_diff"] <= exp["tolerance"]
    nsq.export_onnx(result, tmp_path / "m.onnx")
    ort = OrtModule(str(tmp_path / "m.onnx"))
    x = train[1][0]
    with torch.no_grad():
        ref = result.model(x).double()
    assert float((ort(x).double() - ref).abs().max()) <= REL_TOL * float(ref.max() - ref.min())


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8-e4m3", "nvfp4"])
def test_block_formats_raise_export_error_naming_the_runtime_limit(tmp_path, fmt):
    model = _quantized({"format": fmt})
    with pytest.raises(ExportError) as e:
        export_onnx(model, tmp_path / "m.onnx", _data()[0][0])
    assert f"ONNX Runtime's CPU provider has no kernel for {fmt}" in e.value.problem
    assert "export: {onnx: null}" in e.value.fix and "fp8-e4m3" in e.value.fix
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_compress_refuses_block_format_with_onnx_export_before_running(tmp_path, fmt):
    from nnsqueeze.errors import RecipeError

    calls = []

    class Spy(nn.Module):  # counts forwards: none may run before the refusal
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 8)

        def forward(self, x):
            calls.append(1)
            return self.fc(x)

    with pytest.raises(RecipeError) as e:
        nsq.compress(Spy(), [{"quantize": {"weights": {"format": fmt}}}], calib_data=[torch.randn(4, 64)],
                     progress=False)
    assert "steps[0].quantize" in e.value.where and "block format" in e.value.problem
    assert "export: {onnx: null}" in e.value.fix and not calls and not list(tmp_path.iterdir())
    res = nsq.compress(Spy(), {"steps": [{"quantize": {"weights": {"format": fmt}}}], "export": {"onnx": None}},
                       calib_data=[torch.randn(4, 64)], progress=False)
    assert res.model is not None  # without ONNX export the simulation runs
