"""The C decode loop (nnsqueeze.llm.fastdecode / decode_c) on tiny random transformers LLaMAs with odd
sizes and grouped-query attention: per-step logits against the same model's float64 forward and its
float32 torch forward, greedy tokens against ``model.generate``, and every fallback logged."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="transformers is not installed (optional extra `hf`)")

from nnsqueeze.errors import ModelError  # noqa: E402
from nnsqueeze.llm import decode_c, fastdecode  # noqa: E402
from nnsqueeze.llm.packed import add_input_scale_, pack_linear_  # noqa: E402
from nnsqueeze.quant.weight_only import convert_weight_only_  # noqa: E402

VOCAB, STEPS = 97, 20
# max |logits - reference| <= REL * max |reference| at every step: float32 sums over <= 101 terms per
# dot product through 3 layers; the observed error is ~1e-6 relative
REL = 1e-4


def lib_or_skip():
    lib, why = decode_c.load()
    if lib is None:
        pytest.skip(f"decode library not built here: {why}")
    return lib


def llama(tied: bool, seed: int = 0, **over):
    """Odd sizes: hidden 90, 6 query heads of 14 (q_proj 90 -> 84), 2 key/value heads, MLP 101."""
    torch.manual_seed(seed)
    kw = dict(vocab_size=VOCAB, hidden_size=90, intermediate_size=101, num_hidden_layers=3, num_attention_heads=6,
              num_key_value_heads=2, head_dim=14, max_position_embeddings=128, tie_word_embeddings=tied,
              rope_theta=5000.0, rms_norm_eps=1e-5)
    kw.update(over)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
    with torch.no_grad():                      # non-trivial norm weights (they start at ones)
        for n, p in model.named_parameters():
            if "norm" in n:
                p.mul_(1 + 0.3 * torch.rand_like(p))
    return model


def pack(model, bits: int, group: int, head: bool = False, awq: bool = False):
    """Pack every block Linear (and lm_head when ``head``) in place; ``awq``: an input scale on two layers."""
    for name, mod in list(model.named_modules()):
        if type(mod) is nn.Linear and (".layers." in name or (head and name == "lm_head")):
            pack_linear_(convert_weight_only_(mod, bits=bits, group_size=group, symmetric=bits == 8))
    if awq:
        g = torch.Generator().manual_seed(5)
        for mod in (model.model.layers[0].mlp.down_proj, model.model.layers[1].self_attn.q_proj):
            add_input_scale_(mod, 0.5 + torch.rand(mod.in_features, generator=g))
    return model


CASES = {
    "fp32 untied": lambda: llama(False),
    "fp32 untied, attention and MLP biases": lambda: llama(False, seed=6, attention_bias=True, mlp_bias=True),
    "fp32 tied": lambda: llama(True),
    "int4 g32 tied": lambda: pack(llama(True), 4, 32),
    "int4 g32 untied, lm_head int4, awq scales": lambda: pack(llama(False, seed=1), 4, 32, head=True, awq=True),
    "int4 g64, K multiples of 32 (AVX-512 table kernel), lm_head int4 per-row": lambda: pack(
        llama(False, seed=4, hidden_size=64, intermediate_size=96, head_dim=16, num_attention_heads=4), 4, 64,
        head=True, awq=True),
    "int4 g32, K multiples of 32 (table kernel, groups in pairs), lm_head fp32": lambda: pack(
        llama(False, seed=7, hidden_size=64, intermediate_size=96, head_dim=16, num_attention_heads=4), 4, 32),
    "int8 per-row untied, lm_head int8": lambda: pack(llama(False, seed=2), 8, -1, head=True),
    "int8 g16 tied, MHA (kv heads = heads)": lambda: pack(llama(True, seed=3, num_key_value_heads=6), 8, 16),
}


def decode(model, ids: list[int]):
    """Feed ``ids`` then STEPS greedy tokens through the C decoder: (sequence, per-step logits, decoder)."""
    dec = fastdecode.Decoder(model, len(ids) + STEPS)
    seq, logits = list(ids), []
    for pos in range(len(ids) + STEPS - 1):
        tok = dec.step(seq[pos], pos)
        logits.append(dec.logits.clone())
        if pos >= len(ids) - 1:
            seq.append(tok)
    return seq, torch.stack(logits), dec


def prompt(n=7, seed=0):
    return torch.randint(1, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", list(CASES))
def test_step_logits_match_float64_and_torch(case):
    lib_or_skip()
    model = CASES[case]()
    assert fastdecode.unsupported(model) is None
    ids = prompt()[0].tolist()
    seq, got, _ = decode(model, ids)
    x = torch.tensor([seq[:-1]])
    with torch.no_grad():
        ref64 = copy.deepcopy(model).to(torch.float64)(x).logits[0]
        ref32 = model(x).logits[0]
    for ref in (ref64, ref32):
        err = (got.double() - ref.double()).abs().amax(-1)
        bound = REL * ref.double().abs().amax(-1)
        assert bool((err <= bound).all()), f"{case}: worst step error {float((err / bound).max()) * REL:.2e} rel"
    assert got.argmax(-1).tolist()[len(ids) - 1:] == seq[len(ids):]       # the argmax returned by the C step


@pytest.mark.parametrize("case", ["fp32 untied", "int4 g32 tied", "int8 per-row untied, lm_head int8"])
@pytest.mark.parametrize("prefill", ["torch", "c"])
def test_greedy_tokens_equal_hf_generate(case, prefill, caplog):
    lib_or_skip()
    model = CASES[case]()
    ids = prompt(9, seed=1)
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, pad_token_id=0)
    with caplog.at_level(logging.WARNING, logger="nnsqueeze"):
        got = fastdecode.generate(model, ids, STEPS, min_new_tokens=STEPS, prefill=prefill, pad_token_id=0)
    assert not caplog.records, [r.message for r in caplog.records]        # the C loop ran, no fallback
    assert got.shape == (1, 9 + STEPS) and got.tolist() == ref.tolist()


def test_stops_after_eos_like_generate():
    lib_or_skip()
    model = CASES["int4 g32 tied"]()
    ids = prompt(9, seed=1)
    first = fastdecode.generate(model, ids, STEPS, eos_token_id=[])[0, 9:].tolist()
    eos = first[4]                                  # a token the greedy run makes: generation stops there
    got = fastdecode.generate(model, ids, STEPS, eos_token_id=eos)
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=STEPS, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert got.tolist() == ref.tolist() and got[0, -1] == eos and got.shape[1] <= 9 + 5


def test_int8_activations_match_the_packed_layers(monkeypatch):
    """act8 runs the same integer kernel as PackedLinear under NNSQUEEZE_PACKED_ACT=int8."""
    lib_or_skip()
    model = CASES["int4 g32 tied"]()
    ids = prompt()[0].tolist()
    dec = fastdecode.Decoder(model, len(ids), act8=True)
    for pos, t in enumerate(ids):
        dec.step(t, pos)
    monkeypatch.setenv("NNSQUEEZE_PACKED_ACT", "int8")
    with torch.no_grad():                           # one row per call: PackedLinear's decode path
        out = model(torch.tensor([ids[:1]]), use_cache=True)
        for t in ids[1:]:
            out = model(torch.tensor([[t]]), cache=out["cache"], use_cache=True)
        ref = out.logits[0, -1]
    assert float((dec.logits - ref).abs().max()) <= REL * float(ref.abs().max())


def _gpt2():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2,
                                                                n_positions=64)).eval()


@pytest.mark.parametrize("what,expect", [
    ("batch 2", "batch 1 only"),
    ("sampling", "do_sample=True"),
    ("gpt2", "GPT2LMHeadModel is not a transformers LlamaForCausalLM"),
    ("rope scaling", "rope scaling"),
    ("fake-quant layer", "WeightOnlyLinear"),
    ("no kernel", "NNSQUEEZE_PACKED_KERNEL=0"),
])
def test_fallbacks_are_logged_and_match_generate(what, expect, monkeypatch, caplog):
    model, ids, kw = llama(True), prompt(5), {}
    if what == "batch 2":
        ids = torch.cat([ids, prompt(5, seed=9)])
    elif what == "sampling":
        kw = {"do_sample": True, "top_k": 1}        # top-1 sampling is deterministic: comparable with HF
    elif what == "gpt2":
        model = _gpt2()
    elif what == "rope scaling":
        model = llama(True, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0})
    elif what == "fake-quant layer":
        convert_weight_only_(model.model.layers[1].mlp.up_proj, bits=4, group_size=32)
    else:
        monkeypatch.setenv("NNSQUEEZE_PACKED_KERNEL", "0")
    with caplog.at_level(logging.WARNING, logger="nnsqueeze"):
        got = fastdecode.generate(model, ids, 6, min_new_tokens=6, pad_token_id=0, **kw)
    msgs = [r.message for r in caplog.records]
    assert any(expect in m and "falling back to Hugging Face generate" in m for m in msgs), msgs
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=6, min_new_tokens=6, pad_token_id=0, **{"do_sample": False, **kw})
    assert got.tolist() == ref.tolist()


def test_decoder_refuses_what_it_cannot_run():
    lib_or_skip()
    with pytest.raises(ModelError, match="not a transformers LlamaForCausalLM"):
        fastdecode.Decoder(_gpt2(), 8)
    dec = fastdecode.Decoder(llama(False), 4)
    with pytest.raises(ModelError, match="outside the cache of 4"):
        dec.step(1, 4)
    with pytest.raises(ModelError, match="outside the vocabulary"):
        dec.step(VOCAB, 0)
    with pytest.raises(ModelError, match="prefill"):
        fastdecode.generate(llama(False), prompt(), 3, prefill="gpu")


@pytest.mark.parametrize("march,isa", [("haswell", "avx2 maddubs"), ("x86-64", "scalar none")])
@pytest.mark.parametrize("case", ["int4 g32 untied, lm_head int4, awq scales",
                                  "int4 g32, K multiples of 32 (table kernel, groups in pairs), lm_head fp32",
                                  "int4 g64, K multiples of 32 (AVX-512 table kernel), lm_head int4 per-row",
                                  "int8 per-row untied, lm_head int8"])
def test_avx2_and_plain_c_builds_match_float64(case, march, isa, monkeypatch):
    """This CPU builds the AVX-512 paths with -march=native; an AVX2-only server (no AVX-512, no VNNI)
    compiles the ``haswell`` branches, a non-AVX CPU the plain C loops: build both here and run a whole
    decode against the float64 forward (the same bound as the native build)."""
    import platform
    import shutil
    if platform.machine() != "x86_64" or not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("explicit -march builds need an x86-64 machine with a C compiler")
    monkeypatch.setenv("NNSQUEEZE_KERNEL_MARCH", march)
    lib, why = decode_c.load()
    assert lib is not None, why
    assert lib.nsq_isa().decode() == isa                 # the build took the branch it names
    model = CASES[case]()
    seq, got, dec = decode(model, prompt()[0].tolist())
    assert dec.lib is lib
    with torch.no_grad():
        ref = copy.deepcopy(model).to(torch.float64)(torch.tensor([seq[:-1]])).logits[0]
    err = (got.double() - ref).abs().amax(-1)
    assert bool((err <= REL * ref.abs().amax(-1)).all()), f"{case} ({march}): {float(err.max()):.2e}"


def test_kernel_march_must_be_a_march_name(monkeypatch):
    from nnsqueeze.llm import cbuild
    monkeypatch.setenv("NNSQUEEZE_KERNEL_MARCH", "native; rm -rf /")
    with pytest.raises(ModelError, match="NNSQUEEZE_KERNEL_MARCH"):
        cbuild.flags()
