"""Static int8 on a small mobile CNN (depthwise convs, ReLU6, hardswish, SiLU, squeeze-excite, residual
adds, pooling): the simulation equals what ONNX Runtime runs (``ort_isa``: also under emulated AVX2)."""

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn
from test_quantize_mobile_ops import trained_bn

from nnsqueeze.context import Context
from nnsqueeze.export.onnx import export_onnx
from nnsqueeze.export.ort import OrtModule, optimized_op_types
from nnsqueeze.isa import u8s8_saturates
from nnsqueeze.quant.integer import fit_clip_scale
from nnsqueeze.steps.quantize import Quantize


def cbr(cin, cout, k=1, stride=1, groups=1, act=nn.ReLU6):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, act()) if act else nn.Sequential(*layers)


class SE(nn.Module):
    def __init__(self, c, r=4):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(c, c // r, 1), nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        s = torch.relu(self.reduce(nn.functional.adaptive_avg_pool2d(x, 1)))
        return x * torch.sigmoid(self.expand(s))


class Block(nn.Module):
    """Inverted residual: expand 1x1, depthwise kxk, optional SE, project 1x1, residual add."""

    def __init__(self, c, e=4, k=3, act=nn.ReLU6, se=False):
        super().__init__()
        self.expand = cbr(c, c * e, act=act)
        self.dw = cbr(c * e, c * e, k, groups=c * e, act=act)
        self.se = SE(c * e) if se else nn.Identity()
        self.project = cbr(c * e, c, act=None)

    def forward(self, x):
        return x + self.project(self.se(self.dw(self.expand(x))))


class MobileNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16, 3, 2, act=nn.Hardswish)
        self.blocks = nn.Sequential(Block(16), Block(16, k=5, se=True), Block(16, act=nn.SiLU, se=True))
        self.head = cbr(16, 64)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.head(self.blocks(self.stem(x)))), 1))


@pytest.fixture(scope="module")
def mobile():
    torch.manual_seed(0)
    model = MobileNet()
    trained_bn(model)
    model.eval()
    calib = [(torch.randn(16, 3, 32, 32), None) for _ in range(2)]
    ctx = Context(calib_data=calib)
    ctx.report.begin_step("quantize", {})
    q = Quantize(Quantize.Config()).run(copy.deepcopy(model), ctx)
    return model, q


def _convs(q):
    return {n: m for n, m in q.named_modules() if isinstance(m, nn.Conv2d)}


@pytest.mark.ort_isa
def test_mobile_int8_equals_ort(mobile, tmp_path):
    fp, q = mobile
    torch.manual_seed(1)
    x = torch.randn(8, 3, 32, 32)
    path = tmp_path / "q.onnx"
    figs = export_onnx(q, path, x, samples=[torch.randn(5, 3, 32, 32)])
    # every conv (SE's included) and the classifier run as integer kernels
    assert figs["ort_int8_ops"].get("QLinearConv") == len(_convs(q)) == 15
    assert figs["ort_int8_ops"].get("QGemm") == 1 and figs["ort_float_ops"] == {}
    with torch.no_grad():
        ref = q(x)
    got = OrtModule(path)(x)
    # ORT's integer kernels reproduced: float32 round-off on the logits, far below one 8-bit step
    step = float(ref.max() - ref.min()) / 255
    assert (got - ref).abs().max() <= 0.02 * step
    assert (got.argmax(1) == ref.argmax(1)).all()
    with torch.no_grad():
        assert (fp(x).argmax(1) == ref.argmax(1)).float().mean() >= 0.75


@pytest.mark.ort_isa
def test_depthwise_keeps_8bit_weights(mobile, tmp_path):
    _, q = mobile
    convs = _convs(q)
    dw = [m for n, m in convs.items() if n.endswith("dw.0")]
    pw = [m for n, m in convs.items() if not n.endswith("dw.0")]
    # ORT's depthwise kernel accumulates in int32 on every CPU: 8-bit codes everywhere
    assert all(m.weight_bits == 8 and int(m.weight_codes().abs().max()) == 127 for m in dw)
    # GEMM-based layers: 7-bit codes where ORT's u8s8 GEMM saturates int16 pair sums (no VNNI)
    assert all(m.weight_bits == (7 if u8s8_saturates() else 8) for m in pw)


def test_relu6_absorbed_and_dropped_in_ort(mobile, tmp_path):
    _, q = mobile
    convs = _convs(q)
    relu6 = [n for n, m in convs.items() if m.act == "relu6"]
    assert sorted(relu6) == sorted(f"blocks.{b}.{p}.0" for b in (0, 1) for p in ("expand", "dw")) + ["head.0"]
    for n in relu6:
        m = convs[n]
        assert int(m.output_zero_point_) == 0
        assert np.float32(m.output_scale_) * np.float32(255) <= np.float32(6.0)
    path = tmp_path / "q.onnx"
    export_onnx(q, path, torch.randn(2, 3, 32, 32), verify=False)
    ops = optimized_op_types(path.read_bytes())
    assert "Clip" not in ops and "Conv" not in ops


def test_fit_clip_scale_puts_top_code_at_or_below_6():
    s = torch.tensor(6.0 / 255)
    fitted = fit_clip_scale(s, torch.tensor(0), (0, 255))
    assert np.float32(fitted) * np.float32(255) <= np.float32(6.0)
    assert abs(float(fitted) - float(s)) < 1e-8
    # a range not starting at 0, or ending well below 6, is left alone
    assert fit_clip_scale(s, torch.tensor(3), (0, 255)) is s
    small = torch.tensor(3.0 / 255)
    assert torch.equal(fit_clip_scale(small, torch.tensor(0), (0, 255)), small.float())


def test_integer_forward_matches_float_simulation_within_a_step(mobile):
    _, q = mobile
    conv = _convs(q)["blocks.1.expand.0"]
    torch.manual_seed(2)
    x = torch.randn(4, 16, 16, 16)
    with torch.no_grad():
        exact = conv(x)
        approx = conv._float_sim(x)
    assert (exact - approx).abs().max() <= float(conv.output_scale_) * 1.001
    # gradients still flow (straight-through) when asked for
    xg = x.clone().requires_grad_(True)
    conv(xg).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


def test_int8_weights_stored_per_layer_width(mobile, tmp_path):
    _, q = mobile
    path = tmp_path / "q.onnx"
    export_onnx(q, path, torch.randn(2, 3, 32, 32), verify=False)
    g = onnx.load(str(path)).graph
    codes = [numpy_helper.to_array(i) for i in g.initializer if numpy_helper.to_array(i).dtype == np.int8]
    assert len(codes) == 16


def test_wide_first_gives_the_first_layers_16bit_activations(mobile, tmp_path):
    fp, _ = mobile
    torch.manual_seed(3)
    calib = [(torch.randn(16, 3, 32, 32), None)]
    ctx = Context(calib_data=calib)
    ctx.report.begin_step("quantize", {})
    q = Quantize(Quantize.Config(wide_first=2, layer_activations={"stem.0": {"bits": 8}})).run(copy.deepcopy(fp), ctx)
    bits = {n: m.ascheme.bits for n, m in _convs(q).items()}
    # stem.0 has its own entry, so the next two layers in order are the wide ones
    assert bits["stem.0"] == 8 and bits["blocks.0.expand.0"] == 16 and bits["blocks.0.dw.0"] == 16
    assert sum(b == 16 for b in bits.values()) == 2
    # a wide layer keeps its ReLU6 as a float op (the absorbed form needs 8-bit codes)
    assert _convs(q)["blocks.0.dw.0"].act is None and _convs(q)["blocks.1.dw.0"].act == "relu6"
    assert any("16-bit activations (2 layers" in n["note"] for n in ctx.report.notes)
    x = torch.randn(6, 3, 32, 32)
    figs = export_onnx(q, tmp_path / "q.onnx", x)
    assert figs["max_abs_diff"] <= figs["tolerance"]
    assert figs["ort_int8_ops"]["QLinearConv"] == 13


def test_wide_first_rejects_negative():
    from nnsqueeze.errors import RecipeError
    from nnsqueeze.recipe import load_recipe

    with pytest.raises(RecipeError, match="wide_first"):
        load_recipe([{"quantize": {"wide_first": -1}}])


def test_wide_layers_before_integer_ones_are_verified_on_the_mean(mobile):
    fp, q = mobile
    assert not any(getattr(m, "onnx_verify_mean", False) for m in q.modules())  # all integer: max check
    ctx = Context(calib_data=[(torch.randn(8, 3, 32, 32), None)])
    ctx.report.begin_step("quantize", {})
    w = Quantize(Quantize.Config(wide_first=1)).run(copy.deepcopy(fp), ctx)
    assert [n for n, m in w.named_modules() if getattr(m, "onnx_verify_mean", False)] == ["stem.0"]
