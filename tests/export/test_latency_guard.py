"""Never slower: the latency guard's decision logic on injected timings, the pipeline applying it
(timings injected, so deterministic), and one measured run on a model whose int8 layers are tiny."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nnsqueeze as nsq
from nnsqueeze import artifact
from nnsqueeze.export import ort as ort_mod
from nnsqueeze.export.latency_guard import Candidate, choose, keeps_accuracy, slower_layers
from nnsqueeze.export.ort import OrtModule
from nnsqueeze.quant.dynamic import DynamicQuantLinear


def test_choose_fastest_that_keeps_accuracy():
    c = [Candidate("compressed", 3.0, 0.80), Candidate("slow layers in float", 2.0, 0.7995),
         Candidate("all quantized layers in float", 1.0, 0.70), Candidate("baseline", 2.5, 0.81)]
    assert choose(c, 0.80).name == "slow layers in float"  # 0.7995 is within 0.1% of 0.80; 0.70 is not
    assert choose(c, None).name == "all quantized layers in float"  # no metric: every candidate keeps it
    assert choose([Candidate("compressed", 1.0, 0.5), Candidate("baseline", 1.0, 0.9)], 0.5).name == "compressed"
    assert keeps_accuracy(0.999, 1.0) and not keeps_accuracy(0.998, 1.0) and keeps_accuracy(None, 1.0)
    assert slower_layers({"a": (2.0, 1.0), "b": (1.0, 2.0), "c": (1.0, 1.0)}) == ["a"]


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()


def _data(n=2, b=16):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.randn(b, 6, generator=g)
        out.append((x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()))
    return out


FAST = {"evaluate": {"warmup": 1, "runs": 3, "per_step": False}}


def _fake_ort_latency(int8_ms: float, float_ms: float):
    """ORT latency by graph content: graphs with run-time int8 quantization take ``int8_ms``."""
    import onnx

    def fake(path, inputs, threads=None, warmup=5, runs=20):
        proto = onnx.load_from_string(path) if isinstance(path, (bytes, bytearray)) else onnx.load(str(path))
        return int8_ms if any(n.op_type == "DynamicQuantizeLinear" for n in proto.graph.node) else float_ms
    return fake


def test_guard_applies_float_layers_when_int8_is_slower(monkeypatch, tmp_path):
    monkeypatch.setattr(ort_mod, "ort_latency_ms", _fake_ort_latency(2.0, 1.0))
    model, data = _mlp(), _data()
    res = nsq.compress(model, {"steps": [{"quantize-dynamic": {}}], "latency_guard": True, **FAST},
                       calib_data=data, eval_data=data, progress=False)
    g = res.report["export"]["latency_guard"]
    assert g["applied"] and g["chosen"] == "all quantized layers in float"  # ties with baseline: more compressed wins
    assert {r["name"] for r in g["candidates"]} == {"compressed", "all quantized layers in float", "baseline"}
    assert set(g["layer_ms"]) == {"0", "2"}
    assert not any(isinstance(m, DynamicQuantLinear) for m in res.model.modules())
    assert any(n["step"] == "latency-guard" and "applied" in n["note"] for n in res.report["notes"])
    x = data[0][0]
    # Reverted layers compute the original float function; the ONNX file is the float one.
    assert torch.allclose(res.model(x), model(x), atol=1e-6)
    assert torch.allclose(OrtModule(res.onnx)(x), model(x), atol=1e-5)
    out = res.save(tmp_path / "art")
    again = artifact.load(out, _mlp())
    assert torch.allclose(again(x), res.model(x), atol=1e-6)


def test_guard_only_offers_when_disabled(monkeypatch):
    monkeypatch.setattr(ort_mod, "ort_latency_ms", _fake_ort_latency(2.0, 1.0))
    res = nsq.compress(_mlp(), {"steps": [{"quantize-dynamic": {}}], **FAST}, calib_data=_data(),
                       eval_data=_data(), progress=False)
    assert "latency_guard" not in res.report["export"]  # nothing measured or applied unless asked
    assert any(n["step"] == "latency-guard" and "latency_guard: true" in n["note"] for n in res.report["notes"])
    assert sum(isinstance(m, DynamicQuantLinear) for m in res.model.modules()) == 2


def test_guard_keeps_a_faster_compressed_model(monkeypatch):
    monkeypatch.setattr(ort_mod, "ort_latency_ms", _fake_ort_latency(0.5, 1.0))
    res = nsq.compress(_mlp(), {"steps": [{"quantize-dynamic": {}}], "latency_guard": True, **FAST},
                       calib_data=_data(), progress=False)
    assert "latency_guard" not in res.report["export"]
    assert sum(isinstance(m, DynamicQuantLinear) for m in res.model.modules()) == 2


def test_guard_measured_on_tiny_layers():
    """Real ORT timings: 6->5->3 layers at batch 16, where run-time quantization costs more than the
    matmul it speeds up. Timing decides which branch runs, so the test checks the decision is
    consistent with what was measured, whatever it was."""
    model, data = _mlp(), _data()
    res = nsq.compress(model, {"steps": [{"quantize-dynamic": {}}], "latency_guard": True, **FAST},
                       calib_data=data, eval_data=data, progress=False)
    b = res.report["baseline"]["latency_ms"]["onnxruntime"]
    g = res.report["export"].get("latency_guard")
    if g is None:  # the compressed graph was not slower
        assert res.report["compressed"]["latency_ms"]["onnxruntime"] <= b
        return
    assert g["compressed_ms"] > g["baseline_ms"] == b
    rows = g["candidates"]
    ok = [r for r in rows if keeps_accuracy(r["metric"], rows[0]["metric"])]
    assert g["chosen"] == min(ok, key=lambda r: r["latency_ms"])["name"]
    assert all(q > 0 and f > 0 for q, f in ((v["quantized"], v["float"]) for v in g["layer_ms"].values()))
    x = data[0][0]
    assert torch.allclose(OrtModule(res.onnx)(x), res.model(x), atol=1e-2)


@pytest.mark.parametrize("smooth", [False, True])
def test_dynamic_layer_reverts_to_the_same_float_function(smooth):
    from nnsqueeze.quant.dynamic import convert_dynamic_

    torch.manual_seed(0)
    layer = nn.Linear(7, 4)
    x = torch.randn(3, 7)
    ref = layer(x)
    s = torch.rand(7, dtype=torch.float64) * 3 + 0.1 if smooth else None
    q = convert_dynamic_(layer, smooth=s)
    q.revert_()
    assert type(q) is nn.Linear and not list(q.buffers())
    assert torch.allclose(q(x), ref, atol=1e-6)
