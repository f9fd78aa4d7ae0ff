"""The ``quantize`` step's float formats (FP8 weights/activations, MX and NVFP4 weights): layers against
float64 references built from torch's own float8 casts and the MX/NVFP4 math, the recorded QuantArgs,
artifact round trips (outputs equal after nsq.load) and the recipe errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nnsqueeze as nsq
from nnsqueeze.context import Context
from nnsqueeze.errors import RecipeError
from nnsqueeze.ops.mx import mx_fake_quantize, nvfp4_fake_quantize
from nnsqueeze.quant.args import QuantArgs
from nnsqueeze.quant.floatq import FloatQuantMixin
from nnsqueeze.recipe import Recipe
from nnsqueeze.steps.quantize import Quantize

from tiny_cnn import TinyCNN, make_data

TORCH_FP8 = {"fp8-e4m3": (torch.float8_e4m3fn, 448.0), "fp8-e5m2": (torch.float8_e5m2, 57344.0)}


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # odd widths: 27 inputs per conv channel (not a block multiple), 5x7 and 7x... shapes
    return nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 5 * 3, 7), nn.ReLU(),
                         nn.Linear(7, 3)).eval()


def _data(n: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 7, 5, generator=g), None) for _ in range(n)]


def _run(model, weights, activations=None, data=None):
    cfg = {"weights": weights} | ({"activations": activations} if activations else {})
    ctx = Context(calib_data=data or _data())
    ctx.report.begin_step("quantize", cfg)
    step = Quantize(Quantize.Config.model_validate(cfg))
    return step.run(model, ctx), step


def _torch_fp8(x: torch.Tensor, scale: torch.Tensor, fmt: str) -> torch.Tensor:
    """Reference codes from torch's own float8 cast of x / scale (E5M2 saturated by hand: torch's cast
    does not saturate, ONNX's QuantizeLinear does), decoded times the scale in float32 as ONNX's
    DequantizeLinear does, returned in float64."""
    dtype, top = TORCH_FP8[fmt]
    v = (x.float() / scale.float()).clamp(-top, top)
    return (v.to(dtype).float() * scale.float()).double()


@pytest.mark.parametrize("fmt", ["fp8-e4m3", "fp8-e5m2"])
@pytest.mark.parametrize("gran", ["per-tensor", "per-channel"])
def test_fp8_layers_match_a_float64_reference(fmt, gran):
    model = _net()
    float_model = _net()
    data = _data()
    _run(model, {"format": fmt, "granularity": gran}, {"format": fmt}, data)
    assert all(isinstance(model[i], FloatQuantMixin) for i in (0, 3, 5))
    x = data[0][0]
    # the first conv's input scale: calibrated amax over every batch / max finite
    amax = torch.stack([b[0].abs().amax() for b in data]).amax()
    assert torch.equal(model[0].input_scale_, amax / TORCH_FP8[fmt][1])
    # layer by layer in float64 from the float weights
    h, out = x.double(), None
    float_model.requires_grad_(False)
    for i, layer in enumerate(float_model):
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            q = model[i]
            w = layer.weight.detach()
            s_w = (w.abs().reshape(w.shape[0], -1).amax(1) if gran == "per-channel" else w.abs().amax()) / \
                TORCH_FP8[fmt][1]
            assert torch.equal(q.weight_scale_, s_w)
            s_b = s_w.reshape(-1, *[1] * (w.dim() - 1)) if gran == "per-channel" else s_w
            w_hat = _torch_fp8(w, s_b, fmt)
            assert torch.equal(q.dequantized_weight().double(), w_hat)
            x_hat = _torch_fp8(h.float(), q.input_scale_, fmt)
            if isinstance(layer, nn.Conv2d):
                h = nn.functional.conv2d(x_hat, w_hat, layer.bias.double())
            else:
                h = nn.functional.linear(x_hat, w_hat, layer.bias.double())
            h = h.float().double()  # each layer's output is float32 in the simulation
        else:
            h = layer(h)
        out = h
    with torch.no_grad():
        got = model(x).double()
    assert torch.allclose(got, out, rtol=1e-5, atol=1e-5 * float(out.abs().max()))


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8-e4m3", "mxfp6-e2m3", "nvfp4"])
def test_block_formats_are_weight_only_on_rows(fmt):
    model, float_model = _net(), _net()
    _run(model, {"format": fmt})
    for i in (0, 3, 5):
        q, w = model[i], float_model[i].weight.detach()
        rows = w.reshape(w.shape[0], -1)   # blocks along each output channel's 27 / 75 / 7 inputs
        want = nvfp4_fake_quantize(rows) if fmt == "nvfp4" else mx_fake_quantize(rows, fmt)
        assert torch.equal(q.dequantized_weight(), want.reshape(w.shape))
        assert q.aargs is None and "input_scale_" not in q.qparams()
        assert q.onnx_unsupported and fmt in q.onnx_unsupported
    x = _data()[0][0]
    with torch.no_grad():  # float activations: the float net with the quantized weights
        ref = float_model
        for i in (0, 3, 5):
            ref[i].weight.copy_(model[i].dequantized_weight())
        assert torch.equal(model(x), ref(x))


@pytest.mark.parametrize("weights, activations", [
    ({"format": "fp8-e4m3", "granularity": "per-channel"}, {"format": "fp8-e4m3"}),
    ({"format": "fp8-e5m2", "granularity": "per-tensor"}, {"format": "fp8-e5m2"}),
    ({"format": "fp8-e4m3"}, None),
    ({"format": "mxfp4"}, None),
    ({"format": "mxfp8-e4m3"}, {"format": "fp8-e4m3"}),
    ({"format": "nvfp4"}, None),
])
def test_record_and_reload_give_equal_outputs(tmp_path, weights, activations):
    train = make_data(2, 16)
    quant = {"weights": weights} | ({"activations": activations} if activations else {})
    recipe = Recipe.from_dict({"steps": [{"quantize": quant}], "export": {"onnx": None}})
    result = nsq.compress(TinyCNN(), recipe, calib_data=train, eval_data=train, metric="accuracy")
    want = Quantize.Config.model_validate(quant).weights.args()
    result.save(tmp_path / "a")
    loaded = nsq.load(tmp_path / "a", model=TinyCNN())
    layers = {n: m for n, m in loaded.named_modules() if isinstance(m, FloatQuantMixin)}
    assert set(layers) == {"features.0", "features.3", "classifier.1", "classifier.3"}
    for m in layers.values():
        assert m.wargs == want and (m.aargs is None) == (activations is None)
    x = train[0][0]
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))
    weight_bytes = (tmp_path / "a" / "model.safetensors").stat().st_size
    assert weight_bytes < 0.5 * sum(p.numel() * 4 for p in TinyCNN().parameters())   # codes, not float32


def test_recorded_args_are_the_full_form():
    model, step = _run(_net(), {"format": "fp8-e4m3", "granularity": "per-tensor"}, {"format": "fp8-e4m3"})
    info = step.record()["layers"]["0"]
    assert info["weights"] == QuantArgs(format="fp8-e4m3", granularity="tensor").to_dict()
    assert info["activations"] == QuantArgs(format="fp8-e4m3", granularity="tensor", observer="minmax").to_dict()


@pytest.mark.parametrize("quant, message", [
    ({"weights": {"format": "fp8-e4m3", "granularity": "per-group", "group_size": 32}}, "group_size"),
    ({"weights": {"format": "fp8-e4m3", "bits": 4}}, "fp8-e4m3 is 8-bit"),
    ({"weights": {"format": "mxfp4", "granularity": "per-tensor"}}, "mxfp4 is block\\(32\\)"),
    ({"weights": {"format": "nvfp4", "levels": "nf4"}}, "belong to the int grid"),
    ({"weights": {"format": "fp8-e4m3", "symmetric": False}}, "symmetric only"),
    ({"activations": {"format": "fp8-e4m3"}}, "fp8-e4m3 needs float weights"),
    ({"activations": {"format": "none"}}, "none needs float weights"),
    ({"weights": {"format": "mxfp4", "bits": 8}}, "mxfp4 is 4-bit"),
    ({"weights": {"format": "fp8-e4m3"}, "activations": {"bits": 8}}, "takes fp8 activations or none"),
    ({"weights": {"format": "fp8-e4m3"}, "activations": {"format": "fp8-e4m3", "bits": 4}}, "8-bit and symmetric"),
    ({"weights": {"format": "fp8-e4m3"}, "ops": ["add"]}, "not supported with float formats"),
    ({"weights": {"format": "mxfp4"}, "wide_first": 2}, "wide_first"),
])
def test_recipe_errors(quant, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict({"steps": [{"quantize": quant}]})


def test_qat_refuses_float_formats():
    with pytest.raises(RecipeError, match="qat trains int grids"):
        Recipe.from_dict({"steps": [{"qat": {"weights": {"format": "fp8-e4m3"}}}]})


def test_revert_gives_the_float_layer_back():
    model, _ = _run(_net(), {"format": "fp8-e4m3"}, {"format": "fp8-e4m3"})
    ref = _net()
    layer = model[3].revert_()
    assert type(layer) is nn.Linear and not hasattr(layer, "input_scale_")
    assert torch.equal(layer.weight, ref[3].weight)


def test_float_family_implements_the_protocol():
    from nnsqueeze.quant.floatq import FLOAT_MODULE_MAP
    from nnsqueeze.quant.protocol import ExportHints, Packable, QuantizedModule

    for cls in FLOAT_MODULE_MAP.values():
        assert issubclass(cls, QuantizedModule) and issubclass(cls, Packable) and issubclass(cls, ExportHints)
        assert not getattr(cls, "__abstractmethods__", None), cls
    model, _ = _run(_net(), {"format": "nvfp4"})
    assert model[0].onnx_unsupported and model[0].revertible
    assert sorted(model[0].qparams()) == ["weight_tensor_scale_"]
