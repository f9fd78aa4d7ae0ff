"""The ``mixed`` step's ``search: raise`` and the two settings that now map onto it: ``mixed-int8``
(formats [int8, fp32]) and ``half``'s ``keep_fp32`` (formats [fp16 or bf16, fp32]).

The models are the shared sensitive nets: in tests/sensitive_net.py only fc2 breaks in int8, in
tests/half_sensitive_net.py only fc1 breaks in fp16/bf16. Each alias must give exactly (torch.equal)
the model that the ``mixed`` recipe it maps onto gives.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from pydantic import ValidationError

import half_sensitive_net as hnet  # tests/ is on sys.path
import sensitive_net as snet
from nnsqueeze.context import Context
from nnsqueeze.errors import RecipeError
from nnsqueeze.metrics import accuracy
from nnsqueeze.registry import STEPS
from nnsqueeze.steps.mixed import MixedInt8, int8_weight_bytes
from nnsqueeze.steps.mixed_precision import MixedPrecision, Quality, format_bytes, raise_until

INT8 = ("conv1", "conv2", "fc1", "fc2")


def _run(step_name, cfg, model, data, metric=True):
    ctx = Context(calib_data=data["calib"], eval_data=data["eval"] if metric else None,
                  metric=accuracy if metric else None, progress=False)
    ctx.report.begin_step(step_name, {})
    cls = STEPS.get(step_name)
    step = cls(cls.Config.model_validate(cfg))
    model = step.run(model, ctx)
    return model, step, ctx, ctx.report.steps[0]["figures"]


@pytest.mark.parametrize("metric", [True, False])
def test_mixed_int8_is_mixed_with_search_raise(metric):
    d = snet.data()
    budget = {"max_metric_drop": 0.05, "min_sqnr_db": 30.0}
    old, _, _, ofigs = _run("mixed-int8", budget, snet.build(), d, metric)
    new, step, ctx, figs = _run("mixed", {"formats": ["int8", "fp32"], "search": "raise", "budget": budget},
                                snet.build(), d, metric)
    assert figs["formats"] == {n: ("fp32" if n == "fc2" else "int8") for n in INT8}
    assert figs["raised"] == ofigs["kept_layers"] == ["fc2"] and figs["allocator"] == "raise"
    assert figs["budget_met"] and ofigs["budget_met"] and figs["trials"] == ofigs["trials"] == 2
    key = "metric_drop" if metric else "output_sqnr_db"
    assert figs[key] == ofigs[key]
    x = d["eval"][0][0]
    with torch.no_grad():
        assert torch.equal(new(x), old(x))
    # the mixed record rebuilds the same model on a fresh instance
    fresh = STEPS.get("mixed").rebuild(snet.Net(), step.config, json.loads(json.dumps(step.record())))
    fresh.load_state_dict(new.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), new(x))


def test_mixed_int8_config_maps_onto_mixed():
    cfg = MixedInt8(MixedInt8.Config.model_validate(
        {"max_metric_drop": 0.02, "max_size_ratio": 0.5, "ignore": ["fc1"]})).mixed_config()
    assert (cfg.formats, cfg.search, cfg.ignore) == (["int8", "fp32"], "raise", ["fc1"])
    assert (cfg.budget.max_metric_drop, cfg.budget.min_sqnr_db, cfg.budget.size_ratio) == (0.02, 30.0, 0.5)
    # its size estimate: 1 byte per int8 weight and fp32 biases, no scales (mixed's counts the scales)
    fc2 = snet.build().fc2  # Linear(16, 4): 64 weights, 4 biases
    assert int8_weight_bytes(fc2, "int8") == 64 + 16 and int8_weight_bytes(fc2, "fp32") == 4 * 68
    assert format_bytes(fc2, "int8") == 64 + 16 + 16


@pytest.mark.parametrize("half,dtype", [("fp16", "float16"), ("bf16", "bfloat16")])
def test_keep_fp32_is_mixed_with_half_formats_and_search_raise(half, dtype):
    d = hnet.data()
    old, hstep, _, _ = _run("half", {"dtype": dtype, "keep_fp32": {"min_sqnr_db": 30}}, hnet.build(), d, False)
    new, _, _, figs = _run("mixed", {"formats": [half, "fp32"], "search": "raise", "budget": {"min_sqnr_db": 30}},
                           hnet.build(), d, False)
    assert figs["formats"] == {"fc0": half, "fc1": "fp32", "fc2": half} and figs["raised"] == ["fc1"]
    assert hstep.record()["kept_fp32"] == ["fc1"] and figs["output_sqnr_db"] > 30
    x = d["eval"][0][0]
    with torch.no_grad():
        assert torch.equal(new(x), old(x)) and torch.isfinite(new(x)).all()


def test_min_raised_raises_that_many_whatever_the_figures():
    d = hnet.data()
    _, hstep, _, _ = _run("half", {"dtype": "float16", "keep_fp32": {"most_sensitive": 2}}, hnet.build(), d, False)
    _, _, _, figs = _run("mixed", {"formats": ["fp16", "fp32"], "search": "raise", "min_raised": 2},
                         hnet.build(), d, False)
    assert figs["raised"] == hstep.record()["kept_fp32"] and len(figs["raised"]) == 2 and figs["trials"] == 1
    assert figs["raised"][0] == "fc1" and figs["budget_met"]


def test_size_budget_caps_how_many_are_raised():
    d = snet.data()
    m = snet.build()
    all_int8 = sum(p.numel() * 4 for p in m.parameters()) - sum(
        format_bytes(getattr(m, n), "fp32") - format_bytes(getattr(m, n), "int8") for n in INT8)
    # room for every layer in int8 but not for fc2 (the one the metric wants raised) in fp32
    _, _, ctx, figs = _run("mixed", {"formats": ["int8", "fp32"], "search": "raise",
                                     "budget": {"max_metric_drop": 0.0, "size_bytes": all_int8 + 100}}, m, d)
    assert figs["raised"] == [] and figs["size_bytes_estimate"] == all_int8 and not figs["budget_met"]
    assert figs["metric_drop"] > 0
    # below every layer at its cheapest format: the same RecipeError as search: lower
    with pytest.raises(RecipeError, match=r"budget.size_bytes: size budget .* smallest achievable is "
                                          f"{all_int8} bytes"):
        _run("mixed", {"formats": ["int8", "fp32"], "search": "raise", "budget": {"size_bytes": all_int8 - 1}},
             snet.build(), d)


def test_raise_until_measures_only_what_it_needs():
    seen = []

    def measure(k):
        seen.append(k)
        return {"output_sqnr_db": 10.0 * k, "metric_drop": 1.0 / (k + 1)}

    assert raise_until(Quality(min_sqnr_db=30.0), measure, 2, 5) == (3, {"output_sqnr_db": 30.0, "metric_drop": 0.25},
                                                                      True)
    assert seen == [2, 3]
    seen.clear()  # both bounds must hold: SQNR >= 30 at k >= 3, drop <= 0.2 at k >= 4
    k, fig, met = raise_until(Quality(max_metric_drop=0.2, min_sqnr_db=30.0), measure, 0, 5)
    assert (k, met, seen) == (4, True, [0, 1, 2, 3, 4])
    seen.clear()  # never met: the most allowed, and it says so
    k, fig, met = raise_until(Quality(min_sqnr_db=math.inf), measure, 1, 3)
    assert (k, met, seen) == (3, False, [1, 2, 3])


def test_bad_raise_configs():
    with pytest.raises(RecipeError, match="latency budget needs search: lower"):
        MixedPrecision(MixedPrecision.Config.model_validate({"search": "raise", "budget": {"latency_ms": 5}}))
    with pytest.raises(ValidationError):
        MixedPrecision.Config.model_validate({"search": "up"})
    with pytest.raises(ValidationError):
        MixedPrecision.Config.model_validate({"min_raised": -1})
