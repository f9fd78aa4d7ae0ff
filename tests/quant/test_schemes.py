"""Weight schemes of the fake-quant layers (bits 2..8, sym/asym, per-tensor/channel/group, non-uniform
levels) against float64 references computed independently in numpy; packing and ORT export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from nnsqueeze.export.onnx import export_onnx
from nnsqueeze.ops.quant import NF4_LEVELS
from nnsqueeze.quant.modules import convert_
from nnsqueeze.quant.observers import MinMaxObserver
from nnsqueeze.quant.scheme import WeightScheme


def ref_uniform(w: np.ndarray, rows: int, bits: int, sym: bool, per_tensor: bool) -> np.ndarray:
    """Float64 reference: rows of w, range widened to 0, scale/zero point, round half even, clamp."""
    r = w.reshape(rows, -1).astype(np.float64)
    lo, hi = np.minimum(r.min(1), 0), np.maximum(r.max(1), 0)
    if per_tensor:
        lo, hi = np.full(rows, lo.min()), np.full(rows, hi.max())
    if sym:
        qmax = 2 ** (bits - 1) - 1
        s = np.maximum(np.maximum(-lo, hi) / qmax, np.finfo(np.float32).eps).astype(np.float32).astype(np.float64)
        q = np.clip(np.rint(r / s[:, None]), -qmax - 1, qmax)
        out = q * s[:, None]
    else:
        qmax = 2 ** bits - 1
        s = np.maximum((hi - lo) / qmax, np.finfo(np.float32).eps).astype(np.float32).astype(np.float64)
        z = np.clip(np.rint(-lo / s), 0, qmax)
        q = np.clip(np.rint(r / s[:, None]) + z[:, None], 0, qmax)
        out = (q - z[:, None]) * s[:, None]
    return out.reshape(w.shape)


def make_layer(kind: str) -> nn.Module:
    torch.manual_seed(3)
    return nn.Conv1d(6, 5, 3, padding=1) if kind == "conv" else nn.Linear(12, 7)


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("gran", ["per-channel", "per-tensor", "per-group"])
def test_uniform_weights_match_reference(kind, bits, sym, gran):
    layer = make_layer(kind)
    w = layer.weight.detach().numpy().copy()
    gs = 6 if gran == "per-group" else None   # 18 = 3 groups (conv), 12 = 2 groups (linear)
    sch = WeightScheme(bits=bits, symmetric=sym, granularity=gran, group_size=gs)
    convert_(layer, scheme=sch)
    rows = w.shape[0] * (w[0].size // gs if gs else 1)
    ref = ref_uniform(w, rows, bits, sym, gran == "per-tensor")
    got = layer.fake_quant_weight().detach().double().numpy()
    # fp32 dequantization vs float64: a relative 1e-6 of the value
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
    codes = layer.weight_codes()
    assert codes.shape == layer.weight.shape and len(np.unique(codes.numpy())) <= 2 ** bits


@pytest.mark.parametrize("levels,bits", [("pow2", 3), ("pow2", 4), ("nf4", 4), ("kmeans", 3)])
def test_nonuniform_levels_are_the_nearest_level(levels, bits):
    layer = make_layer("conv")
    w = layer.weight.detach().double().numpy().reshape(5, -1)
    convert_(layer, scheme=WeightScheme(bits=bits, levels=levels))
    table = layer.weight_levels_.double().numpy()
    if levels == "pow2":  # closed form: 0 and +-2^-k, k = 0 .. 2^(b-1)-2
        mags = [2.0 ** -k for k in range(2 ** (bits - 1) - 1)]
        np.testing.assert_array_equal(table, sorted([-m for m in mags] + [0.0] + mags))
    elif levels == "nf4":
        np.testing.assert_allclose(table, NF4_LEVELS, rtol=0, atol=1e-7)
    else:
        assert len(table) == 2 ** bits and np.all(np.diff(table) >= 0)
    absmax = np.abs(w).max(1, keepdims=True)
    v = w / absmax
    ref = table[np.abs(v[..., None] - table).argmin(-1)] * absmax  # brute-force nearest level
    got = layer.fake_quant_weight().detach().double().numpy().reshape(5, -1)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)


def test_kmeans_levels_beat_uniform_on_gaussian_weights():
    torch.manual_seed(0)
    a, b = nn.Linear(256, 16), nn.Linear(256, 16)
    with torch.no_grad():
        a.weight.normal_()
        b.weight.copy_(a.weight)
    convert_(a, scheme=WeightScheme(bits=3, levels="kmeans"))
    convert_(b, scheme=WeightScheme(bits=3))
    assert a.weight_sqnr_db() > b.weight_sqnr_db() + 1.0


def test_mse_clip_is_never_worse_than_minmax():
    torch.manual_seed(0)
    for bits in (2, 3, 4):
        a, b = nn.Linear(64, 9), nn.Linear(64, 9)
        with torch.no_grad():
            a.weight.copy_(torch.randn(9, 64) ** 3)  # heavy tails: clipping pays
            b.weight.copy_(a.weight)
        convert_(a, scheme=WeightScheme(bits=bits, clip="mse"))
        convert_(b, scheme=WeightScheme(bits=bits))
        ea = ((a.fake_quant_weight() - a.weight) ** 2).sum(1).detach()
        eb = ((b.fake_quant_weight() - b.weight) ** 2).sum(1).detach()
        assert bool((ea <= eb + 1e-7).all()) and float(ea.sum()) < float(eb.sum())


@pytest.mark.parametrize("sch", [WeightScheme(bits=4), WeightScheme(bits=3, symmetric=False),
                                 WeightScheme(bits=4, granularity="per-group", group_size=9),
                                 WeightScheme(bits=4, levels="nf4"), WeightScheme(bits=2, granularity="per-tensor")])
def test_pack_unpack_bit_exact(sch):
    layer = convert_(make_layer("conv"), scheme=sch)
    sd = layer.state_dict()
    layer.pack_state(sd, "")
    assert sd["weight"].dtype in (torch.int8, torch.uint8)
    n = layer.weight.numel()
    assert sd["weight"].numel() == ((n + 1) // 2 if sch.bits <= 4 else n)  # 2..4 bits: two codes per byte
    layer.unpack_state(sd, "")
    assert torch.equal(sd["weight"], layer.fake_quant_weight().detach())


@pytest.mark.ort_isa
@pytest.mark.parametrize("sch,int8", [(WeightScheme(bits=4), True),
                                      (WeightScheme(bits=3, granularity="per-tensor"), True),
                                      (WeightScheme(bits=4, granularity="per-group", group_size=3), False),
                                      (WeightScheme(bits=4, symmetric=False), False),
                                      (WeightScheme(bits=3, levels="pow2"), False)])
def test_exports_and_ort_matches_torch(tmp_path, sch, int8):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 9, 4)).eval()
    x = torch.randn(16, 2, 11)
    for i, q in ((0, True), (3, False)):
        convert_(model[i], act="relu" if i == 0 else None, quant_output=q, scheme=sch)
        model[i].start_calibration(MinMaxObserver, str(i))
    model[1] = nn.Identity()
    with torch.no_grad():
        model(x)
    for i in (0, 3):
        model[i].finish_calibration()
    # export_onnx verifies ORT against torch (raises beyond 4 steps of the output range)
    figs = export_onnx(model, tmp_path / "m.onnx", x[:4], samples=[x[4:]])
    if int8:  # 2..4-bit int8-kernel weights: int4 codes cast to int8 at load (export/lowbit.py)
        assert figs["ort_int8_ops"] and figs["lowbit_weights"] == {"int4": 2}
    assert figs["int8_weights"] == 0
    assert figs["max_abs_diff"] <= figs["tolerance"]


@pytest.mark.parametrize("sch", [WeightScheme(bits=4), WeightScheme(bits=3, granularity="per-group", group_size=9)])
def test_depthwise_and_grouped_convs(tmp_path, sch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 6, 3, groups=2)).eval()
    x = torch.randn(6, 4, 9, 9)
    for m in model:
        convert_(m, scheme=sch, quant_output=True)
        m.start_calibration(MinMaxObserver, "c")
    with torch.no_grad():
        model(x)
    for m in model:
        m.finish_calibration(bias_correction=True)
        w = m.weight.detach().double().numpy()
        rows = w.shape[0] * (w[0].size // sch.group_size if sch.group_size else 1)
        np.testing.assert_allclose(m.fake_quant_weight().detach().double().numpy(),
                                   ref_uniform(w, rows, sch.bits, True, False), rtol=1e-6, atol=1e-7)
    figs = export_onnx(model, tmp_path / "m.onnx", x[:3], samples=[x[3:]])
    assert figs["max_abs_diff"] <= figs["tolerance"]
