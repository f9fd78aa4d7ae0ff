"""Hidden-size (residual stream) pruning of Hugging Face BERT and LLaMA (`structured-prune: {hidden: ...}`).

The reference is independent of nnsqueeze and of transformers' modules: the original weights, in
float64, sliced by hand with the kept indices, run through a forward pass written out below (checked
first against the unpruned transformers model). The pruned model must equal it (1e-5): the only
change is the removed channels (norms then normalize over the kept ones, as the reference does).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")

import nnsqueeze as nsq  # noqa: E402
from nnsqueeze.context import Context  # noqa: E402
from nnsqueeze.errors import ModelError, RecipeError  # noqa: E402
from nnsqueeze.steps.channel_prune import StructuredPrune  # noqa: E402
from test_hf import Logits  # noqa: E402

TOL = {"atol": 1e-5, "rtol": 1e-5}


def llama(tied=True):
    """Odd hidden size (21), grouped-query attention (3 query heads on 1 KV head), head_dim 8 != 21 / 3."""
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=21, intermediate_size=26, num_hidden_layers=2,
                                   num_attention_heads=3, num_key_value_heads=1, head_dim=8,
                                   max_position_embeddings=32, tie_word_embeddings=tied, attn_implementation="eager")
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():   # norms start at ones: give them spread so that a wrong slice shows
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return m


def bert():
    """Odd hidden size (25, 5 heads of 5), pooler, a classifier reading the pooler's output."""
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=25, num_hidden_layers=2, num_attention_heads=5,
                                  intermediate_size=33, max_position_embeddings=16, attn_implementation="eager")
    torch.manual_seed(0)
    m = Classify(transformers.BertModel(cfg))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "LayerNorm" in n:
                p.uniform_(0.5, 1.5)
    return m.eval()


class Classify(nn.Module):
    def __init__(self, enc):
        super().__init__()
        self.enc, self.cls = enc, nn.Linear(enc.config.hidden_size, 3)

    def forward(self, input_ids, attention_mask):
        return self.cls(self.enc(input_ids=input_ids, attention_mask=attention_mask).pooler_output)


def bert_inputs(seed=0, b=3, t=7):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 4:] = 0
    return {"input_ids": torch.randint(0, 50, (b, t), generator=g), "attention_mask": mask}


def ids(seed=1):
    return torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(seed))


def run_step(model, x, calib=None, **cfg):
    ctx = Context(example_inputs=x, calib_data=calib, progress=False)
    ctx.report.begin_step("structured-prune", cfg)
    step = StructuredPrune(StructuredPrune.Config(**cfg))
    return step.run(model, ctx), step, ctx


# ---- the float64 reference -----------------------------------------------------------------------

def sliced(model, plan):
    """The original state dict in float64, every recorded dimension sliced by hand."""
    sd = {k: v.detach().double().clone() for k, v in model.state_dict().items()}
    for name, role, keep in plan:
        k, mod = torch.tensor(keep), model.get_submodule(name)
        if role == "in" or isinstance(mod, nn.Embedding):
            sd[f"{name}.weight"] = sd[f"{name}.weight"][:, k]
        elif role.startswith("param:"):
            sd[f"{name}.{role.split(':')[1]}"] = sd[f"{name}.{role.split(':')[1]}"][k]
        else:
            for p in ("weight", "bias"):
                if f"{name}.{p}" in sd:
                    sd[f"{name}.{p}"] = sd[f"{name}.{p}"][k]
    return sd


def lin(sd, name, x):
    y = x @ sd[f"{name}.weight"].T
    return y + sd[f"{name}.bias"] if f"{name}.bias" in sd else y


def layer_norm(sd, name, x, eps):
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * sd[f"{name}.weight"] + sd[f"{name}.bias"]


def attend(q, k, v, d, bias):
    """q (B, Hq, T, d), k/v (B, Hkv, T, d): key/value heads shared by Hq / Hkv consecutive query heads."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + bias, -1)
    return (w @ v).transpose(1, 2).flatten(2)


def bert_ref(sd, x, d, eps=1e-12, layers=2, p="enc."):
    ids_, mask = x["input_ids"], x["attention_mask"]
    t = ids_.shape[1]
    h = sd[f"{p}embeddings.word_embeddings.weight"][ids_] + sd[f"{p}embeddings.position_embeddings.weight"][:t] \
        + sd[f"{p}embeddings.token_type_embeddings.weight"][0]
    h = layer_norm(sd, f"{p}embeddings.LayerNorm", h, eps)
    bias = (1.0 - mask[:, None, None, :].double()) * torch.finfo(torch.float64).min
    for i in range(layers):
        a = f"{p}encoder.layer.{i}.attention."
        heads = [lin(sd, a + f"self.{n}", h).unflatten(-1, (-1, d)).transpose(1, 2) for n in ("query", "key", "value")]
        h = layer_norm(sd, a + "output.LayerNorm", lin(sd, a + "output.dense", attend(*heads, d, bias)) + h, eps)
        f = F.gelu(lin(sd, f"{p}encoder.layer.{i}.intermediate.dense", h))
        h = layer_norm(sd, f"{p}encoder.layer.{i}.output.LayerNorm",
                       lin(sd, f"{p}encoder.layer.{i}.output.dense", f) + h, eps)
    return h, lin(sd, "cls", torch.tanh(lin(sd, f"{p}pooler.dense", h[:, 0])))


def rms(sd, name, x, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * sd[f"{name}.weight"]


def rotate(x, cos, sin):
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def llama_ref(sd, x, d=8, theta=10000.0, layers=2, tied=True, p="lm."):
    t = x.shape[1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.outer(torch.arange(t, dtype=torch.float64), inv)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    causal = torch.full((t, t), -math.inf, dtype=torch.float64).triu(1)
    h = sd[f"{p}model.embed_tokens.weight"][x]
    for i in range(layers):
        b = f"{p}model.layers.{i}."
        y = rms(sd, b + "input_layernorm", h)
        q, k, v = (lin(sd, b + f"self_attn.{n}_proj", y).unflatten(-1, (-1, d)).transpose(1, 2) for n in "qkv")
        h = h + lin(sd, b + "self_attn.o_proj", attend(rotate(q, cos, sin), rotate(k, cos, sin), v, d, causal))
        y = rms(sd, b + "post_attention_layernorm", h)
        h = h + lin(sd, b + "mlp.down_proj", F.silu(lin(sd, b + "mlp.gate_proj", y)) * lin(sd, b + "mlp.up_proj", y))
    h = rms(sd, f"{p}model.norm", h)
    return h @ sd[f"{p}model.embed_tokens.weight" if tied else f"{p}lm_head.weight"].T


def stream_keep(step, name):
    return next(k for n, r, k in step.plan_ if n == name)


# ---- tests ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("heads", [False, True])
def test_llama_hidden_equals_float64_reference(heads):
    model, x = Logits(llama()), ids()
    orig = copy.deepcopy(model)
    with torch.no_grad():   # the reference itself first: it reproduces the unpruned model
        torch.testing.assert_close(orig(x).double(), llama_ref(sliced(orig, []), x), **TOL)
    extra = {"ratio": 0.3, "head_ratio": 0.0} if heads else {}
    pruned, step, ctx = run_step(model, x, hidden=0.3, **extra)
    lm, keep = pruned.lm, stream_keep(step, "lm.model.embed_tokens")
    assert len(keep) == 15 and lm.config.hidden_size == 15 and lm.config.head_dim == 8
    assert lm.lm_head.weight is lm.model.embed_tokens.weight and lm.lm_head.in_features == 15
    assert lm.model.norm.weight.shape == (15,)
    for layer in lm.model.layers:
        a, mlp = layer.self_attn, layer.mlp
        assert (a.q_proj.in_features, a.k_proj.in_features, a.v_proj.in_features) == (15, 15, 15)
        assert (a.q_proj.out_features, a.k_proj.out_features, a.head_dim) == (24, 8, 8)  # head_dim intact
        assert a.o_proj.out_features == mlp.down_proj.out_features == mlp.gate_proj.in_features == 15
        assert layer.input_layernorm.weight.shape == layer.post_attention_layernorm.weight.shape == (15,)
        assert mlp.up_proj.out_features == (18 if heads else 26)
    members = {(m.module, m.role) for m in step._streams[0].group.members}   # embedding, o/down, norms, q/k/v/gate/up
    assert len(members) == 1 + 2 * 2 + 5 + 2 * 5 and all(k == keep for n, r, k in step.plan_ if (n, r) in members)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x).double(), llama_ref(sliced(orig, step.plan_), x), **TOL)
    assert ctx.report.steps[-1]["figures"]["hidden_after"] == 15
    if not heads:   # l2 over every tensor of the stream, computed by hand (the tied LM head is the embedding)
        sd, score = orig.state_dict(), torch.zeros(21, dtype=torch.float64)
        for n, t in sd.items():
            t = t.double()
            if "embed" in n or "norm" in n:
                score += t.pow(2).reshape(-1, 21).sum(0) if t.dim() == 2 else t.pow(2)
            elif any(s in n for s in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
                score += t.pow(2).sum(0)
            elif "o_proj" in n or "down_proj" in n:
                score += t.pow(2).sum(1)
        assert sorted(set(range(21)) - set(keep)) == sorted(torch.argsort(score)[:6].tolist())


def test_bert_hidden_with_heads_and_ffn_equals_float64_reference():
    model, x = bert(), bert_inputs()
    orig = copy.deepcopy(model)
    with torch.no_grad():
        ref_h, ref_y = bert_ref(sliced(orig, []), x, d=5)
        torch.testing.assert_close(orig.enc(**x).last_hidden_state.double(), ref_h, **TOL)
        torch.testing.assert_close(orig(**x).double(), ref_y, **TOL)
    pruned, step, ctx = run_step(model, x, ratio=0.4, hidden=0.2)
    enc = pruned.enc
    assert enc.config.hidden_size == 20 and enc.embeddings.position_embeddings.embedding_dim == 20
    assert enc.embeddings.token_type_embeddings.embedding_dim == enc.embeddings.LayerNorm.weight.shape[0] == 20
    for layer in enc.encoder.layer:
        att = layer.attention.self
        assert (att.query.in_features, att.attention_head_size, att.num_attention_heads) == (20, 5, 3)
        assert layer.attention.output.dense.out_features == layer.output.dense.out_features == 20
        assert layer.intermediate.dense.in_features == 20 and layer.output.LayerNorm.bias.shape == (20,)
    assert (enc.pooler.dense.in_features, enc.pooler.dense.out_features, pruned.cls.in_features) == (20, 25, 25)
    assert any(s["layer"] == "cls" and "not the residual stream" in s["reason"] for s in ctx.report.skipped)
    with torch.no_grad():
        got_h = pruned.enc(**x).last_hidden_state.double()
        ref_h, ref_y = bert_ref(sliced(orig, step.plan_), x, d=5)
        torch.testing.assert_close(got_h, ref_h, **TOL)
        torch.testing.assert_close(pruned(**x).double(), ref_y, **TOL)


def test_energy_ranks_hidden_channels_by_the_stream_norm_outputs():
    model, x = Logits(llama(tied=False)), ids()
    calib = [ids(s) for s in range(2, 4)]
    outs: list[torch.Tensor] = []
    norms = [m for n, m in model.named_modules() if n.endswith("norm")]
    hooks = [m.register_forward_hook(lambda mod, i, o: outs.append(o.detach().double().reshape(-1, 21)))
             for m in norms]
    with torch.no_grad():
        for b in calib:
            model(b)
    for h in hooks:
        h.remove()
    expect = sorted(torch.argsort(torch.cat(outs).pow(2).mean(0))[:6].tolist())   # every norm, every token
    _, step, _ = run_step(model, x, calib=calib, hidden=0.3, importance="energy")
    assert len(norms) == 5 and sorted(set(range(21)) - set(stream_keep(step, "lm.lm_head"))) == expect


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_hidden_reload_is_exact_and_onnx_matches(kind, tmp_path):
    from nnsqueeze.export.ort import OrtModule

    factory = bert if kind == "bert" else (lambda: Logits(llama()))
    data = [bert_inputs(s) for s in range(2)] if kind == "bert" else [ids(s) for s in range(2)]
    recipe = {"version": 1, "steps": [{"structured-prune": {"hidden": 0.2 if kind == "bert" else 0.3}}],
              "evaluate": {"runs": 2, "warmup": 1}}
    res = nsq.compress(factory(), recipe, calib_data=data, metric=None, progress=False)
    res.save(tmp_path / "art")
    loaded = nsq.load(tmp_path / "art", model=factory())
    x = data[1]
    call = (lambda m: m(**x)) if kind == "bert" else (lambda m: m(x))
    cfg = loaded.enc.config if kind == "bert" else loaded.lm.config
    assert cfg.hidden_size == (20 if kind == "bert" else 15)
    if kind == "llama":
        assert loaded.lm.lm_head.weight is loaded.lm.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(call(loaded.eval()), call(res.model.eval()))
        ort = OrtModule(tmp_path / "art" / "model.onnx")
        got = torch.as_tensor(ort(**x) if kind == "bert" else ort(x))
        torch.testing.assert_close(got, call(res.model), atol=1e-4, rtol=1e-4)


def test_bad_hidden_values_are_recipe_errors():
    x = ids()
    with pytest.raises(RecipeError, match="hidden"):
        nsq.compress(Logits(llama()), [{"structured-prune": {"hidden": 1.0}}], calib_data=[x], progress=False)
    with pytest.raises(RecipeError, match="not a multiple of num_attention_heads=3") as e:
        run_step(Logits(llama()), x, hidden=0.25)       # 21 -> 16 channels: not whole for 3 heads
    assert "hidden: 0.2857 (keeps 15)" in str(e.value)
    with pytest.raises(ModelError, match="Hugging Face"):
        run_step(nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2)), torch.randn(3, 4), hidden=0.5)
