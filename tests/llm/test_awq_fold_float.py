"""AWQ scales folded into a float LLaMA (:mod:`nnsqueeze.llm.awq_fold`): the folded model computes the
unfolded one's function (float64 reference, every fold target: norms, up_proj rows, v_proj rows under
GQA), and what cannot fold is a ModelError naming the layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nnsqueeze.errors import ModelError
from nnsqueeze.llm.awq_fold import attention_heads, fold_scales_
from nnsqueeze.llm.packed import pack_linear_
from nnsqueeze.llm.tiny import TinyLlama, TinyLlamaConfig
from nnsqueeze.quant.weight_only import convert_weight_only_

CFG = TinyLlamaConfig(vocab_size=61, hidden_size=48, intermediate_size=72, num_layers=2, num_heads=4,
                      num_kv_heads=2)


def _model() -> TinyLlama:
    torch.manual_seed(0)
    return TinyLlama(CFG).eval().double()


def _scales(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random positive scales for every Linear of both blocks; o_proj's agree within each kv group."""
    out = {}
    hd = CFG.hidden_size // CFG.num_heads
    for i in range(CFG.num_layers):
        p = f"model.layers.{i}."
        s_in = torch.rand(CFG.hidden_size, generator=gen, dtype=torch.float64) + 0.5
        s_mlp = torch.rand(CFG.hidden_size, generator=gen, dtype=torch.float64) + 0.5
        out.update({p + f"self_attn.{x}_proj": s_in for x in "qkv"})
        out.update({p + f"mlp.{x}_proj": s_mlp for x in ("gate", "up")})
        out[p + "mlp.down_proj"] = torch.rand(CFG.intermediate_size, generator=gen, dtype=torch.float64) + 0.5
        kv = torch.rand(CFG.num_kv_heads, 1, hd, generator=gen, dtype=torch.float64) + 0.5
        out[p + "self_attn.o_proj"] = kv.expand(-1, CFG.num_heads // CFG.num_kv_heads, -1).reshape(-1)
    return out


def test_folded_model_computes_the_same_function_float64():
    ref, model = _model(), _model()
    x = torch.randint(0, CFG.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    scales = _scales(torch.Generator().manual_seed(2))
    w0 = ref.model.layers[1].mlp.down_proj.weight.detach().clone()
    fold_scales_(model, scales, CFG)
    with torch.no_grad():
        assert torch.allclose(model(x).logits, ref(x).logits, rtol=0, atol=1e-10)
    # the weights now hold W * s (the next quantizer sees them), the norm 1 / s
    assert torch.allclose(model.model.layers[1].mlp.down_proj.weight, w0 * scales["model.layers.1.mlp.down_proj"])
    assert torch.allclose(model.model.layers[0].input_layernorm.weight,
                          1 / scales["model.layers.0.self_attn.q_proj"])


def test_untargeted_reader_of_a_norm_is_scaled_too():
    ref, model = _model(), _model()
    s = torch.linspace(0.5, 2.0, CFG.hidden_size, dtype=torch.float64)
    fold_scales_(model, {"model.layers.0.self_attn.q_proj": s}, CFG)   # k, v read the same norm
    x = torch.randint(0, CFG.vocab_size, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(model(x).logits, ref(x).logits, rtol=0, atol=1e-10)
    assert torch.allclose(model.model.layers[0].self_attn.k_proj.weight,
                          ref.model.layers[0].self_attn.k_proj.weight * s)


def test_what_cannot_fold_is_a_model_error():
    scales = _scales(torch.Generator().manual_seed(4))
    bad = dict(scales)
    bad["model.layers.0.self_attn.k_proj"] = scales["model.layers.0.self_attn.k_proj"] * 2
    with pytest.raises(ModelError, match="other AWQ scales"):
        fold_scales_(_model(), bad, CFG)
    bad = {"model.layers.0.self_attn.o_proj": torch.rand(CFG.hidden_size, dtype=torch.float64) + 0.5}
    with pytest.raises(ModelError, match="differ between query heads that share a kv head"):
        fold_scales_(_model(), bad, CFG)
    model = _model().float()
    pack_linear_(convert_weight_only_(model.model.layers[0].mlp.up_proj, 4, 16))
    with pytest.raises(ModelError, match="PackedLinear") as e:
        fold_scales_(model, {"model.layers.0.mlp.down_proj": torch.ones(CFG.intermediate_size)}, CFG)
    assert "before any step that quantizes" in str(e.value)
    with pytest.raises(ModelError, match="no op before it"):
        fold_scales_(nn.Module(), {"head": torch.ones(3)}, CFG)


def test_attention_heads_reads_both_config_kinds():
    from types import SimpleNamespace

    assert attention_heads(CFG) == (4, 2)
    assert attention_heads(SimpleNamespace(num_attention_heads=9, num_key_value_heads=3)) == (9, 3)
    assert attention_heads(SimpleNamespace(num_attention_heads=8)) == (8, 8)
    assert attention_heads(None) == (None, None)
