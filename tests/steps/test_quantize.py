"""The quantize step: config validation, calibration, report, record/rebuild, masks."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from nnsqueeze.context import Context
from nnsqueeze.errors import DataError, RecipeError
from nnsqueeze.quant.modules import QuantConv1d, QuantLinear
from nnsqueeze.registry import STEPS
from nnsqueeze.steps.quantize import Quantize


def make_step(**cfg) -> Quantize:
    cfg.setdefault("weights", {}).setdefault("reduce_range", False)  # same result on every CPU
    return Quantize(Quantize.Config.model_validate(cfg))


def run(model, data, **cfg):
    ctx = Context(calib_data=data, progress=False)
    ctx.report.begin_step("quantize", {})
    step = make_step(**cfg)
    return step.run(model, ctx), step, ctx


def test_registered_with_defaults():
    assert STEPS.get("quantize") is Quantize
    cfg = Quantize.Config()
    assert (cfg.weights.bits, cfg.weights.granularity, cfg.weights.symmetric) == (8, "per-channel", True)
    assert (cfg.activations.bits, cfg.activations.granularity, cfg.activations.symmetric) == (8, "per-tensor", False)
    assert (cfg.calibration.method, cfg.calibration.samples, cfg.fold_bn) == ("minmax", 512, True)


@pytest.mark.parametrize("cfg,where", [
    ({"weights": {"granularity": "per-group"}}, "weights"),
    ({"weights": {"group_size": 8}}, "weights"),
    ({"weights": {"levels": "nf4", "bits": 3}}, "weights"),
    ({"weights": {"levels": "pow2", "clip": "mse"}}, "weights"),
    ({"layer_weights": {"features.0": {"levels": "nf4"}}}, "layer_weights.features.0"),
    ({"activations": {"granularity": "per-channel"}}, "activations"),
])
def test_unsupported_schemes_say_what_is_supported(cfg, where):
    with pytest.raises(RecipeError) as e:
        Quantize(Quantize.Config.model_validate(cfg), index=2)
    assert e.value.where == f"steps[2].quantize.{where}"
    assert "per-channel" in e.value.fix and "per-tensor" in e.value.fix


@pytest.mark.parametrize("cfg", [{"weights": {"bits": 9}}, {"calibration": {"samples": 0}},
                                 {"weights": {"bitz": 8}}, {"fold": True}, {"weights": {"granularity": "row"}},
                                 {"activations": {"bits": 9}}, {"activations": {"bits": 1}}])
def test_malformed_config_is_rejected(cfg):
    with pytest.raises(ValidationError):
        Quantize.Config.model_validate(cfg)


def test_unknown_calibration_method():
    with pytest.raises(RecipeError, match="unknown observer 'entropy'"):
        Quantize(Quantize.Config.model_validate({"calibration": {"method": "entropy"}}))


def test_quantizes_tiny_cnn(tiny_cnn, toy_data):
    x = toy_data["eval"][0][0]
    with torch.no_grad():
        ref = tiny_cnn(x)
    model, step, ctx = run(tiny_cnn, toy_data["calib"])
    f, c = model.features, model.classifier
    assert [type(m) for m in f] == [QuantConv1d, nn.Identity, nn.Identity] * 2
    assert type(c[1]) is QuantLinear and type(c[3]) is QuantLinear and type(c[2]) is nn.ReLU
    assert f[0].act == "relu" and f[0].quant_output and not c[1].quant_output
    with torch.no_grad():
        out = model(x)
    # int8 stays close to fp32 on this easy model: within 3% of the logit range, same predictions
    assert (out - ref).abs().max() <= 0.03 * (ref.max() - ref.min())
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.95
    figs = ctx.report.steps[0]["figures"]
    assert figs["calibration_samples"] == 64 and figs["quantized_layers"] == 4
    assert figs["bn_folded"] == 2 and figs["relu_fused"] == 2 and figs["weight_bits"] == 8
    assert figs["bias_corrected"] == 4
    layer = ctx.report.layers["features.0"]
    assert layer["bits"] == 8 and "per-channel" in layer["scheme"] and layer["weight_sqnr_db"] > 30
    rec = json.loads(json.dumps(step.record()))
    assert rec["folded"] == [["features.0", "features.1"], ["features.3", "features.4"]]
    assert rec["relu_removed"] == ["features.2", "features.5"]
    assert rec["layers"]["classifier.1"] == {
        "type": "Linear", "act": None, "quant_output": False, "weight_bits": 8,
        "scheme": {"bits": 8, "symmetric": True, "granularity": "per-channel", "group_size": None,
                   "levels": "uniform", "clip": "none"}}


def test_rebuild_and_load_reproduce_exactly(tiny_cnn, toy_data):
    fresh = copy.deepcopy(tiny_cnn)
    model, step, _ = run(tiny_cnn, toy_data["calib"])
    # as the artifact writer/loader do: pack, then unpack onto the rebuilt fresh model
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for name, mod in model.named_modules():
        if hasattr(mod, "pack_state"):
            mod.pack_state(sd, f"{name}.")
    assert sd["features.3.weight"].dtype == torch.int8
    rebuilt = Quantize.rebuild(fresh, step.config, json.loads(json.dumps(step.record())))
    for name, mod in rebuilt.named_modules():
        if hasattr(mod, "unpack_state"):
            mod.unpack_state(sd, f"{name}.")
    rebuilt.load_state_dict(sd, strict=True)
    x = toy_data["eval"][1][0]
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), model(x))


def test_bias_correction_can_be_turned_off(tiny_cnn, toy_data):
    bias = tiny_cnn.classifier[3].bias.detach().clone()
    model, _, ctx = run(tiny_cnn, toy_data["calib"], bias_correction=False)
    assert ctx.report.steps[0]["figures"]["bias_corrected"] == 0
    assert torch.equal(model.classifier[3].bias, bias)  # not behind a BN: untouched


@pytest.mark.parametrize("pruned", [False, True])
def test_packed_state_is_about_4x_smaller(tiny_cnn, toy_data, pruned):
    fp_bytes = sum(v.numel() * v.element_size() for v in tiny_cnn.state_dict().values())
    if pruned:  # bool masks as the prune step leaves them: stored as bits, not bytes
        for mod in (tiny_cnn.features[0], tiny_cnn.features[3], tiny_cnn.classifier[1], tiny_cnn.classifier[3]):
            mod.register_buffer("weight_mask", torch.rand(mod.weight.shape) > 0.6)
    model, _, _ = run(tiny_cnn, toy_data["calib"])
    sd = dict(model.state_dict())
    for name, mod in model.named_modules():
        if hasattr(mod, "pack_state"):
            mod.pack_state(sd, f"{name}.")
    q_bytes = sum(v.numel() * v.element_size() for v in sd.values())
    assert q_bytes <= 0.30 * fp_bytes


def test_masked_weights_stay_zero(tiny_cnn, toy_data):
    masks = {}
    for name in ("features.0", "features.3", "classifier.1"):
        mod = tiny_cnn.get_submodule(name)
        mask = torch.rand(mod.weight.shape) > 0.6
        with torch.no_grad():
            mod.weight.mul_(mask)
        mod.register_buffer("weight_mask", mask)
        masks[name] = mask
    model, _, _ = run(tiny_cnn, toy_data["calib"])
    for name, mask in masks.items():
        mod = model.get_submodule(name)
        assert torch.all(mod.weight[~mask] == 0)            # BN folding keeps zeros
        assert torch.all(mod.weight_codes()[~mask] == 0)
        assert torch.all(mod.fake_quant_weight()[~mask] == 0)
        assert torch.equal(mod.weight_mask, mask)


def test_falls_back_to_train_data_with_a_note(tiny_cnn, toy_data):
    ctx = Context(train_data=toy_data["train"], progress=False)
    ctx.report.begin_step("quantize", {})
    make_step(calibration={"samples": 40}).run(tiny_cnn, ctx)
    assert any("train_data" in n["note"] for n in ctx.report.notes)
    assert ctx.report.steps[0]["figures"]["calibration_samples"] == 64  # whole batches of 32


def test_no_data_is_a_data_error(tiny_cnn):
    with pytest.raises(DataError, match="calibration data"):
        make_step().run(tiny_cnn, Context(progress=False))


def test_nan_during_calibration_names_the_layer(tiny_cnn):
    x = torch.randn(8, 1, 37)
    x[0, 0, 3] = float("nan")
    ctx = Context(calib_data=[(x, None)], progress=False)
    ctx.report.begin_step("quantize", {})
    with pytest.raises(DataError, match="NaN at layer features.0 input"):
        make_step().run(tiny_cnn, ctx)
    # no half-calibrated layer is left behind
    assert type(tiny_cnn.features[0]) is nn.Conv1d and type(tiny_cnn.classifier[1]) is nn.Linear
    assert not any(k.endswith("scale_") for k in tiny_cnn.state_dict())


class Functional(nn.Module):
    """ReLU as a function, a shared ReLU module, and a layer that forward never calls."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.unused = nn.Conv1d(1, 3, 3), nn.Conv1d(3, 5, 3), nn.Linear(2, 2)
        self.act = nn.ReLU()
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        y = self.act(self.c2(F.relu(self.c1(x))))
        return self.head(self.act(y.mean(-1)))


def test_functional_and_shared_relus_and_unused_layers():
    torch.manual_seed(0)
    m = Functional().eval()
    data = [(torch.randn(16, 1, 21), None)]
    ref_model = copy.deepcopy(m)
    model, step, ctx = run(m, data, targets=["Conv1d", "Linear"])
    assert model.c1.act == "relu" and model.c2.act == "relu"
    assert isinstance(model.act, nn.ReLU)          # shared: kept (ReLU on ReLU output is a no-op)
    assert type(model.unused) is nn.Linear         # never called: left in float, and said so
    assert any(s["layer"] == "unused" for s in ctx.report.skipped)
    assert step.record()["relu_removed"] == [] and "unused" not in step.record()["layers"]
    x = torch.randn(4, 1, 21)
    with torch.no_grad():
        assert (model(x) - ref_model(x)).abs().max() < 0.05


@pytest.mark.parametrize("setting,saturates,bits", [(True, False, 7), (False, True, 8), ("auto", True, 7),
                                                    ("auto", False, 8)])
def test_reduce_range(monkeypatch, tiny_cnn, toy_data, setting, saturates, bits):
    monkeypatch.setenv("NNSQUEEZE_ISA", "avx2" if saturates else "avx512-vnni")  # what the detector reports
    model, step, ctx = run(tiny_cnn, toy_data["calib"], weights={"reduce_range": setting})
    assert {v["weight_bits"] for v in step.record()["layers"].values()} == {bits}
    assert model.features[0].weight_codes().abs().max().item() == 2 ** (bits - 1) - 1
    noted = any("7-bit" in n["note"] and "(avx2)" in n["note"] for n in ctx.report.notes)
    assert noted == (setting == "auto" and saturates)
    # kept 8 bits on a saturating CPU, as asked: the report says ORT here will differ
    assert any("will differ" in n["note"] for n in ctx.report.notes) == (setting is False and saturates)
