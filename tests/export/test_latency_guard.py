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

    def fake(path, inputs, threads=None, warmup=5, runs=20, budget_s=None, with_runs=False):
        proto = onnx.load_from_string(path) if isinstance(path, (bytes, bytearray)) else onnx.load(str(path))
        ms = int8_ms if any(n.op_type == "DynamicQuantizeLinear" for n in proto.graph.node) else float_ms
        return (ms, runs) if with_runs else ms
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


# ------------------------------------------------------------------------------------------------
# "all quantized layers in float" also takes the activation-op quantizers back to float
# ------------------------------------------------------------------------------------------------
INT_OPS = ("DynamicQuantizeLinear", "MatMulInteger", "MatMulIntegerToFloat", "QLinearMatMul", "DynamicQuantizeMatMul",
           "QLinearAdd", "QuantizeLinear")


def test_all_float_candidate_reverts_hf_attention_quantization(monkeypatch, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers (the 'hf' extra) is not installed")
    from nnsqueeze.export.ort import optimized_op_types
    from nnsqueeze.quant.attention import AttentionQuant

    def bert():
        cfg = transformers.BertConfig(vocab_size=61, hidden_size=18, num_hidden_layers=1, num_attention_heads=3,
                                      intermediate_size=23, max_position_embeddings=32, attn_implementation="eager")
        torch.manual_seed(0)
        return transformers.BertModel(cfg, add_pooling_layer=False).eval()

    def batch(b, t, seed):
        g = torch.Generator().manual_seed(seed)
        mask = torch.ones(b, t, dtype=torch.long)
        mask[0, t - 2:] = 0  # padding
        return {"input_ids": torch.randint(0, 61, (b, t), generator=g), "attention_mask": mask,
                "token_type_ids": torch.zeros(b, t, dtype=torch.long)}

    # Graphs with run-time int8 quantization (layers or attention) are the slow ones.
    monkeypatch.setattr(ort_mod, "ort_latency_ms", _fake_ort_latency(2.0, 1.0))
    model = bert()
    res = nsq.compress(model, {"steps": [{"quantize-dynamic": {"attention": True}}], "latency_guard": True,
                               **FAST}, calib_data=[batch(3, 7, 0)], progress=False)
    g = res.report["export"]["latency_guard"]
    # Before: the attention matmuls stayed int8 in that candidate, so it was as slow as the
    # compressed model and the guard fell back to the baseline.
    assert g["applied"] and g["chosen"] == "all quantized layers in float"
    (row,) = [r for r in g["candidates"] if r["name"] == "all quantized layers in float"]
    assert row["latency_ms"] == 1.0 and row["reverted_layers"] == 6 + 1  # 6 Linears + 1 attention module
    assert not any(isinstance(m, (AttentionQuant, DynamicQuantLinear)) for m in res.model.modules())
    ops = optimized_op_types(res.onnx)
    assert "MatMul" in ops and not any(k in ops for k in INT_OPS), sorted(set(ops))
    (rec,) = [r["record"] for r in res.records if r["name"] == "quantize-dynamic"]
    (rev,) = [r["record"] for r in res.records if r["name"] == "revert"]
    # the step's record stays as the step wrote it; the guard's own revert record undoes all of it on replay
    assert len(rec["layers"]) == 6 and len(rec["attention"]["modules"]) == 1
    assert sorted(rev["reverted"]["layers"]) == sorted(rec["layers"])
    assert rev["reverted"]["ops"] == [f"{rec['attention']['modules'][0]}.attn_quant"]

    held = batch(2, 11, 5)  # other batch size and sequence length
    with torch.no_grad():
        ref = model(**held).last_hidden_state
        got = res.model(**held).last_hidden_state
        assert torch.allclose(got, ref, atol=1e-5)  # the float function again
        ort_out = OrtModule(res.onnx)(**held)
        assert torch.allclose(ort_out[0] if isinstance(ort_out, tuple) else ort_out, ref, atol=1e-4)
        again = artifact.load(res.save(tmp_path / "art"), bert())
        assert not any(isinstance(m, (AttentionQuant, DynamicQuantLinear)) for m in again.modules())
        assert torch.allclose(again(**held).last_hidden_state, got, atol=1e-6)


def test_fx_op_quantizers_revert_to_plain_ops_and_replay():
    """quantize with ops: [add, matmul]: reverted_copy() routes the QuantAdd / QuantMatMul calls back
    to the plain functions, and drop_reverted() removes them from the record for the replay."""
    import copy
    import json

    from nnsqueeze.context import Context
    from nnsqueeze.export.latency_guard import drop_reverted, quantized_ops, reverted_copy, revertible_layers
    from nnsqueeze.quant.functional import OpQuant
    from nnsqueeze.steps.quantize import Quantize

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = nn.Linear(5, 3), nn.Linear(5, 3)

        def forward(self, x):
            q = self.q(x)
            return torch.softmax(q @ self.k(x).transpose(1, 2), -1) @ q + q

    torch.manual_seed(0)
    fresh = Attn().eval()
    g = torch.Generator().manual_seed(1)
    ctx = Context(calib_data=[(torch.randn(2, 4, 5, generator=g), None) for _ in range(2)])
    ctx.report.begin_step("quantize", {})
    step = Quantize(Quantize.Config(ops=["add", "matmul"], activations={"bits": 8, "symmetric": True},
                                    bias_correction=False))  # so that reverted layers are the fresh ones
    model = step.run(copy.deepcopy(fresh), ctx)
    ops = quantized_ops(model)
    assert sorted(ops) == ["nsq_add", "nsq_matmul", "nsq_matmul_1"]
    names = [n for n, _ in revertible_layers(model)] + ops
    back = reverted_copy(model, names)
    assert not any(isinstance(m, OpQuant) for m in back.modules()) and quantized_ops(back) == []
    x = torch.randn(3, 7, 5, generator=g)
    with torch.no_grad():
        assert not torch.allclose(model(x), fresh(x), atol=1e-4)  # it was quantized
        assert torch.allclose(back(x), fresh(x), atol=1e-6)
    records = [{"name": "quantize", "config": step.config.model_dump(mode="json"),
                "record": json.loads(json.dumps(step.record()))}]
    (r,) = drop_reverted(records, set(names))
    assert r["record"]["ops"]["fx"] == {} and not r["record"]["layers"]
    rebuilt = Quantize.rebuild(copy.deepcopy(fresh), step.config, r["record"])
    rebuilt.load_state_dict(back.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), back(x))
