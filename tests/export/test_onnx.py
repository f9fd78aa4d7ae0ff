"""ONNX export: plain fp32, int8 QDQ that ONNX Runtime fuses into int8 kernels, verified parity."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from nnsqueeze.context import Context
from nnsqueeze.errors import ExportError
from nnsqueeze.export.onnx import export_onnx
from nnsqueeze.export.ort import OrtModule, u8s8_may_saturate
from nnsqueeze.registry import EXPORTERS
from nnsqueeze.steps.quantize import Quantize

FLOAT_OPS = {"Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul"}


def quantize(model, data, reduce_range=True):
    """7-bit weights by default: saturation-free in ORT on every x86 CPU, so parity is machine-independent."""
    ctx = Context(calib_data=data, progress=False)
    ctx.report.begin_step("quantize", {})
    cfg = Quantize.Config.model_validate({"weights": {"reduce_range": reduce_range}})
    return Quantize(cfg).run(model, ctx)


def ort_optimized_ops(path, tmp_path) -> list[str]:
    """Op types of the graph ORT really runs, saved through SessionOptions.optimized_model_filepath."""
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    os.remove(tmp_path / "optimized.onnx")
    return ops


def demo_cnn() -> nn.Module:
    """The demo's MNIST-1D CNN shape (242k parameters), input (B, 1, 40)."""
    return nn.Sequential(
        nn.Conv1d(1, 32, 5, padding=2), nn.BatchNorm1d(32), nn.ReLU(),
        nn.Conv1d(32, 64, 3, stride=2, padding=1), nn.BatchNorm1d(64), nn.ReLU(),
        nn.Conv1d(64, 128, 3, stride=2, padding=1), nn.BatchNorm1d(128), nn.ReLU(),
        nn.Flatten(), nn.Linear(1280, 128), nn.ReLU(), nn.Linear(128, 10)).eval()


def test_registered():
    assert EXPORTERS.get("onnx") is export_onnx


def test_fp32_export_plain_and_verified(tiny_cnn, toy_data, tmp_path):
    path = tmp_path / "m.onnx"
    x = toy_data["eval"][0][0]
    figs = export_onnx(tiny_cnn, path, x, samples=[toy_data["eval"][1][0][:5]])
    json.dumps(figs)
    assert not figs["quantized"] and figs["verified_samples"] == 37
    assert figs["max_abs_diff"] <= figs["tolerance"] <= 1e-4 * max(1.0, float(tiny_cnn(x).detach().abs().max()))
    assert figs["top1_agreement"] == 1.0
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert not ops & {"QuantizeLinear", "DequantizeLinear"}
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]  # no temp files left


@pytest.mark.ort_isa
def test_int8_export_runs_int8_kernels_with_parity(tiny_cnn, toy_data, tmp_path):
    model = quantize(tiny_cnn, toy_data["calib"])
    path = tmp_path / "q.onnx"
    samples = [b[0] for b in toy_data["eval"]]
    figs = export_onnx(model, path, samples[0], samples=samples[1:])
    assert figs["quantized"] and figs["int8_weights"] == 4 and figs["int32_biases"] == 4
    assert figs["max_abs_diff"] <= figs["tolerance"]
    assert figs["top1_agreement"] >= 0.99
    assert figs["ort_int8_ops"] == {"QGemm": 2, "QLinearConv": 2} and figs["ort_float_ops"] == {}

    ops = ort_optimized_ops(path, tmp_path)
    assert ops.count("QLinearConv") == 2 and ops.count("QGemm") == 2
    assert not FLOAT_OPS & set(ops), ops

    # Independent check: ORT on fresh data against the torch simulation, a few output steps at most.
    x = torch.randn(19, 1, 37) + toy_data["eval"][0][0][:19]
    with torch.no_grad():
        ref = model(x)
    got = OrtModule(path)(x)
    assert (got - ref).abs().max() <= 4 * (ref.max() - ref.min()) / 255

    # Weights are stored as int8 initializers (7-bit codes), biases as int32.
    g = onnx.load(str(path)).graph
    dtypes = [numpy_helper.to_array(i).dtype for i in g.initializer]
    assert dtypes.count(np.int8) == 4 and np.float32 in dtypes
    assert max(np.abs(numpy_helper.to_array(i)).max() for i in g.initializer
               if numpy_helper.to_array(i).dtype == np.int8) == 63
    assert sum(numpy_helper.to_array(i).dtype == np.int32 and numpy_helper.to_array(i).ndim == 1
               and numpy_helper.to_array(i).any() for i in g.initializer) == 4


@pytest.mark.ort_isa
@pytest.mark.skipif(u8s8_may_saturate(), reason="8-bit weights saturate ORT's u8s8 kernels on x86 without VNNI")
def test_int8_export_full_8bit_weights(tiny_cnn, toy_data, tmp_path):
    model = quantize(tiny_cnn, toy_data["calib"], reduce_range=False)
    figs = export_onnx(model, tmp_path / "q.onnx", toy_data["eval"][0][0], samples=[toy_data["eval"][1][0]])
    assert figs["max_abs_diff"] <= figs["tolerance"] and figs["ort_int8_ops"]["QLinearConv"] == 2


@pytest.mark.ort_isa
def test_demo_cnn_size_ratio_and_fusion(tmp_path):
    torch.manual_seed(0)
    fp = demo_cnn()
    fp_path, q_path = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    x = torch.randn(64, 1, 40)
    export_onnx(fp, fp_path, x, verify=False)
    model = quantize(fp, [(torch.randn(64, 1, 40), None) for _ in range(2)])
    figs = export_onnx(model, q_path, x)
    ratio = os.path.getsize(q_path) / os.path.getsize(fp_path)
    assert ratio <= 0.30, ratio
    assert figs["ort_int8_ops"] == {"QGemm": 2, "QLinearConv": 3} and figs["ort_float_ops"] == {}
    # One Q per activation: input, 3 conv outputs, after Flatten, after the hidden ReLU; no DQ -> Q pairs.
    nodes = onnx.load(str(q_path)).graph.node
    producer = {o: n.op_type for n in nodes for o in n.output}
    quants = [n for n in nodes if n.op_type == "QuantizeLinear"]
    assert len(quants) == 6 and all(producer.get(q.input[0]) != "DequantizeLinear" for q in quants)


def test_conv2d_and_3d_linear(tmp_path):
    torch.manual_seed(1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
            self.proj = nn.Linear(7, 9)           # applied to a 3-d tensor: MatMul + Add in ONNX

        def forward(self, x):
            y = torch.relu(self.conv(x))          # (B, 5, 5, 7)
            return self.proj(y.flatten(1, 2))     # (B, 25, 9)

    model = quantize(Net().eval(), [(torch.randn(8, 3, 9, 13), None)])
    figs = export_onnx(model, tmp_path / "m.onnx", torch.randn(3, 3, 9, 13), samples=[torch.randn(5, 3, 9, 13)])
    assert figs["max_abs_diff"] <= figs["tolerance"]
    assert figs["ort_int8_ops"].get("QLinearConv") == 1
    assert set(figs["ort_int8_ops"]) & {"MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger"}


def test_masked_weights_are_zero_in_the_file(tmp_path):
    torch.manual_seed(2)
    m = nn.Sequential(nn.Linear(11, 6)).eval()
    mask = torch.rand(6, 11) > 0.5
    with torch.no_grad():
        m[0].weight.mul_(mask)
    m[0].register_buffer("weight_mask", mask)
    model = quantize(m, [(torch.randn(16, 11), None)])
    export_onnx(model, tmp_path / "m.onnx", torch.randn(4, 11))
    w = [numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "m.onnx")).graph.initializer
         if numpy_helper.to_array(i).dtype == np.int8][0]
    assert np.all(w[~mask.numpy()] == 0) and np.any(w[mask.numpy()] != 0)


class SharedRelu(nn.Module):
    """A ReLU module used twice: absorbed into the convs but kept, so it reads a DequantizeLinear."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.act = nn.Conv1d(2, 5, 3), nn.Conv1d(5, 7, 3, padding=1), nn.ReLU()
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        return self.head(self.act(self.c2(self.act(self.c1(x)))).mean(-1))


def test_relu_left_after_an_absorbing_conv_is_dropped(tmp_path):
    torch.manual_seed(3)
    model = quantize(SharedRelu().eval(), [(torch.randn(16, 2, 15), None)])
    figs = export_onnx(model, tmp_path / "m.onnx", torch.randn(4, 2, 15), samples=[torch.randn(9, 2, 15)])
    assert figs["relu_removed"] == 2 and figs["max_abs_diff"] <= figs["tolerance"]
    assert figs["ort_int8_ops"]["QLinearConv"] == 2


class Frozen(nn.Module):
    """The tracer freezes ``.item()`` into a constant: right on the example, wrong on other inputs."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x) + float(x.abs().sum())


def test_parity_failure_raises_and_writes_nothing(tmp_path):
    path = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match="differs from the torch model"):
        export_onnx(Frozen().eval(), path, torch.randn(2, 4), samples=[torch.randn(3, 4) * 10])
    assert os.listdir(tmp_path) == []


def test_existing_file_is_replaced(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    m = nn.Sequential(nn.Linear(3, 2)).eval()
    figs = export_onnx(m, path, torch.randn(2, 3))
    assert path.stat().st_size == figs["size_bytes"] and sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_export_leaves_model_mode_alone(tiny_cnn, toy_data, tmp_path):
    model = quantize(tiny_cnn, toy_data["calib"]).train()
    export_onnx(model, tmp_path / "m.onnx", toy_data["eval"][0][0][:4])
    assert model.training and all(getattr(m, "_export_cache", None) is None for m in model.modules())


def test_export_to_a_directory_or_under_a_file_fails_before_work(tmp_path):
    from nnsqueeze import export_onnx as api_export
    from nnsqueeze.pipeline import CompressionResult
    from nnsqueeze.recipe import load_recipe
    from nnsqueeze.report import Report

    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_text("x")
    model = nn.Linear(4, 2)
    res = CompressionResult(model=model, report=Report(), recipe=load_recipe("int8"), onnx=b"onnx bytes")
    for target, words in ((tmp_path / "d", "is a directory"), (tmp_path / "f" / "m.onnx", "is a file")):
        with pytest.raises(ExportError, match=words):
            export_onnx(model, target, torch.randn(2, 4))
        with pytest.raises(ExportError, match=words):
            api_export(res, target)  # the stored-bytes shortcut is checked the same way
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["d", "f"]  # no .tmp left
    api_export(res, tmp_path / "new" / "m.onnx")  # a missing parent folder is created
    assert (tmp_path / "new" / "m.onnx").read_bytes() == b"onnx bytes"
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["m.onnx"]
