"""SmoothQuant's ``statistic: range`` (llm-compressor's per-channel ``max x - min x``): the smoothing
scales equal the closed form computed here, in float64, from the float model's norm outputs; the
default (``absmax``) is unchanged; the logits are kept."""

from __future__ import annotations

import pytest
import torch

import nnsqueeze as nsq
from nnsqueeze.errors import RecipeError
from nnsqueeze.llm.tiny import TinyLlama, TinyLlamaConfig
from nnsqueeze.recipe import load_recipe

VOCAB = 71
FAST = {"warmup": 0, "runs": 1, "per_step": False}
BLOCK = "model.layers.1"


def tiny():
    torch.manual_seed(0)
    m = TinyLlama(TinyLlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=80)).eval()
    with torch.no_grad():                  # one-sided channels, as a massive activation is
        m.model.embed_tokens.weight[:, 3] = m.model.embed_tokens.weight[:, 3].abs() * 9 + 2
        m.model.embed_tokens.weight[:, 7] = -m.model.embed_tokens.weight[:, 7].abs() * 5
    return m


def batches():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, VOCAB, (2, 19), generator=g) for _ in range(3)]


def smooth(**cfg):
    steps = [{"smoothquant": {"alpha": 0.5, "samples": 6, **cfg}}]
    return nsq.compress(tiny(), {"version": 1, "steps": steps, "export": {"onnx": None}, "evaluate": FAST},
                        calib_data=batches(), metric=None, progress=False)


def reference_scales(kind: str, alpha: float = 0.5) -> dict[str, torch.Tensor]:
    """s per norm of block 1, from the float model's norm outputs (float64)."""
    m = tiny()
    outs: dict[str, list[torch.Tensor]] = {"input_layernorm": [], "post_attention_layernorm": []}
    blk = m.get_submodule(BLOCK)
    hooks = [blk.get_submodule(n).register_forward_hook(lambda mod, i, o, n=n: outs[n].append(o.double()))
             for n in outs]
    with torch.no_grad():
        for b in batches():
            m(b)
    for h in hooks:
        h.remove()
    readers = {"input_layernorm": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
               "post_attention_layernorm": ["mlp.gate_proj", "mlp.up_proj"]}
    out = {}
    for n, ys in outs.items():
        x = torch.cat([y.reshape(-1, y.shape[-1]) for y in ys])
        a = x.abs().amax(0) if kind == "absmax" else x.amax(0) - x.amin(0)
        w = torch.stack([blk.get_submodule(r).weight.detach().double().abs().amax(0) for r in readers[n]]).amax(0)
        out[n] = a.clamp(min=1e-5) ** alpha / w.clamp(min=1e-5) ** (1 - alpha)
    return out


@pytest.mark.parametrize("kind", ["absmax", "range"])
def test_scales_match_the_closed_form(kind):
    before = {n: tiny().get_submodule(f"{BLOCK}.{n}").weight.detach().double()
              for n in ("input_layernorm", "post_attention_layernorm")}
    res = smooth(**({} if kind == "absmax" else {"statistic": kind}))
    for n, s in reference_scales(kind).items():
        got = before[n] / res.model.get_submodule(f"{BLOCK}.{n}").weight.detach().double()   # the s applied
        assert torch.allclose(got, s, rtol=2e-5), (n, float(((got - s) / s).abs().max()))
    rec = res.records[0]["record"]
    assert rec.get("statistic") == (None if kind == "absmax" else "range")   # default records unchanged


def test_range_differs_on_one_sided_channels_and_keeps_logits():
    ra, rr = reference_scales("absmax"), reference_scales("range")
    s_a, s_r = ra["input_layernorm"], rr["input_layernorm"]
    ratio = s_r / s_a                 # sqrt(range / absmax): at most sqrt(2) (symmetric), <= 1 one-sided
    assert float(ratio.max()) <= 2 ** 0.5 + 1e-9 and float(ratio.min()) > 0
    assert float(ratio.max() / ratio.min()) > 1.2                   # not a constant factor: other smoothing
    ids = batches()[0]
    with torch.no_grad():
        ref = tiny()(ids).logits.double()
        got = smooth(statistic="range").model(ids).logits.double()
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-5


def test_unknown_statistic_is_a_recipe_error():
    with pytest.raises(RecipeError, match="statistic"):
        load_recipe({"version": 1, "steps": [{"smoothquant": {"statistic": "mean"}}]})
