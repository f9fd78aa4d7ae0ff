"""``awq: {share_scales: true, fold: true}`` then ``gptq`` in one recipe (llm-compressor's AWQ + GPTQ):
the awq step alone leaves an equivalent float model holding ``W * s``; the recipe equals running gptq
on that model; the grid options reach the packed layers; orders that cannot work are refused."""

from __future__ import annotations

import copy

import pytest
import torch

import nnsqueeze as nsq
from nnsqueeze.errors import RecipeError
from nnsqueeze.llm.packed import PackedLinear
from nnsqueeze.llm.tiny import TinyLlama, TinyLlamaConfig

VOCAB = 89
FAST = {"warmup": 0, "runs": 1, "per_step": False}
W = {"bits": 4, "group_size": 32, "samples": 4}


def tiny():
    torch.manual_seed(0)
    model = TinyLlama(TinyLlamaConfig(vocab_size=VOCAB, hidden_size=80, intermediate_size=112)).eval()
    with torch.no_grad():  # activation outlier channels, so AWQ picks alpha > 0
        for blk in model.model.layers:
            blk.input_layernorm.weight.mul_(torch.linspace(0.2, 8, 80)[torch.randperm(80)])
    return model


def data():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, VOCAB, (2, 16), generator=g) for _ in range(2)]


def run(model, steps):
    return nsq.compress(model, {"version": 1, "steps": steps, "export": {"onnx": None}, "evaluate": FAST},
                        calib_data=data(), metric=None, progress=False)


AWQ = {"awq": {**W, "n_grid": 8, "share_scales": True, "fold": True}}


def test_fold_alone_keeps_the_function_and_scales_the_weights():
    ref = tiny()
    res = run(copy.deepcopy(ref), [AWQ])
    x = data()[0]
    with torch.no_grad():
        assert torch.allclose(res.model(x).logits, ref(x).logits, rtol=0, atol=1e-4)
    rec = res.records[0]["record"]
    assert rec["fold"] is True and rec["pack"] is False
    alphas = [v["alpha"] for k, v in res.report["layers"].items() if k.endswith("q_proj")]
    assert any(a > 0 for a in alphas)                  # scales were applied somewhere
    norm, norm0 = res.model.model.layers[0].input_layernorm.weight, ref.model.layers[0].input_layernorm.weight
    assert not torch.equal(norm, norm0)
    q, q0 = res.model.model.layers[0].self_attn.q_proj.weight, ref.model.layers[0].self_attn.q_proj.weight
    assert torch.allclose(q * norm, q0 * norm0, rtol=1e-5, atol=1e-6)   # W * s, norm / s
    assert not any(isinstance(m, PackedLinear) for m in res.model.modules())


@pytest.mark.parametrize("full_range", [False, True])
def test_recipe_equals_gptq_on_the_folded_model(full_range):
    gptq = {"gptq": {**W, "act_order": True, "full_range": full_range}}
    res = run(tiny(), [AWQ, gptq])
    folded = run(tiny(), [AWQ]).model
    alone = run(folded, [gptq])
    layers = {n: m for n, m in res.model.named_modules() if isinstance(m, PackedLinear)}
    assert len(layers) == 14
    for name, m in layers.items():
        other = alone.model.get_submodule(name)
        assert torch.equal(m.dequantized_weight(), other.dequantized_weight()), name
        assert int(m.weight_codes().max()) <= 15
    assert res.records[1]["record"].get("full_range", False) is full_range
    x = data()[1]
    with torch.no_grad():
        ref = tiny()(x).logits
        err = float((res.model(x).logits - ref).abs().mean())
        assert err < float(ref.abs().mean())            # a quantized model, not garbage


def test_orders_and_options_that_cannot_work_are_refused():
    with pytest.raises(RecipeError, match="share_scales: true"):
        run(tiny(), [{"awq": {**W, "fold": True}}])
    with pytest.raises(RecipeError, match="pack: false"):
        run(tiny(), [{"awq": {**W, "fold": True, "share_scales": True, "pack": True}}])
    with pytest.raises(RecipeError, match="already quantized"):   # plain awq quantizes: gptq cannot follow
        run(tiny(), [{"awq": {**W, "n_grid": 4}}, {"gptq": W}])
    with pytest.raises(RecipeError, match="full_range"):
        run(tiny(), [{"gptq": {**W, "symmetric": False, "full_range": True}}])
