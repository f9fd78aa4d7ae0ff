"""The mixed-int8 step: sensitivity-driven int8/fp32 quantization, record/rebuild, report."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

import nnsqueeze as nsq
from nnsqueeze.context import Context
from nnsqueeze.metrics import accuracy
from nnsqueeze.quant.modules import MODULE_MAP
from nnsqueeze.registry import STEPS
from nnsqueeze.steps.mixed import MixedInt8
from sensitive_net import Net, build, data


def is_quant(m):
    return type(m) not in MODULE_MAP and type(m).__name__.startswith("Quant")


def run_step(cfg, **ctx_kw):
    d = data()
    ctx = Context(calib_data=d["calib"], progress=False, **ctx_kw)
    ctx.report.begin_step("mixed-int8", {})
    step = MixedInt8(MixedInt8.Config.model_validate(cfg))
    return step.run(build(), ctx), step, ctx, d


def test_registered_and_config_is_strict():
    assert STEPS.get("mixed-int8") is MixedInt8
    with pytest.raises(ValidationError):
        MixedInt8.Config.model_validate({"max_drop": 0.1})
    with pytest.raises(ValidationError):
        MixedInt8.Config.model_validate({"max_size_ratio": 0})


def test_keeps_sensitive_layer_fp32_and_meets_budget():
    d = data()
    model, step, ctx, d = run_step({"max_metric_drop": 0.05}, eval_data=d["eval"], metric=accuracy)
    assert type(model.fc2) is nn.Linear and all(is_quant(getattr(model, n)) for n in ("conv1", "conv2", "fc1"))
    figs = ctx.report.steps[-1]["figures"]
    print("kept:", figs["kept_layers"], "metric drop:", figs["metric_drop"])
    assert figs["kept_layers"] == ["fc2"] and figs["budget_met"] and figs["sensitivity_mode"] == "metric"
    assert figs["metric_drop"] <= 0.05 and 1.0 - accuracy(model, d["eval"]) == pytest.approx(figs["metric_drop"])
    assert any(s["layer"] == "fc2" and s["reason"].startswith("kept fp32: sensitivity") for s in ctx.report.skipped)
    assert step.record()["ignore"] == ["fc2"] and "fc2" not in step.record()["quantize"]["layers"]


def test_falls_back_to_sqnr_without_eval_data():
    model, step, ctx, _ = run_step({"max_metric_drop": 0.01, "min_sqnr_db": 20.0})
    figs = ctx.report.steps[-1]["figures"]
    assert figs["sensitivity_mode"] == "sqnr" and figs["kept_layers"] == ["fc2"] and figs["output_sqnr_db"] >= 20
    assert any("SQNR" in n["note"] for n in ctx.report.notes)


def test_size_cap_limits_kept_layers():
    d = data()
    model, step, ctx, _ = run_step({"max_metric_drop": 0.0, "max_size_ratio": 0.27},
                                   eval_data=d["eval"], metric=accuracy)
    figs = ctx.report.steps[-1]["figures"]
    # all int8: 0.26 of the fp32 bytes; keeping fc2 fp32 would need 0.28
    assert figs["size_ratio_estimate"] <= 0.27 and figs["kept_layers"] == [] and not figs["budget_met"]
    assert figs["metric_drop"] > 0 and is_quant(model.fc2)
    assert any("budget is not met" in n["note"] for n in ctx.report.notes)


def test_save_and_load_reproduce_outputs(tmp_path):
    d = data()
    res = nsq.compress(build(), "mixed-int8", calib_data=d["calib"], eval_data=d["eval"], metric="accuracy",
                       progress=False)
    assert type(res.model.fc2) is nn.Linear and is_quant(res.model.fc1)
    res.save(tmp_path / "art")
    loaded = nsq.load(tmp_path / "art", Net())
    x = d["eval"][0][0]
    with torch.no_grad():
        assert torch.equal(res.model(x), loaded(x))
