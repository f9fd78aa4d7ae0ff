"""The ``mixed`` step: per-layer formats among candidates under a size / quality budget."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from nnsqueeze.context import Context
from nnsqueeze.errors import RecipeError
from nnsqueeze.registry import STEPS
from nnsqueeze.steps.mixed_precision import MixedPrecision, format_bytes


def run(model, data, **cfg):
    ctx = Context(calib_data=data["calib"], progress=False)
    ctx.report.begin_step("mixed", {})
    step = MixedPrecision(MixedPrecision.Config.model_validate(cfg))
    return step.run(model, ctx), step, ctx


def test_size_budget_is_met_with_mixed_formats(tiny_cnn, toy_data):
    fp32 = sum(p.numel() for p in tiny_cnn.parameters()) * 4
    fresh, ref_model = copy.deepcopy(tiny_cnn), copy.deepcopy(tiny_cnn)
    model, step, ctx = run(tiny_cnn, toy_data, formats=["int8", "int4", "fp32"], budget={"size_ratio": 0.2})
    figs = ctx.report.steps[0]["figures"]
    alloc = figs["formats"]
    assert figs["budget_met"] and figs["size_bytes_estimate"] <= 0.2 * fp32
    assert set(alloc.values()) <= {"int8", "int4", "fp32"} and "int4" in alloc.values()
    # estimate == the sum of per-layer packed sizes + other params; each layer's format is reported
    for name, f in alloc.items():
        if f != "fp32":
            assert ctx.report.layers[name]["format"] == f
            assert model.get_submodule(name).weight_bits in ({4} if f == "int4" else {7, 8})
    # the biggest layer (classifier.1, 2717 weights) is the one worth lowering first
    assert alloc["classifier.1"] == "int4"
    # record -> rebuild reproduces the structure
    rebuilt = STEPS.get("mixed").rebuild(fresh, step.config, json.loads(json.dumps(step.record())))
    rebuilt.load_state_dict(model.state_dict())
    x = toy_data["eval"][0][0]
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), model(x))
        assert (model(x).argmax(1) == ref_model(x).argmax(1)).float().mean() >= 0.9


def test_quality_budget_keeps_lowering_only_while_it_holds(tiny_cnn, toy_data):
    _, _, ctx = run(tiny_cnn, toy_data, formats=["fp32", "int8", "int2"], budget={"min_sqnr_db": 25})
    figs = ctx.report.steps[0]["figures"]
    assert figs["budget_met"] and figs["output_sqnr_db"] >= 25
    assert "int8" in figs["formats"].values()


def test_format_bytes_and_bad_configs(tiny_cnn):
    lin = tiny_cnn.classifier[1]
    n = lin.weight.numel()
    assert format_bytes(lin, "fp32") == 4 * (n + 11)
    assert format_bytes(lin, "int8") == n + 4 * 11 + 4 * 11
    assert format_bytes(lin, "int4") == (n + 1) // 2 + 4 * 11 + 4 * 11
    with pytest.raises(RecipeError, match="unknown formats"):
        MixedPrecision(MixedPrecision.Config.model_validate({"formats": ["int9"]}))



@pytest.mark.parametrize("budget_ms,met", [(1e4, True), (1e-6, False)])
def test_latency_budget_is_measured_in_ort(tiny_cnn, toy_data, budget_ms, met):
    _, _, ctx = run(tiny_cnn, toy_data, formats=["fp32", "int8"],
                    budget={"latency_ms": budget_ms, "latency_runs": 3})
    figs = ctx.report.steps[0]["figures"]
    assert figs["latency_ms"] > 0 and figs["budget_met"] is met
    if met:  # already fast enough: nothing lowered
        assert set(figs.get("formats", {}).values()) == {"fp32"}
    else:  # everything lowered to the cheapest format, and the miss is noted
        assert set(figs["formats"].values()) == {"int8"}
        assert any("latency budget" in n["note"] for n in ctx.report.notes)
