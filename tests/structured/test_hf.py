"""Hugging Face blocks: BERT heads + FFN neurons, LLaMA grouped-query KV groups + gated MLP neurons.

The tests that name the patterns' own report entries pin ``graph: fx`` (torch.fx fails, the patterns
follow); ``graph: auto`` builds these models' graph from torch.export (test_export_graph.py). Each pruned
model must equal the original with the removed heads' output-projection columns and the
removed neurons' down-projection columns set to zero (1e-5), export to ONNX and match in ORT, and
reload from the artifact (replay + weights) with identical outputs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import nnsqueeze as nsq  # noqa: E402
from nnsqueeze.context import Context  # noqa: E402
from nnsqueeze.steps.channel_prune import StructuredPrune  # noqa: E402
from nnsqueeze.structured.hf import hf_graph  # noqa: E402


def tiny_bert(attn="eager"):
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=36, max_position_embeddings=16, attn_implementation=attn)
    torch.manual_seed(0)
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def tiny_llama(attn="eager"):
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=24, intermediate_size=28, num_hidden_layers=2,
                                   num_attention_heads=6, num_key_value_heads=3, head_dim=6,
                                   max_position_embeddings=32, attn_implementation=attn)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


class Pooled(nn.Module):
    """BERT encoder -> masked mean: a plain tensor out (what the pipeline exports)."""

    def __init__(self, enc):
        super().__init__()
        self.enc = enc

    def forward(self, input_ids, attention_mask):
        h = self.enc(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1)


class Logits(nn.Module):
    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids):
        return self.lm(input_ids=input_ids).logits


def bert_inputs(seed=0, b=3, t=7):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 5:] = 0
    return {"input_ids": torch.randint(0, 50, (b, t), generator=g), "attention_mask": mask}


def run_step(model, x, **cfg):
    ctx = Context(example_inputs=x, progress=False)
    ctx.report.begin_step("structured-prune", cfg)
    step = StructuredPrune(StructuredPrune.Config(**cfg))
    return step.run(model, ctx), step, ctx


def zeroed(model, plan):
    """The original with the pruned channels' consumer columns (``in`` role) set to zero."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, role, keep in plan:
            if role == "in":
                w = ref.get_submodule(name).weight
                w[:, [i for i in range(w.shape[1]) if i not in set(keep)]] = 0
    return ref


def mixing_ffn(mid: nn.Module) -> nn.Module:
    """fc1 -> mid -> fc2 (6 -> 12 -> 6): named like an FFN, but ``mid`` (a norm, a softmax) mixes the
    neurons, so the FFN pattern does not hold; a data-dependent branch keeps torch.fx from tracing it."""

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.ln, self.fc2 = nn.Linear(6, 12), mid, nn.Linear(12, 6)

        def forward(self, x):
            if x.sum() > -1e9:
                x = self.fc2(self.ln(self.fc1(x)))
            return x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = Mlp()

        def forward(self, x):
            return self.mlp(x)

    return Net().eval()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("importance", ["l2", "fpgm", "energy"])
def test_bert_heads_and_ffn_equal_zeroed_original(attn, importance):
    model, x = Pooled(tiny_bert(attn)), bert_inputs()
    orig = copy.deepcopy(model)
    ctx = Context(example_inputs=x, calib_data=[x], progress=False)
    ctx.report.begin_step("structured-prune", {})
    step = StructuredPrune(StructuredPrune.Config(ratio=0.5, importance=importance, graph="fx"))   # fx -> patterns
    pruned = step.run(model, ctx)
    for layer in pruned.enc.encoder.layer:
        att = layer.attention.self
        assert (att.num_attention_heads, att.all_head_size, att.query.out_features) == (2, 12, 12)
        assert att.key.out_features == att.value.out_features == layer.attention.output.dense.in_features == 12
        assert layer.intermediate.dense.out_features == layer.output.dense.in_features == 18
    assert pruned.enc.embeddings.word_embeddings.embedding_dim == 24      # residual stream intact
    with torch.no_grad():
        torch.testing.assert_close(pruned(**x), zeroed(orig, step.plan_)(**x), atol=1e-5, rtol=0)
    assert ctx.report.layers["enc.encoder.layer.0.attention.self"]["heads_after"] == 2
    assert ctx.report.steps[-1]["figures"]["heads_removed"] == 4
    assert any("hidden size" in s["layer"] for s in ctx.report.skipped)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_llama_gqa_prunes_whole_kv_groups_and_gated_mlp(attn):
    model, ids = Logits(tiny_llama(attn)), torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(1))
    orig = copy.deepcopy(model)
    pruned, step, ctx = run_step(model, ids, ratio=0.34, head_ratio=0.34, graph="fx")   # fx -> patterns
    for layer in pruned.lm.model.layers:
        a, mlp = layer.self_attn, layer.mlp
        assert a.k_proj.out_features == a.v_proj.out_features == 2 * 6          # 3 -> 2 KV heads
        assert a.q_proj.out_features == a.o_proj.in_features == 4 * 6           # their 2 query heads each
        assert a.num_key_value_groups == 2
        assert mlp.gate_proj.out_features == mlp.up_proj.out_features == mlp.down_proj.in_features == 18
        assert mlp.intermediate_size == 18
    # the kept query heads are exactly the ones reading the kept KV heads
    kv_keep = [i // 6 for i in next(k for n, r, k in step.plan_ if n == "lm.model.layers.0.self_attn.k_proj")[::6]]
    q_keep = [i // 6 for i in next(k for n, r, k in step.plan_ if n == "lm.model.layers.0.self_attn.q_proj")[::6]]
    assert q_keep == [h for g in kv_keep for h in (2 * g, 2 * g + 1)]
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids), zeroed(orig, step.plan_)(ids), atol=1e-5, rtol=0)
    assert ctx.report.layers["lm.model.layers.1.self_attn"]["kv_heads_after"] == 2
    skipped = {s["layer"]: s["reason"] for s in ctx.report.skipped}
    assert "recognised" in skipped["lm.lm_head"]


def test_bert_macs_budget_is_met():
    from nnsqueeze.structured.macs import count

    model, x = Pooled(tiny_bert()), bert_inputs()
    base = count(model, x).total_macs
    pruned, _, ctx = run_step(model, x, macs=0.6)
    got = count(pruned, x).total_macs
    assert 0.5 * base <= got <= 0.6 * base
    assert ctx.report.steps[-1]["figures"]["macs_after"] == got


def test_unrecognised_attention_is_reported_and_intact():
    class Odd(nn.Module):           # q/k/v/o names, but no head size attribute: cannot be split into heads
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(8, 8) for _ in range(4))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.mlp = Odd(), nn.Module()
            self.mlp.fc1, self.mlp.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    g = hf_graph(Net())
    assert "head size unknown" in g.skipped["attn"]
    assert [(grp.size, [m.module for m in grp.members]) for grp in g.groups] == [(16, ["mlp.fc1", "mlp.fc2"])]


def test_bert_export_ort_and_reload_from_artifact(tmp_path):
    from nnsqueeze.export.ort import OrtModule

    data = [bert_inputs(s) for s in range(2)]
    recipe = {"version": 1, "steps": [{"structured-prune": {"ratio": 0.5, "importance": "l1"}}],
              "evaluate": {"runs": 2, "warmup": 1}}
    res = nsq.compress(Pooled(tiny_bert()), recipe, calib_data=data, metric=None, progress=False)
    res.save(tmp_path / "art")
    loaded = nsq.load(tmp_path / "art", model=Pooled(tiny_bert()))
    x = data[1]
    assert loaded.enc.encoder.layer[1].attention.self.num_attention_heads == 2
    with torch.no_grad():
        assert torch.equal(loaded(**x), res.model.eval()(**x))
    ort = OrtModule(tmp_path / "art" / "model.onnx")
    torch.testing.assert_close(torch.as_tensor(ort(**x)), res.model(**x), atol=1e-4, rtol=1e-4)


def test_llama_export_ort_and_reload(tmp_path):
    from nnsqueeze.export.onnx import export_onnx
    from nnsqueeze.export.ort import OrtModule

    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(2))
    model = Logits(tiny_llama())
    pruned, step, _ = run_step(model, ids, ratio=0.34, head_ratio=0.34)
    fresh = StructuredPrune.rebuild(Logits(tiny_llama()), step.config, step.record())
    fresh.load_state_dict(pruned.state_dict())
    assert fresh.lm.model.layers[0].mlp.intermediate_size == 18
    with torch.no_grad():
        assert torch.equal(fresh.eval()(ids), pruned(ids))
    export_onnx(pruned, tmp_path / "m.onnx", ids)
    torch.testing.assert_close(torch.as_tensor(OrtModule(tmp_path / "m.onnx")(ids)), pruned(ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mid,match", [(nn.LayerNorm(12), "no longer runs"),
                                       (nn.Softmax(-1), "changed the outputs beyond the removed channels")])
def test_pattern_that_does_not_hold_raises_instead_of_breaking(mid, match):
    from nnsqueeze.errors import ModelError

    torch.manual_seed(0)
    with pytest.raises(ModelError, match=match):
        run_step(mixing_ffn(mid), torch.randn(3, 6), ratio=0.5)
