"""The qat step + finetune: LSQ, BN folded on the fly, grid penalty, final fold, ORT export, reload."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from nnsqueeze.context import Context
from nnsqueeze.errors import RecipeError
from nnsqueeze.export.onnx import export_onnx
from nnsqueeze.export.ort import OrtModule
from nnsqueeze.quant.modules import fake_quant_modules
from nnsqueeze.steps.finetune import Finetune
from nnsqueeze.steps.qat import Qat, grid_distance


def prepare(model, data, **cfg):
    cfg.setdefault("weights", {}).setdefault("reduce_range", False)
    ctx = Context(train_data=data["train"], calib_data=data["calib"], progress=False)
    ctx.report.begin_step("qat", {})
    step = Qat(Qat.Config.model_validate(cfg))
    return step.run(model, ctx), step, ctx


def train(model, ctx, steps=6):
    ctx.report.begin_step("finetune", {})
    return Finetune(Finetune.Config(steps=steps, lr=1e-3)).run(model, ctx)


@pytest.mark.parametrize("bits", [8, 4])
def test_qat_exports_and_ort_matches_within_one_step(tmp_path, tiny_cnn, toy_data, bits):
    fresh = copy.deepcopy(tiny_cnn)
    model, step, ctx = prepare(tiny_cnn, toy_data, weights={"bits": bits}, freeze_bn_after=3, grid_lambda=0.01)
    assert step.record()["bn_attached"] == [["features.0", "features.1"], ["features.3", "features.4"]]
    assert model.features[0].weight_step.requires_grad and model.features[3].input_step is model.features[0].output_step
    model = train(model, ctx)
    rec = step.record()  # updated in place by the callback at the end of training
    assert rec["bn_attached"] == [] and rec["lsq"] is False and len(rec["folded"]) == 2
    assert all("bn" not in m._modules and not m._parameters.get("weight_step") for _, m in fake_quant_modules(model))
    model.eval()
    x = toy_data["eval"][0][0]
    figs = export_onnx(model, tmp_path / "m.onnx", x, samples=[b[0] for b in toy_data["eval"][1:]])
    assert figs["ort_int8_ops"] == {"QGemm": 2, "QLinearConv": 2}
    ort = OrtModule((tmp_path / "m.onnx").read_bytes())
    for xb, _ in toy_data["eval"]:
        with torch.no_grad():
            ref = model(xb)
        step8 = float(ref.max() - ref.min()) / 255
        assert float((ort(xb) - ref).abs().max()) <= step8
    # the artifact path: pack, rebuild from the (JSON) record on a fresh model, unpack, load
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for name, mod in fake_quant_modules(model):
        mod.pack_state(sd, f"{name}.")
    rebuilt = Qat.rebuild(fresh, step.config, json.loads(json.dumps(rec)))
    for name, mod in fake_quant_modules(rebuilt):
        mod.unpack_state(sd, f"{name}.")
    rebuilt.load_state_dict(sd, strict=True)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), model(x))


def test_bn_statistics_freeze_after_n_steps(tiny_cnn, toy_data):
    model, _, ctx = prepare(tiny_cnn, toy_data, weights={"bits": 4}, freeze_bn_after=2, lsq=False)
    bn = model.features[0].bn
    seen = []

    class Spy:
        def on_train_begin(self, m, total): pass
        def on_step_end(self, m, step, total): seen.append(bn.running_mean.clone())
        def on_train_end(self, m): pass

    ctx.callbacks.insert(0, Spy())
    train(model, ctx, steps=5)
    assert not torch.equal(seen[0], seen[1])                       # steps 1, 2 update the statistics
    assert all(torch.equal(seen[1], s) for s in seen[2:])          # frozen afterwards


def test_grid_penalty_pulls_weights_to_the_grid(tiny_cnn, toy_data):
    model, _, ctx = prepare(tiny_cnn, toy_data, weights={"bits": 3}, grid_lambda=1.0, lsq=False, bn="static")
    cb = ctx.callbacks[-1]
    layers = [m for _, m in fake_quant_modules(model)]
    with torch.no_grad():
        before = float(sum(grid_distance(m) for m in layers))
    assert before > 0
    opt = torch.optim.Adam([m.weight for m in layers], lr=2e-3)
    for _ in range(40):
        opt.zero_grad()
        cb.penalty(model).backward()
        opt.step()
    with torch.no_grad():
        assert float(sum(grid_distance(m) for m in layers)) < 0.5 * before


def test_adaround_and_equalize_with_train_bn_are_rejected():
    with pytest.raises(RecipeError, match="post-training"):
        Qat(Qat.Config.model_validate({"weights": {"bits": 4, "adaround": {}}}))
    with pytest.raises(RecipeError, match="bn: static"):
        Qat(Qat.Config.model_validate({"equalize": {"method": "cle"}}))


def test_bn_after_an_ignored_layer_is_reported(tiny_cnn, toy_data):
    model, _, ctx = prepare(tiny_cnn, toy_data, ignore=["features.3"])
    assert isinstance(model.features[1], torch.nn.Identity)          # attached to features.0
    assert isinstance(model.features[4], torch.nn.BatchNorm1d)       # left in place, and said so
    skipped = [s for s in ctx.report.skipped if s["layer"] == "features.4"]
    assert len(skipped) == 1 and "not selected" in skipped[0]["reason"]
