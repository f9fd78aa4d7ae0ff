"""quantize-dynamic with ``smooth``: outlier channels migrated into the weights inside each layer.

References: the float64 float model (fidelity), ONNX Runtime (the exported smoothed layer computes
what the torch layer computes), and the unsmoothed quantized model (smoothing must help on inputs
with outlier channels)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import nnsqueeze as nsq
from nnsqueeze import artifact
from nnsqueeze.context import Context
from nnsqueeze.errors import DataError
from nnsqueeze.export.onnx import export_onnx
from nnsqueeze.export.ort import OrtModule
from nnsqueeze.ops.dynamic import int_linear
from nnsqueeze.quant.dynamic import DynamicQuantLinear, convert_dynamic_
from nnsqueeze.steps.quantize_dynamic import QuantizeDynamic


class Block(nn.Module):
    """LayerNorm feeding three Linears (like q/k/v) and a residual, then an output Linear."""

    def __init__(self, d=13, h=9):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, h), nn.Linear(d, h), nn.Linear(d, h)
        self.out = nn.Linear(3 * h, 5)
        with torch.no_grad():  # BERT-like outlier channels in the LayerNorm output
            self.ln.weight[[2, 7]] = 40.0

    def forward(self, x):
        y = self.ln(x)
        # residual (channels without outliers)
        return self.out(torch.cat([self.q(y), self.k(y), self.v(y)], -1)) + y[..., 8:13]


def _data(n=3, b=6, t=7, d=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, t, d, generator=g),) for _ in range(n)]


def _run(model, smooth, calib, targets=()):
    ctx = Context(calib_data=calib, example_inputs=calib[0][0])
    ctx.report.begin_step("quantize-dynamic", {})
    cfg = QuantizeDynamic.Config(weights={"reduce_range": False}, smooth=smooth, targets=list(targets))
    return QuantizeDynamic(cfg).run(model, ctx), ctx


def _err(model, ref_model, data):
    num = den = 0.0
    with torch.no_grad():
        for (x,) in data:
            r = ref_model.double()(x.double())
            num += float((model(x).double() - r).pow(2).sum())
            den += float(r.pow(2).sum())
    ref_model.float()
    return num / den


@pytest.mark.ort_isa
def test_smoothed_layer_is_exact_in_torch_and_in_ort(tmp_path):
    torch.manual_seed(0)
    layer = nn.Linear(11, 7)
    ref = layer.weight.detach().clone()
    s = torch.rand(11, dtype=torch.float64) * 4 + 0.25
    # bits=None: 8-bit codes, 7 where this CPU's ORT u8s8 kernels saturate (else ORT cannot be exact)
    q = convert_dynamic_(layer, bits=None, signed=True, smooth=s).eval()
    x = torch.randn(3, 5, 11)
    # Stored weight is W*s; the layer multiplies its input by 1/s in float32 first.
    assert torch.allclose(q.weight.double(), ref.double() * s, rtol=1e-6)
    want = int_linear(x * q.input_multiplier_, q.weight_codes(), q.weight_scale_, None, q.bias)
    assert torch.equal(q(x), want)
    fig = export_onnx(q, tmp_path / "l.onnx", x)
    assert fig["max_abs_diff"] <= 1e-5  # ORT: Mul -> DynamicQuantizeLinear -> int8 matmul, same codes
    assert torch.allclose(OrtModule(tmp_path / "l.onnx")(x), q(x), atol=1e-5)
    with pytest.raises(ValueError):
        convert_dynamic_(nn.Linear(3, 2), smooth=torch.tensor([1.0, 0.0, 1.0]))


@pytest.mark.parametrize("alpha", [0.8, "auto"])
def test_smoothing_reduces_error_on_outlier_channels(alpha):
    torch.manual_seed(0)
    base = Block().eval()
    calib, held_out = _data(seed=0), _data(seed=1)
    qkv = ["q", "k", "v"]  # the layers reading the outlier channels
    plain, _ = _run(copy.deepcopy(base), None, calib, qkv)
    smooth, ctx = _run(copy.deepcopy(base), {"alpha": alpha}, calib, qkv)
    e_plain, e_smooth = _err(plain, base, held_out), _err(smooth, base, held_out)
    assert e_smooth < 0.5 * e_plain, (e_plain, e_smooth)
    # q/k/v read the same tensor: one shared s (one Mul + one DynamicQuantizeLinear in ORT).
    r = [m.input_multiplier_ for m in (smooth.q, smooth.k, smooth.v)]
    assert torch.equal(r[0], r[1]) and torch.equal(r[0], r[2])
    assert float(r[0][2]) < float(r[0][0])  # the outlier channel is scaled down
    chosen = ctx.report.layers["q"]["smooth_alpha"]
    if alpha == "auto":  # the chosen alpha has the smallest calibration output error, no smoothing included
        errs = ctx.report.steps[-1]["figures"]["smooth_alpha_errors"]
        assert set(errs) == {"None", "0.5", "0.6", "0.7", "0.8", "0.9", "1.0"}
        assert errs[str(chosen)] == min(errs.values()) < errs["None"]
    else:
        assert chosen == 0.8


def test_smooth_needs_calibration_data():
    ctx = Context()
    ctx.report.begin_step("quantize-dynamic", {})
    with pytest.raises(DataError, match="calib_data"):
        QuantizeDynamic(QuantizeDynamic.Config(smooth={"alpha": 0.5})).run(Block(), ctx)


def test_smoothed_model_round_trips_through_the_pipeline(tmp_path):
    torch.manual_seed(0)
    base = Block().eval()
    calib = _data()
    res = nsq.compress(base, {"steps": [{"quantize-dynamic": {"smooth": {"alpha": 0.8}}}],
                              "evaluate": {"warmup": 0, "runs": 1}}, calib_data=calib, metric=None, progress=False)
    assert sum(isinstance(m, DynamicQuantLinear) and hasattr(m, "input_multiplier_") for m in res.model.modules()) == 4
    x = calib[0][0]
    again = artifact.load(res.save(tmp_path / "a"), Block())
    assert torch.equal(again(x), res.model(x))
    assert torch.allclose(OrtModule(res.onnx)(x), res.model(x), atol=1e-3)


def test_smooth_preset_loads_with_latency_guard():
    r = nsq.load_recipe("int8-dynamic-smooth")
    assert r.latency_guard and r.steps[0].config.smooth.alpha == "auto"


def test_float_layers_keeps_the_most_sensitive_layer_in_float():
    """Without smoothing, the Linears reading the outlier channels hurt most; with float_layers: 1 the
    one whose quantization alone gives the largest calibration output error stays nn.Linear."""
    torch.manual_seed(0)
    base = Block().eval()
    calib = _data()
    model, _ = _run(copy.deepcopy(base), None, calib)
    ctx1 = Context(calib_data=calib, example_inputs=calib[0][0])
    ctx1.report.begin_step("quantize-dynamic", {})
    cfg = QuantizeDynamic.Config(weights={"reduce_range": False}, float_layers=1)
    model1 = QuantizeDynamic(cfg).run(copy.deepcopy(base), ctx1)
    kept = ctx1.report.steps[-1]["figures"]["float_layers"]
    (name, err), = kept.items()
    assert type(model1.get_submodule(name)) is nn.Linear
    assert sum(isinstance(m, DynamicQuantLinear) for m in model1.modules()) == 3
    assert any(s["layer"] == name and "float_layers" in s["reason"] for s in ctx1.report.skipped)
    # The kept layer is the worst one alone: quantizing each other layer alone gives a smaller error.
    step = QuantizeDynamic(cfg)
    for other in ("q", "k", "v", "out"):
        m = copy.deepcopy(base)
        e = step._output_error(m, calib, {other: (m.get_submodule(other), None)}, 8, True)
        assert e <= err * (1 + 1e-3) or other == name
    assert _err(model1, base, _data(seed=1)) < _err(model, base, _data(seed=1))
