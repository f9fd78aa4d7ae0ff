"""fp16 / bf16 as candidate formats of the ``mixed`` step: exact allocation, export, reload, errors.

The 3-layer MLP below makes fc1 the layer int8 hurts most: fc0's output channel 0 is scaled up 200x
and fc1's matching input column down 200x (ReLU between: the fp32 function is unchanged), so fc1's
per-tensor uint8 input quantizer spends its range on one channel. In fp16 that channel is harmless.

Bytes per format (format_bytes): fc0 Linear(12, 32): fp32 1664, fp16 832, int8 640; fc1 Linear(32, 32):
fp32 4224, fp16 2112, int8 1280; fc2 Linear(32, 4): fp32 528, fp16 264, int8 160. All int8: 2080 bytes,
all fp16: 3208; fc1 fp16 and the rest int8: 2912, so a 2950-byte budget fits fc1 alone in fp16.
"""

from __future__ import annotations

import copy
import itertools
import json
import random

import pytest
import torch
from torch import nn

import nnsqueeze as nsq
from nnsqueeze.context import Context
from nnsqueeze.errors import RecipeError
from nnsqueeze.registry import STEPS
from nnsqueeze.sensitivity import resolve_reduce_range, half_copy, output_sqnr, quantize_copy
from nnsqueeze.steps.mixed_precision import MixedPrecision, cheapest_allocation, format_bytes

BUDGET = 2950
NAMES = ("fc0", "fc1", "fc2")


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc0 = nn.Linear(12, 32)
        self.fc1 = nn.Linear(32, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.fc0(x)))))


def build():
    torch.manual_seed(0)
    m = Mlp()
    with torch.no_grad():
        m.fc0.weight[0] *= 200.0
        m.fc0.bias[0] = m.fc0.bias[0].abs() * 200.0
        m.fc1.weight[:, 0] /= 200.0
        m.fc1.weight.mul_(3.0)
    return m.eval()


def calib():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 12, generator=g), torch.zeros(32, dtype=torch.long)) for _ in range(2)]


def reference(model, alloc, data):
    """Independent build of an allocation: half_copy (the half step's conversion) then quantize_copy."""
    half = {n: {"fp16": "float16", "bf16": "bfloat16"}[f] for n, f in alloc.items() if f in ("fp16", "bf16")}
    m = model
    for dtype in set(half.values()):
        m = half_copy(m, [n for n, d in half.items() if d == dtype], dtype)
    ints = [n for n, f in alloc.items() if f == "int8"]
    if not ints:
        return copy.deepcopy(m).eval()
    w = resolve_reduce_range({"bits": 8, "reduce_range": "auto"})
    return quantize_copy(m, data, targets=ints, ignore=[n for n in alloc if n not in ints], weights=w)


def run(model, data, **cfg):
    ctx = Context(calib_data=data, progress=False)
    ctx.report.begin_step("mixed", {})
    step = MixedPrecision(MixedPrecision.Config.model_validate(cfg))
    return step.run(model, ctx), step, ctx


def test_bytes_of_half_formats():
    m = build()
    assert [format_bytes(getattr(m, n), "fp16") for n in NAMES] == [832, 2112, 264]
    assert [format_bytes(getattr(m, n), "bf16") for n in NAMES] == [832, 2112, 264]
    assert [format_bytes(getattr(m, n), "int8") for n in NAMES] == [640, 1280, 160]


def test_size_budget_puts_the_int8_sensitive_layer_in_fp16_as_brute_force_does():
    data = calib()
    base = build()
    model, step, ctx = run(build(), data, formats=["int8", "fp16", "fp32"], budget={"size_bytes": BUDGET})
    figs = ctx.report.steps[0]["figures"]
    alloc = figs["formats"]
    # brute force over all 27 assignments: bytes and the WHOLE model's measured output SQNR
    trials = {}
    for fmts in itertools.product(["int8", "fp16", "fp32"], repeat=3):
        a = dict(zip(NAMES, fmts))
        nbytes = sum(format_bytes(getattr(base, n), f) for n, f in a.items())
        if nbytes <= BUDGET:
            trials[fmts] = output_sqnr(base, reference(base, a, data), data)
    best = max(trials, key=trials.get)
    print({k: round(v, 1) for k, v in sorted(trials.items(), key=lambda kv: -kv[1])})
    assert dict(zip(NAMES, best)) == alloc == {"fc0": "int8", "fc1": "fp16", "fc2": "int8"}
    assert figs["allocator"] == "exact" and figs["size_bytes_estimate"] == 2912 <= BUDGET
    # fc1 is the layer int8 hurts most: all-int8 (which fits) is far worse than the choice
    assert trials[("int8", "int8", "int8")] < trials[best] - 20
    # the step's model is exactly the half conversion + quantize step of that allocation
    x = torch.randn(17, 12, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(model(x), reference(base, alloc, data)(x))
    assert model.fc1.weight.dtype == torch.float16 and type(model.fc0).__name__.startswith("Quant")
    # each layer's format and the figures that chose it
    lay = ctx.report.layers
    assert lay["fc1"]["format"] == "fp16" and lay["fc1"]["bytes_estimate"] == 2112 and lay["fc1"]["bits"] == 16
    assert lay["fc0"]["format"] == "int8" and set(lay["fc1"]["candidates"]) == {"int8", "fp16", "fp32"}
    assert lay["fc1"]["candidates"]["int8"]["sqnr_db_alone"] < lay["fc0"]["candidates"]["int8"]["sqnr_db_alone"]
    # record -> rebuild on a fresh model reproduces the structure and outputs
    rebuilt = STEPS.get("mixed").rebuild(Mlp(), step.config, json.loads(json.dumps(step.record())))
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), model(x))


def test_exact_allocator_matches_brute_force():
    rng = random.Random(0)
    for _ in range(30):
        opts = {}
        for i in range(rng.randint(1, 5)):
            fmts = rng.sample(["fp32", "fp16", "int8", "int4"], rng.randint(1, 4))
            opts[f"l{i}"] = [(f, rng.randint(1, 60), rng.choice([0.0, rng.random(), float("inf")])) for f in fmts]
        limit = rng.randint(1, 200)
        combos = [c for c in itertools.product(*opts.values()) if sum(o[1] for o in c) <= limit]
        got = cheapest_allocation(opts, limit)
        if not combos:
            assert got == {}
            continue
        best = min(sum(o[2] for o in c) for c in combos)
        chosen = [next(o for o in opts[n] if o[0] == f) for n, f in got.items()]
        assert sum(o[1] for o in chosen) <= limit and sum(o[2] for o in chosen) == best


@pytest.mark.parametrize("half", ["fp16", "bf16"])
def test_pipeline_exports_verifies_and_reloads(half, tmp_path):
    data = calib()
    recipe = {"version": 1, "steps": [{"mixed": {"formats": ["int4", "int8", half, "fp32"],
                                                 "budget": {"size_bytes": BUDGET}}}],
              "evaluate": {"warmup": 0, "runs": 1, "threads": 1, "per_step": False}}
    res = nsq.compress(build(), recipe, calib_data=data, metric=None, progress=False)
    alloc = res.report["steps"][0]["figures"]["formats"]
    assert alloc["fc1"] == half and set(alloc.values()) <= {"int4", "int8", half, "fp32"}
    exp = res.report["export"]["compressed"]
    assert exp["max_abs_diff"] <= exp["tolerance"]
    res.save(tmp_path / "art")
    loaded = nsq.load(tmp_path / "art", Mlp())
    x = torch.randn(9, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), res.model.eval()(x))
    assert loaded.fc1.weight.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[half]


def test_unreachable_size_budget_names_budget_and_smallest_figure():
    with pytest.raises(RecipeError, match=r"budget.size_bytes: size budget 2000 bytes .* smallest achievable is "
                                          r"2080 bytes"):
        run(build(), calib(), formats=["int8", "fp16"], budget={"size_bytes": 2000})


def test_latency_budget_lowers_to_half_when_unmeetable():
    _, _, ctx = run(build(), calib(), formats=["fp32", "fp16"], budget={"latency_ms": 1e-6, "latency_runs": 3})
    figs = ctx.report.steps[0]["figures"]
    assert figs["formats"] == {n: "fp16" for n in NAMES} and not figs["budget_met"] and figs["latency_ms"] > 0
    assert any("latency budget" in n["note"] for n in ctx.report.notes)


def test_greedy_fallback_for_huge_fronts_still_meets_the_size_budget(monkeypatch):
    import nnsqueeze.steps.mixed_precision as mp

    assert cheapest_allocation({"a": [("x", 1, 1.0), ("y", 2, 0.0)], "b": [("x", 1, 0.0), ("y", 2, 1.0)]},
                               10, max_states=1) is None
    monkeypatch.setattr(mp, "cheapest_allocation", lambda *a, **k: None)
    _, _, ctx = run(build(), calib(), formats=["int8", "fp16", "fp32"], budget={"size_bytes": BUDGET})
    figs = ctx.report.steps[0]["figures"]
    print(figs["formats"], figs["size_bytes_estimate"])
    assert figs["allocator"] == "greedy" and figs["size_bytes_estimate"] <= BUDGET
