"""Low-bit static weights stored at their width in the exported ONNX (export/lowbit.py).

Every case: ORT output == torch simulation (max abs diff <= 2e-6 x max|output|, measured <= 2e-7: float32 summation
order only; single layers without an output quantizer, so no activation code can flip), the
weight's initializer has the expected ONNX dtype and element count, and its codes equal the
artifact's packed codes (``pack_state``) bit for bit.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto
from torch import nn

import nnsqueeze.export.lowbit as lowbit
from nnsqueeze.export.onnx import export_onnx
from nnsqueeze.export.ort import OrtModule
from nnsqueeze.ops.int4 import unpack_int4
from nnsqueeze.quant.modules import convert_
from nnsqueeze.quant.observers import MinMaxObserver
from nnsqueeze.quant.scheme import WeightScheme as W

RTOL = 2e-6
CODE_TYPES = {TensorProto.INT4: "int4", TensorProto.UINT4: "uint4", TensorProto.INT8: "int8",
              TensorProto.UINT8: "uint8"}


def make(kind: str, sch: W, seed: int = 0):
    """One calibrated fake-quant layer (odd shapes), its input, as a Sequential."""
    torch.manual_seed(seed)
    layer, x = {
        "linear": lambda: (nn.Linear(21, 5), torch.randn(16, 21)),                       # 21 inputs per row
        "linear3d": lambda: (nn.Linear(21, 5), torch.randn(4, 3, 21)),                   # MatMul + Transpose
        "conv1d": lambda: (nn.Conv1d(3, 5, 7), torch.randn(16, 3, 12)),                  # C_in*k = 21
        "grouped2d": lambda: (nn.Conv2d(6, 9, 3, groups=3, padding=1), torch.randn(8, 6, 5, 5)),  # 2*9 = 18
        "depthwise2d": lambda: (nn.Conv2d(5, 5, 3, groups=5), torch.randn(8, 5, 6, 7)),  # 9
    }[kind]()
    convert_(layer, quant_output=False, scheme=sch)
    layer.start_calibration(MinMaxObserver, kind)
    with torch.no_grad():
        layer(x)
    layer.finish_calibration()
    return nn.Sequential(layer).eval(), x


def code_initializers(proto, numel: int) -> list:
    return [t for t in proto.graph.initializer if t.data_type in CODE_TYPES and int(np.prod(t.dims)) == numel]


def decode(t) -> np.ndarray:
    """Integer codes of an int4/uint4/int8/uint8 initializer from its raw bytes (own decoding)."""
    raw = np.frombuffer(t.raw_data, dtype=np.uint8)
    n = int(np.prod(t.dims))
    if t.data_type in (TensorProto.INT4, TensorProto.UINT4):
        nib = np.stack([raw & 0x0F, raw >> 4], axis=1).reshape(-1)[:n].astype(np.int64)
        return np.where(nib >= 8, nib - 16, nib) if t.data_type == TensorProto.INT4 else nib
    return raw.view(np.int8).astype(np.int64) if t.data_type == TensorProto.INT8 else raw.astype(np.int64)


def expected_type(sch: W) -> str:
    signed = sch.levels == "uniform" and sch.symmetric
    return ("int4" if signed else "uint4") if sch.bits <= 4 else ("int8" if signed else "uint8")


CASES = [
    ("linear", W(bits=4)),
    ("linear", W(bits=3, symmetric=False)),
    ("linear", W(bits=2, granularity="per-group", group_size=7)),
    ("linear", W(bits=4, levels="nf4")),
    ("linear3d", W(bits=4)),
    ("linear3d", W(bits=3, granularity="per-group", group_size=7, symmetric=False)),
    ("conv1d", W(bits=2)),
    ("conv1d", W(bits=4, symmetric=False)),
    ("conv1d", W(bits=4, granularity="per-group", group_size=7)),
    ("conv1d", W(bits=3, granularity="per-group", group_size=7, symmetric=False)),
    ("conv1d", W(bits=3, levels="pow2")),
    ("conv1d", W(bits=4, levels="kmeans")),
    ("conv1d", W(bits=2, granularity="per-tensor", symmetric=False)),
    ("conv1d", W(bits=6, symmetric=False)),
    ("conv1d", W(bits=8, granularity="per-group", group_size=3)),
    ("grouped2d", W(bits=4, granularity="per-group", group_size=6, symmetric=False)),
    ("grouped2d", W(bits=3)),
    ("depthwise2d", W(bits=2, symmetric=False)),
    ("depthwise2d", W(bits=4, levels="nf4")),
    ("depthwise2d", W(bits=5, levels="kmeans")),
]


@pytest.mark.parametrize("kind,sch", CASES, ids=[f"{k}-{s.describe().replace(' ', '_')}" for k, s in CASES])
def test_lowbit_weights_in_onnx(kind, sch, tmp_path):
    model, x = make(kind, sch)
    layer = model[0]
    path = tmp_path / "m.onnx"
    figs = export_onnx(model, path, x[:5], samples=[x[5:]])
    assert figs["lowbit_weights"] == {expected_type(sch): 1}
    proto = onnx.load(str(path))
    assert not any(n.domain == lowbit.DOMAIN for n in proto.graph.node)
    # ORT == torch simulation
    with torch.no_grad():
        ref = model(x)
    got = OrtModule(str(path))(x)
    assert float((got - ref).abs().max()) <= RTOL * max(1.0, float(ref.abs().max()))
    # stored as codes of the scheme's width, one code per weight
    inits = code_initializers(proto, layer.weight.numel())
    assert len(inits) == 1 and CODE_TYPES[inits[0].data_type] == expected_type(sch)
    assert not any(t.data_type == TensorProto.FLOAT and int(np.prod(t.dims)) == layer.weight.numel()
                   for t in proto.graph.initializer)
    codes = decode(inits[0])
    if kind == "linear3d" and sch.granularity != "per-group":   # stored transposed for MatMul(x, W^T)
        codes = codes.reshape(layer.weight.shape[::-1]).T.reshape(-1)
    # bit-exact against the artifact's packed codes
    sd = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.pack_state(sd, "")
    packed = sd["weight"]
    if sch.bits <= 4:
        qmin = layer.weight_qrange[0] if sch.levels == "uniform" else 0
        art = unpack_int4(packed, layer.weight.numel()).numpy().astype(np.int64) + qmin
        if expected_type(sch) == "uint4" and kind != "linear3d":   # same nibbles, byte for byte
            assert inits[0].raw_data == packed.numpy().tobytes()
    else:
        art = packed.numpy().reshape(-1).astype(np.int64)
    np.testing.assert_array_equal(codes, art)


@pytest.mark.parametrize("sch", [W(bits=4), W(bits=4, symmetric=False),
                                 W(bits=4, granularity="per-group", group_size=16), W(bits=4, levels="nf4"),
                                 W(bits=2, symmetric=False), W(bits=3, levels="pow2")])
def test_file_size_follows_code_width(sch, tmp_path):
    torch.manual_seed(0)
    fp32 = nn.Sequential(nn.Linear(256, 96), nn.ReLU(), nn.Linear(96, 10)).eval()
    x = torch.randn(32, 256)
    export_onnx(fp32, tmp_path / "fp32.onnx", x, verify=False)
    fp32_bytes = (tmp_path / "fp32.onnx").stat().st_size
    for i in (0, 2):
        convert_(fp32[i], scheme=sch)
        fp32[i].start_calibration(MinMaxObserver, str(i))
    with torch.no_grad():
        fp32(x)
    for i in (0, 2):
        fp32[i].finish_calibration()
    figs = export_onnx(fp32, tmp_path / "q.onnx", x[:8], samples=[x[8:]])
    size = (tmp_path / "q.onnx").stat().st_size
    assert size == figs["size_bytes"]
    # bound from the code widths: 4-bit codes; per row a float32 scale, a zero point and the bias
    # (float32, or int32 codes + scale + zero point: 12 bytes); level tables; 4 KB of graph and names
    n = 256 * 96 + 96 * 10
    rows = sum(m.weight_scale_.numel() for m in (fp32[0], fp32[2]))
    bound = n / 2 + rows * (4 + 1 + 12) + 2 * 64 + 4096
    assert size <= bound, (size, bound)
    assert size < 0.3 * fp32_bytes


@pytest.mark.parametrize("sch", [W(bits=4), W(bits=4, symmetric=False)])
def test_opset21_upgrade_keeps_int8_kernels(sch, tmp_path):
    """Per-channel 4-bit weights: int4 in the file, cast to 8 bits at load, ORT's int8 kernels run."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 8, 5), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8, 4)).eval()
    x = torch.randn(16, 3, 12)
    for i, q in ((0, True), (3, False)):
        convert_(model[i], act="relu" if i == 0 else None, quant_output=q, scheme=sch)
        model[i].start_calibration(MinMaxObserver, str(i))
    model[1] = nn.Identity()
    with torch.no_grad():
        model(x)
    for i in (0, 3):
        model[i].finish_calibration()
    figs = export_onnx(model, tmp_path / "m.onnx", x[:4], samples=[x[4:]])
    assert figs["lowbit_opset_upgrade"].startswith("17 -> 21")
    assert figs["lowbit_weights"] == {expected_type(sch): 2}
    assert figs["ort_int8_ops"].get("QLinearConv") == 1
    if sch.symmetric:   # int32 biases as in the int8 path; ORT's QGemm fuses too
        assert figs["ort_int8_ops"].get("QGemm") == 1 and figs["int32_biases_lowbit"] == 2
        assert figs["max_abs_diff"] <= 1e-4   # same kernels as the int8 path: float rounding only
    assert figs["max_abs_diff"] <= figs["tolerance"]
    assert onnx.load(str(tmp_path / "m.onnx")).opset_import[0].version == 21


def test_without_opset_upgrade(monkeypatch, tmp_path):
    """When a model cannot be upgraded: int8 codes for int8-kernel schemes, com.microsoft int4 otherwise."""
    monkeypatch.setattr(lowbit, "_upgrade_to_21", lambda model: "no adapter (test)")
    for sch, stored in ((W(bits=3), "int8"), (W(bits=4, symmetric=False), "uint4")):
        model, x = make("conv1d", sch)
        figs = export_onnx(model, tmp_path / "m.onnx", x[:5], samples=[x[5:]])
        assert "not possible" in figs["lowbit_opset_upgrade"] and figs["lowbit_weights"] == {stored: 1}
        proto = onnx.load(str(tmp_path / "m.onnx"))
        assert proto.opset_import[0].version == 17
        assert (stored == "uint4") == any(n.domain == "com.microsoft" for n in proto.graph.node)
        with torch.no_grad():
            ref = model(x)
        got = OrtModule(str(tmp_path / "m.onnx"))(x)
        assert float((got - ref).abs().max()) <= RTOL * max(1.0, float(ref.abs().max()))


def test_compress_report_counts_the_small_file(tmp_path):
    import nnsqueeze as nsq
    from tiny_cnn import TinyCNN, make_data

    torch.manual_seed(0)
    recipe = {"version": 1, "steps": [{"quantize": {"weights": {"bits": 4, "levels": "nf4"}}}],
              "evaluate": {"warmup": 0, "runs": 1, "threads": 1, "per_step": False}}
    res = nsq.compress(TinyCNN().eval(), recipe, calib_data=make_data(2, seed=2), eval_data=make_data(1, seed=3),
                       progress=False)
    exp = res.report["export"]["compressed"]
    assert exp["lowbit_weights"] == {"uint4": 4} and exp["size_bytes"] == len(res.onnx)
    assert exp["max_abs_diff"] <= exp["tolerance"]
