"""The block-wise LLM steps on tiny random-config Hugging Face models (LLaMA with grouped-query
attention, GPT-2 with its Conv1D layers, OPT). Built locally: nothing is fetched from a hub."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (optional extra); "
                                   "the same paths are tested on nnsqueeze.llm.tiny without it")

from nnsqueeze.context import Context  # noqa: E402
from nnsqueeze.llm.gptq import HessianAccumulator, gptq_quantize  # noqa: E402
from nnsqueeze.llm.sequential import (block_linears, find_blocks, get_weight, is_linear,  # noqa: E402
                                      run_sequential, set_weight)
from nnsqueeze.registry import STEPS  # noqa: E402

VOCAB = 101


def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def opt():
    torch.manual_seed(0)
    cfg = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64)
    return transformers.OPTForCausalLM(cfg).eval()


def data(n=2, b=2, t=20):
    g = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randint(1, VOCAB, (b, t), generator=g),
             "attention_mask": torch.ones(b, t, dtype=torch.long)} for _ in range(n)]


def ctx_for(batches):
    ctx = Context(calib_data=batches, progress=False)
    ctx.report.begin_step("test", {})
    return ctx


@pytest.mark.parametrize("build,prefix", [(llama, "model.layers"), (gpt2, "transformer.h"),
                                          (opt, "model.decoder.layers")])
def test_find_blocks_hf(build, prefix):
    model = build()
    assert find_blocks(model)[0] == prefix
    assert block_linears(model) and not any("lm_head" in n for n in block_linears(model))


def _apply(name, mod, acc):
    set_weight(mod, gptq_quantize(get_weight(mod), acc.hessian, bits=4, group_size=16, block_size=16).weight)


def _stats(name, mod):
    return HessianAccumulator(get_weight(mod).shape[1])


@pytest.mark.parametrize("build", [llama, gpt2])
def test_sequential_equals_whole_model_hf(build):
    batches = data()
    seq, ref = build(), build()
    run_sequential(seq, batches, block_linears(seq), _stats, _apply)
    prefix, blocks = find_blocks(ref)
    for blk in blocks:  # reference: hooks on each block while the whole model runs
        mods = [(n, m) for n, m in blk.named_modules() if is_linear(m)]
        accs = {n: _stats(n, m) for n, m in mods}
        hs = [m.register_forward_hook(lambda mod, i, o, a=accs[n]: a.add(i[0])) for n, m in mods]
        with torch.no_grad():
            for b in batches:
                ref(**b, use_cache=False)
        for h in hs:
            h.remove()
        for n, m in mods:
            _apply(n, m, accs[n])
    for (n, a), (_, b) in zip(seq.named_parameters(), ref.named_parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("build", [llama, gpt2, opt])
def test_steps_on_hf(build):
    batches = data()
    x = batches[0]
    for name, cfg in [("gptq", dict(group_size=32, act_order=True)), ("awq", dict(group_size=32, n_grid=5)),
                      ("wanda", dict(pattern="2:4")), ("sparsegpt", dict(sparsity=0.5))]:
        model = build()
        head = model.lm_head.weight.clone()
        ctx = ctx_for(batches)
        cls = STEPS.get(name)
        cls(cls.Config(**cfg), 0).run(model, ctx)
        assert torch.equal(model.lm_head.weight, head)  # (tied to the embeddings in GPT-2/OPT: also untouched)
        assert ctx.report.layers and all(v["error"] < 1 for v in ctx.report.layers.values())
        with torch.no_grad():
            assert torch.isfinite(model(**x).logits).all()


@pytest.mark.parametrize("build,n_smoothed", [(llama, 2 * 5), (gpt2, 2 * 2), (opt, 2 * 4)])
def test_smoothquant_hf_keeps_logits(build, n_smoothed):
    model = build()
    with torch.no_grad():  # outlier channels, as trained LLMs have
        for m in model.modules():
            if type(m).__name__.endswith("Norm"):
                m.weight.mul_(torch.linspace(0.1, 20, m.weight.numel())[torch.randperm(m.weight.numel())])
    batches = data()
    with torch.no_grad():
        before = model(**batches[0]).logits
    ctx = ctx_for(batches)
    step = STEPS.get("smoothquant")(STEPS.get("smoothquant").Config(alpha=0.5), 0)
    step.run(model, ctx)
    with torch.no_grad():
        after = model(**batches[0]).logits
    assert len(step.record()["layers"]) == n_smoothed
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-4 * float(before.abs().max()))
