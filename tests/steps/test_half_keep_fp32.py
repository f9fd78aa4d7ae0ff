"""``half`` with ``keep_fp32``: the layers sensitivity ranks worst in fp16/bf16 stay fp32.

The model (tests/half_sensitive_net.py) is built so that fc1 alone breaks in half precision (a
7e4 offset: fp16 overflow, bf16 rounds the signal away), so the option must keep exactly fc1.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import half_sensitive_net as net  # tests/ is on sys.path
import nnsqueeze as nsq
from nnsqueeze.context import Context
from nnsqueeze.errors import DataError, RecipeError
from nnsqueeze.metrics import get_metric
from nnsqueeze.quant.half import HalfMixin
from nnsqueeze.registry import STEPS
from nnsqueeze.sensitivity import sensitivity
from nnsqueeze.steps.half import Half

FAST = {"evaluate": {"runs": 3, "warmup": 1}}


def _run(model, cfg, calib=True, eval_=True):
    d = net.data()
    ctx = Context(calib_data=d["calib"] if calib else None, eval_data=d["eval"] if eval_ else None,
                  metric=get_metric("accuracy")[0] if eval_ else None, progress=False)
    ctx.report.begin_step("half", {})
    step = Half(Half.Config.model_validate(cfg))
    return step.run(model, ctx), step, ctx


def test_without_keep_fp32_the_model_really_breaks():
    model = net.build()
    x = net.data()["eval"][0][0]
    _run(model, {"dtype": "float16"}, calib=False, eval_=False)
    with torch.no_grad():
        assert torch.isnan(model(x)).all()  # fc1's 7e4 offset overflows fp16


@pytest.mark.parametrize("dtype,fmt", [("float16", "fp16"), ("bfloat16", "bf16")])
@pytest.mark.parametrize("keep", [{"most_sensitive": 1}, {"max_metric_drop": 0.02}, {"min_sqnr_db": 30}])
def test_keeps_exactly_the_sensitive_layer(dtype, fmt, keep):
    model = net.build()
    eval_ = "max_metric_drop" in keep or "most_sensitive" in keep
    model, step, ctx = _run(model, {"dtype": dtype, "keep_fp32": keep}, eval_=eval_)
    assert step.record()["layers"] == ["fc0", "fc2"] and step.record()["kept_fp32"] == ["fc1"]
    assert not isinstance(model.fc1, HalfMixin) and model.fc1.weight.dtype == torch.float32
    assert model.fc0.weight.dtype == model.fc2.weight.dtype == getattr(torch, dtype)
    # the report lists fc1 with the figure sensitivity measured for it alone
    skipped = [s for s in ctx.report.skipped if s["step"] == "half"]
    assert [s["layer"] for s in skipped] == ["fc1"]
    d = net.data()
    row = sensitivity(net.build(), d["calib"], eval_data=d["eval"] if eval_ else None,
                      metric="accuracy" if eval_ else None, formats=[fmt], targets=["fc1"])[0]
    if eval_:
        assert f"metric drop {row['metric_drop']:+.4f}" in skipped[0]["reason"]
    assert f"output SQNR {row['sqnr_db']:.1f} dB" in skipped[0]["reason"]
    figs = ctx.report.steps[0]["figures"]
    assert figs["kept_fp32"] == ["fc1"] and figs["whole_model_output_sqnr_db"] > 30
    if "max_metric_drop" in keep:
        assert 0 <= figs["whole_model_metric_drop"] <= 0.02


def test_budget_already_met_keeps_nothing_and_impossible_keeps_all():
    benign = net.build()
    with torch.no_grad():
        benign.fc1.bias.sub_(net.OFFSET)  # no offset: every layer is fine in fp16
    _, step, ctx = _run(benign, {"dtype": "float16", "keep_fp32": {"min_sqnr_db": 30}}, eval_=False)
    assert "kept_fp32" not in step.record() and step.record()["layers"] == ["fc0", "fc1", "fc2"]
    assert not [s for s in ctx.report.skipped if s["step"] == "half"]
    # inf SQNR is reachable only with every layer kept: then nothing is half and the step says so
    with pytest.raises(nsq.ModelError, match="every layer had to stay fp32"):
        _run(net.build(), {"dtype": "float16", "keep_fp32": {"min_sqnr_db": 1e9}}, eval_=False)


def test_missing_data_and_bad_configs():
    with pytest.raises(DataError, match="calibration"):
        _run(net.build(), {"keep_fp32": {"most_sensitive": 1}}, calib=False, eval_=False)
    with pytest.raises(DataError, match="eval data and a metric"):
        _run(net.build(), {"keep_fp32": {"max_metric_drop": 0.01}}, eval_=False)
    with pytest.raises(RecipeError):
        nsq.load_recipe([{"half": {"keep_fp32": {}}}])
    with pytest.raises(RecipeError):
        nsq.load_recipe([{"half": {"keep_fp32": {"most_sensitive": 0}}}])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_pipeline_export_ort_parity_and_reload(tmp_path, dtype):
    d = net.data()
    recipe = {"steps": [{"half": {"dtype": dtype, "keep_fp32": {"max_metric_drop": 0.02}}}], **FAST}
    result = nsq.compress(net.build(), recipe, calib_data=d["calib"], eval_data=d["eval"], progress=False)
    r = result.report
    assert [s["layer"] for s in r["skipped"] if s["step"] == "half"] == ["fc1"]
    assert r["compressed"]["accuracy"] >= r["baseline"]["accuracy"] - 0.02
    exp = r["export"]["compressed"]
    x = d["eval"][0][0]
    with torch.no_grad():
        y = result.model(x)
    assert torch.isfinite(y).all()
    # ONNX Runtime agrees with the torch model (relative to the logits' scale)
    assert exp["max_abs_diff"] <= 1e-2 * float(y.abs().max()) and exp["top1_agreement"] == 1.0
    out = result.save(tmp_path / "art")
    assert json.loads((out / "nnsqueeze.json").read_text())["steps"][0]["record"]["kept_fp32"] == ["fc1"]
    restored = nsq.load(out, model=net.build())
    assert not isinstance(restored.fc1, HalfMixin) and isinstance(restored.fc0, HalfMixin)
    assert torch.equal(restored(x), y)


def test_rebuild_ignores_kept_layers():
    model, step, _ = _run(net.build(), {"dtype": "float16", "keep_fp32": {"most_sensitive": 1}})
    fresh = STEPS.get("half").rebuild(net.build(), step.config, json.loads(json.dumps(step.record())))
    assert [type(m).__name__ for m in (fresh.fc0, fresh.fc1, fresh.fc2)] == ["HalfLinear", "Linear", "HalfLinear"]
    with torch.no_grad():
        assert math.isfinite(float(copy.deepcopy(fresh)(torch.randn(2, 12)).sum()))
