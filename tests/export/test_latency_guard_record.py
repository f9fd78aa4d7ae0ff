"""The latency guard as a record: it appends a ``revert`` record (what went back to float, and the
measured latencies why) that ``nsq.load`` replays after the steps' records, and never edits them.
Timings are injected, so the guard's decision is deterministic."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import nnsqueeze as nsq
from nnsqueeze import artifact
from nnsqueeze.errors import ArtifactError
from nnsqueeze.export import latency_guard as lg
from nnsqueeze.export import ort as ort_mod
from nnsqueeze.plot import weight_histograms
from nnsqueeze.quant.dynamic import DynamicQuantLinear

FAST = {"evaluate": {"warmup": 1, "runs": 3, "per_step": False}}
RECIPE = {"steps": [{"quantize-dynamic": {}}], "latency_guard": True, **FAST}


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()


def _data(n=2, b=16):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(b, 6, generator=g), torch.zeros(b, dtype=torch.long)) for _ in range(n)]


def _latency_by_int8_layers(path, inputs, threads=None, warmup=5, runs=20, budget_s=None, with_runs=False):
    """Whole-model ORT latency by graph content: both layers int8 3.0 ms, one 0.9 ms, none 1.0 ms."""
    import onnx

    proto = onnx.load(str(path))
    ms = {2: 3.0, 1: 0.9, 0: 1.0}[sum(n.op_type == "DynamicQuantizeLinear" for n in proto.graph.node)]
    return (ms, runs) if with_runs else ms


def _fixed_latency(pick):
    """An ORT latency of ``pick(path)`` ms, in the shape the caller asks for."""
    return lambda path, *a, with_runs=False, **k: (pick(path), 20) if with_runs else pick(path)


@pytest.fixture
def guarded(monkeypatch):
    """A guarded run where layer "0" alone is slower in int8: the guard puts only it back to float."""
    monkeypatch.setattr(ort_mod, "ort_latency_ms", _latency_by_int8_layers)
    monkeypatch.setattr(lg, "layer_timings", lambda model, *a, **k: {"0": (2.0, 1.0), "2": (0.5, 1.0)})
    model = _mlp()
    # no eval data: no metric, so every candidate keeps it and the fastest (0.9 ms) is chosen
    res = nsq.compress(model, RECIPE, calib_data=_data(), progress=False)
    return model, res


def test_guard_appends_a_revert_record_and_leaves_the_step_record(guarded, monkeypatch):
    _, res = guarded
    assert res.report["export"]["latency_guard"]["chosen"] == "slow layers in float"
    (step, rev) = res.records
    # the step's record is exactly what the same step records without a guard
    monkeypatch.setattr(ort_mod, "ort_latency_ms", _fixed_latency(lambda path: 1.0))
    plain = nsq.compress(_mlp(), {**RECIPE, "latency_guard": False}, calib_data=_data(), progress=False)
    assert plain.records == [step] and sorted(step["record"]["layers"]) == ["0", "2"]
    assert rev["name"] == "revert" and rev["config"] == {}
    r = rev["record"]
    assert r["by"] == "latency-guard" and r["candidate"] == "slow layers in float"
    assert r["reverted"] == {"layers": ["0"], "ops": []}
    assert r["latency_ms"] == {"baseline": 1.0, "compressed": 3.0, "chosen": 0.9}
    assert r["layer_ms"] == {"0": {"quantized": 2.0, "float": 1.0}}
    assert type(res.model[0]) is nn.Linear and isinstance(res.model[2], DynamicQuantLinear)


def test_saved_manifest_holds_the_revert_record_and_reload_is_exact(guarded, tmp_path):
    model, res = guarded
    out = res.save(tmp_path / "art")
    manifest = json.loads((out / artifact.MANIFEST).read_text())
    assert manifest["format_version"] == 2  # older nnsqueeze refuses it as "newer", not as an unknown step
    assert manifest["steps"] == json.loads(json.dumps(res.records))
    again = artifact.load(out, _mlp())
    assert type(again[0]) is nn.Linear and isinstance(again[2], DynamicQuantLinear)
    sd, ref = again.state_dict(), res.model.state_dict()
    assert sd.keys() == ref.keys()
    # the float layer comes back bit for bit; the int8 one as its codes (its float weight is not stored)
    assert all(torch.equal(sd[k], ref[k]) for k in ref if not k.startswith("2.weight"))
    assert torch.equal(again[2].weight_codes(), res.model[2].weight_codes())
    g = torch.Generator().manual_seed(7)
    for x in (torch.randn(5, 6, generator=g), torch.randn(33, 6, generator=g) * 10):
        with torch.no_grad():
            assert torch.equal(again(x), res.model(x))
    assert set(weight_histograms(out)) == {"2"}  # the float layer is not plotted as int8


def test_artifact_of_the_older_form_still_loads(guarded, tmp_path):
    """Before the revert record, the guard edited the steps' records in place (format version 1)."""
    _, res = guarded
    out = res.save(tmp_path / "art")
    manifest = json.loads((out / artifact.MANIFEST).read_text())
    *steps, rev = manifest["steps"]
    old = {**manifest, "format_version": 1,
           "steps": lg.drop_reverted(copy.deepcopy(steps), set(rev["record"]["reverted"]["layers"]))}
    assert list(old["steps"][0]["record"]["layers"]) == ["2"]
    (out / artifact.MANIFEST).write_text(json.dumps(old))
    again = artifact.load(out, _mlp())
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(again(x), res.model(x))


def test_a_bad_revert_record_is_an_artifact_error(guarded, tmp_path):
    _, res = guarded
    out = res.save(tmp_path / "art")
    manifest = json.loads((out / artifact.MANIFEST).read_text())
    for bad, says in (({"layers": ["nope"]}, "cannot replay"), ({"layers": ["1"]}, "ReLU is not a quantized"),
                      ({"layers": "0"}, "list of module names"), ([], "must be a mapping")):
        manifest["steps"][-1]["record"]["reverted"] = bad
        (out / artifact.MANIFEST).write_text(json.dumps(manifest))
        with pytest.raises(ArtifactError, match=says):
            artifact.load(out, _mlp())


def test_fallback_to_the_baseline_keeps_no_step_record(monkeypatch, tmp_path):
    # Only the fp32 baseline graph is fast, so no partial configuration wins.
    monkeypatch.setattr(ort_mod, "ort_latency_ms",
                        _fixed_latency(lambda path: 1.0 if "baseline" in str(path) else 2.0))
    model = _mlp()
    res = nsq.compress(model, RECIPE, calib_data=_data(), progress=False)
    assert res.report["export"]["latency_guard"]["chosen"] == "baseline"
    ((rev),) = res.records
    assert rev["name"] == "revert" and rev["record"]["candidate"] == "baseline"
    assert rev["record"]["discarded_steps"] == ["quantize-dynamic"]
    assert rev["record"]["reverted"] == {"layers": [], "ops": []}
    again = artifact.load(res.save(tmp_path / "art"), _mlp())
    assert not any(isinstance(m, DynamicQuantLinear) for m in again.modules())
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_runner_imports_no_technique_internals():
    """pipeline.py reaches the guard through the GUARDS registry and the nnsqueeze.guard interface."""
    import inspect

    from nnsqueeze import pipeline

    src = inspect.getsource(pipeline)
    assert "latency_guard import" not in src and "quant." not in src and "_OpQuant" not in src
