"""The quantize step's dynamic FP8 activations (activations: {format: fp8-e4m3, dynamic: true}): recipe
validation, no calibration, the layers against a float64 reference, the record and nsq.load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import nnsqueeze as nsq
from nnsqueeze.context import Context
from nnsqueeze.errors import RecipeError
from nnsqueeze.quant.args import QuantArgs
from nnsqueeze.quant.floatq import FloatQuantMixin
from nnsqueeze.recipe import Recipe
from nnsqueeze.steps.quantize import Quantize

from tiny_cnn import TinyCNN, make_data

TORCH_FP8 = {"fp8-e4m3": (torch.float8_e4m3fn, 448.0), "fp8-e5m2": (torch.float8_e5m2, 57344.0)}


def _run(model, activations, weights=None, targets=None):
    cfg = {"weights": weights or {"format": "fp8-e4m3"}, "activations": activations} | \
        ({"targets": targets} if targets else {})
    ctx = Context(calib_data=[(torch.randn(2, 11), None)])
    ctx.report.begin_step("quantize", cfg)
    step = Quantize(Quantize.Config.model_validate(cfg))
    return step.run(model, ctx), step


def _torch_dyn(x: torch.Tensor, fmt: str, per_token: bool) -> torch.Tensor:
    """Independent reference: torch's float8 cast of x / (amax / max) (E5M2 saturated by hand), float64."""
    dtype, top = TORCH_FP8[fmt]
    amax = x.abs().amax(-1, keepdim=True) if per_token else x.abs().amax()
    s = torch.clamp(amax.float() / top, min=torch.finfo(torch.float32).tiny)
    return ((x.float() / s).clamp(-top, top).to(dtype).float() * s).double()


@pytest.mark.parametrize("fmt", ["fp8-e4m3", "fp8-e5m2"])
@pytest.mark.parametrize("gran", ["per-tensor", "per-token"])
def test_dynamic_layers_match_a_float64_reference(fmt, gran):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(11, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    ref = ([m.weight.detach().clone() for m in (model[0], model[2])],
           [m.bias.detach().clone() for m in (model[0], model[2])])
    _run(model, {"format": fmt, "dynamic": True, "granularity": gran}, {"format": fmt})
    assert all(isinstance(model[i], FloatQuantMixin) and "input_scale_" not in model[i].qparams() for i in (0, 2))
    assert model[0].aargs == QuantArgs(format=fmt, granularity=gran, dynamic=True)
    x = torch.randn(5, 4, 11, generator=torch.Generator().manual_seed(1)) * torch.logspace(-2, 2, 11)
    h = x.double()
    for i, (w, b) in enumerate(zip(*ref)):
        _, top = TORCH_FP8[fmt]
        s_w = (w.abs().amax(1) / top).reshape(-1, 1)
        w_hat = ((w / s_w).to(TORCH_FP8[fmt][0]).float() * s_w).double()
        h = nn.functional.linear(_torch_dyn(h.float(), fmt, gran == "per-token"), w_hat, b.double()).float().double()
        if i == 0:
            h = h.clamp(min=0)
    with torch.no_grad():
        got = model(x).double()
    np.testing.assert_allclose(got.numpy(), h.numpy(), rtol=1e-5, atol=1e-5 * float(h.abs().max()))


def test_dynamic_needs_no_calibration_and_reloads(tmp_path):
    train = make_data(2, 16)
    quant = {"weights": {"format": "fp8-e4m3"}, "activations": {"format": "fp8-e4m3", "dynamic": True}}
    recipe = Recipe.from_dict({"steps": [{"quantize": quant}], "export": {"onnx": None}})
    result = nsq.compress(TinyCNN(), recipe, calib_data=train, eval_data=train, metric="accuracy")
    figures = result.report["steps"][0]["figures"]
    assert (figures["calibration_samples"], figures["quantized_layers"]) == (0, 4)
    assert figures["scheme"] == "fp8-e4m3 channel, fp8-e4m3 tensor dynamic"
    info = result.records[0]["record"]["layers"]["classifier.1"]
    assert info["activations"] == QuantArgs(format="fp8-e4m3", granularity="tensor", dynamic=True).to_dict()
    result.save(tmp_path / "a")
    loaded = nsq.load(tmp_path / "a", model=TinyCNN())
    layers = [m for m in loaded.modules() if isinstance(m, FloatQuantMixin)]
    assert len(layers) == 4 and all(m.aargs.dynamic and "input_scale_" not in m._buffers for m in layers)
    x = train[0][0]
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))


def test_per_token_on_a_convolution_is_refused_before_converting():
    model = TinyCNN()
    with pytest.raises(RecipeError, match=r"per-token scales are one per row.*features\.0.*convolution") as e:
        _run(model, {"format": "fp8-e4m3", "dynamic": True, "granularity": "per-token"})
    assert "targets: [Linear]" in str(e.value)
    assert not any(isinstance(m, FloatQuantMixin) for m in model.modules())
    q, _ = _run(TinyCNN(), {"format": "fp8-e4m3", "dynamic": True, "granularity": "per-token"}, targets=["Linear"])
    assert [n for n, m in q.named_modules() if isinstance(m, FloatQuantMixin)] == ["classifier.1", "classifier.3"]


@pytest.mark.parametrize("acts, message", [
    ({"format": "fp8-e4m3", "granularity": "per-token"}, "per-token is a run-time scale per row: add dynamic"),
    ({"format": "fp8-e4m3", "granularity": "per-channel"}, "not per-channel"),
    ({"format": "int", "dynamic": True}, "fp8 only.*quantize-dynamic"),
    ({"format": "none", "dynamic": True}, "fp8 only"),
    ({"format": "fp8-e4m3", "dynamic": "sometimes"}, "dynamic"),
])
def test_recipe_errors(acts, message):
    weights = {"format": "fp8-e4m3"} if acts["format"] != "int" else {"bits": 8}
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict({"steps": [{"quantize": {"weights": weights, "activations": acts}}]})


def test_token_granularity_is_for_dynamic_activations_only():
    with pytest.raises(ValueError, match="granularity token"):
        QuantArgs(format="fp8-e4m3", granularity="per-token")
    with pytest.raises(ValueError, match="granularity token"):
        QuantArgs(format="mxfp4", granularity="token", dynamic=True)
    assert QuantArgs(format="fp8-e5m2", granularity="per-token", dynamic=True).describe() == "fp8-e5m2 token dynamic"
