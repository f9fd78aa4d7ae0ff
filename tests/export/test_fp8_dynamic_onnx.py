"""Dynamic FP8 activations in ONNX (nnsqueeze.export.fp8): the graph computes each scale at run time,
Max(ReduceMax(Abs(x)) / max_finite, tiny), and runs float8 QuantizeLinear/DequantizeLinear (blocked along
the last axis per token, opset 21); ONNX Runtime (CPU) against the torch simulation on odd shapes, on
inputs whose ranges differ from the export example (a static scale would clip them)."""

from __future__ import annotations

import onnx
import pytest
import torch
from onnx import TensorProto
from torch import nn

from nnsqueeze.context import Context
from nnsqueeze.export.onnx import export_onnx
from nnsqueeze.export.ort import OrtModule
from nnsqueeze.steps.quantize import Quantize

# ORT's float8 Q/DQ kernels: also checked on an emulated AVX2-only CPU (.ci/avx2)
pytestmark = pytest.mark.ort_isa

ELEM = {"fp8-e4m3": TensorProto.FLOAT8E4M3FN, "fp8-e5m2": TensorProto.FLOAT8E5M2}
# as tests/export/test_fp8_onnx.py: float32 summation order only, far below one FP8 step
REL_TOL = 1e-4


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(13, 9), nn.ReLU(), nn.Linear(9, 5)).eval()


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 5 * 3, 7)).eval()


def _quantized(model, fmt, gran, x):
    cfg = {"weights": {"format": fmt}, "activations": {"format": fmt, "dynamic": True, "granularity": gran}}
    ctx = Context(calib_data=[(x, None)])
    ctx.report.begin_step("quantize", cfg)
    return Quantize(Quantize.Config.model_validate(cfg)).run(model, ctx)


def _inputs(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    x[0] = 0.0                                                   # an all-zero sample / tokens: scale floored
    return [x * 50.0, x * 1e-3, x * torch.logspace(-2, 2, shape[-1])]   # ranges the example never had


@pytest.mark.parametrize("fmt", ["fp8-e4m3", "fp8-e5m2"])
@pytest.mark.parametrize("gran", ["per-tensor", "per-token"])
def test_dynamic_fp8_linear_in_ort_matches_the_simulation(tmp_path, fmt, gran):
    shape = (3, 7, 13)   # (batch, tokens, features): odd everywhere
    model = _quantized(_mlp(), fmt, gran, torch.randn(*shape))
    path = tmp_path / "m.onnx"
    figs = export_onnx(model, path, torch.randn(*shape))
    token = gran == "per-token"
    assert figs["opset"] == (21 if token else 19)
    assert figs["fp8_tensors"] == {"weights": 2, "activations": 0, "dynamic_activations": 2}
    proto = onnx.load(str(path))
    assert all(o.domain != "nnsqueeze" for o in proto.opset_import)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("ReduceMax") == 2 and ops.count("QuantizeLinear") == 2 and ops.count("DequantizeLinear") == 4
    assert not any(t.name.endswith("input_scale_") for t in proto.graph.initializer)   # nothing calibrated
    for n in proto.graph.node:
        if n.op_type == "QuantizeLinear":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            if token:
                assert attrs["axis"] == -1 and attrs["block_size"] in (13, 9) and attrs["output_dtype"] == ELEM[fmt]
            else:
                assert "block_size" not in attrs
    ort = OrtModule(path.read_bytes())
    for x in _inputs(shape, seed=2):
        with torch.no_grad():
            want = model(x)
        got = ort(x)
        assert torch.isfinite(got).all()
        assert float((got - want).abs().max()) <= REL_TOL * float(want.abs().max()) + 1e-30


@pytest.mark.parametrize("fmt", ["fp8-e4m3", "fp8-e5m2"])
def test_dynamic_fp8_conv_per_tensor_in_ort(tmp_path, fmt):
    shape = (4, 3, 7, 5)
    model = _quantized(_cnn(), fmt, "per-tensor", torch.randn(*shape))
    path = tmp_path / "m.onnx"
    figs = export_onnx(model, path, torch.randn(*shape))
    assert figs["opset"] == 19 and figs["fp8_tensors"]["dynamic_activations"] == 2
    ort = OrtModule(path.read_bytes())
    for x in _inputs(shape, seed=4):
        with torch.no_grad():
            want = model(x)
        assert float((ort(x) - want).abs().max()) <= REL_TOL * float(want.abs().max()) + 1e-30


def test_dynamic_output_differs_from_static_where_ranges_move(tmp_path):
    """The dynamic graph is not a static one in disguise: an input 50x the calibration range saturates
    a static scale and not the dynamic one, in ORT too."""
    x_cal = torch.randn(3, 7, 13, generator=torch.Generator().manual_seed(0))
    dyn = _quantized(_mlp(), "fp8-e4m3", "per-tensor", x_cal)
    cfg = {"weights": {"format": "fp8-e4m3"}, "activations": {"format": "fp8-e4m3"}}
    ctx = Context(calib_data=[(x_cal, None)])
    ctx.report.begin_step("quantize", cfg)
    static = Quantize(Quantize.Config.model_validate(cfg)).run(_mlp(), ctx)
    ref = _mlp()
    x = x_cal * 50
    export_onnx(dyn, tmp_path / "d.onnx", x_cal)
    with torch.no_grad():
        err_dyn = float((OrtModule((tmp_path / "d.onnx").read_bytes())(x) - ref(x)).abs().max())
        err_static = float((static(x) - ref(x)).abs().max())
    assert err_dyn < 0.1 * err_static
