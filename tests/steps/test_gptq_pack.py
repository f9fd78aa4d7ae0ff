"""``rtn`` / ``gptq`` with ``pack: true``: WeightOnlyLinear modules holding the algorithm's exact
codes, packed int4 in the artifact, rebuilt by ``nsq.load``; logits equal the simulated model."""

from __future__ import annotations


import json

import pytest
import torch
from safetensors.torch import load_file

import nnsqueeze as nsq
from nnsqueeze.errors import RecipeError
from nnsqueeze.llm.tiny import TinyLlama, TinyLlamaConfig
from nnsqueeze.quant.weight_only import WeightOnlyLinear
from nnsqueeze.recipe import load_recipe

VOCAB = 97
FAST = {"warmup": 0, "runs": 1, "per_step": False}   # latency is not under test here


def tiny():
    torch.manual_seed(0)
    return TinyLlama(TinyLlamaConfig(vocab_size=VOCAB)).eval()


def hf_llama():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (optional extra)")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def data(n=2, b=2, t=16):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, VOCAB, (b, t), generator=g) for _ in range(n)]


IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def compress(build, step, cfg):
    res = nsq.compress(build(), {"version": 1, "steps": [{step: cfg}], "export": {"onnx": None}, "evaluate": FAST},
                       calib_data=data(),
                       metric=None, progress=False)
    return res


CASES = [("rtn", {"bits": 4, "group_size": 32}),
         ("rtn", {"bits": 4, "group_size": None, "symmetric": False}),
         ("gptq", {"bits": 4, "group_size": 32, "act_order": True, "samples": 4}),
         ("gptq", {"bits": 4, "group_size": 16, "symmetric": False, "samples": 4}),
         ("gptq", {"bits": 8, "group_size": 64, "samples": 4})]


@pytest.mark.parametrize("build", [tiny, hf_llama], ids=["tiny", "hf-llama"])
@pytest.mark.parametrize("step,cfg", CASES, ids=[f"{s}-{i}" for i, (s, _) in enumerate(CASES)])
def test_packed_equals_simulated_and_round_trips(build, step, cfg, tmp_path):
    sim = compress(build, step, {**cfg, "pack": False}).model
    res = compress(build, step, {**cfg, "pack": True})
    packed = res.model
    wol = {n: m for n, m in packed.named_modules() if isinstance(m, WeightOnlyLinear)}
    assert len(wol) == 14 and not any("lm_head" in n for n in wol)          # 2 blocks x 7 Linears
    assert not any(isinstance(m, WeightOnlyLinear) for m in sim.modules())
    ref = logits(sim)
    assert (logits(packed) - ref).abs().max() < 1e-4
    for n, m in wol.items():                                                 # exactly the simulated weights
        assert torch.equal(m.dequantized_weight(), sim.get_submodule(n).weight)

    res.save(tmp_path / "a")
    sd = load_file(tmp_path / "a" / "model.safetensors")
    bits = cfg["bits"]
    for n, m in wol.items():
        w = sd[f"{n}.weight"]
        assert w.dtype == torch.uint8 and w.numel() == m.in_features * m.out_features * bits // 8
        assert torch.equal(m.weight, w)                          # in memory: the same packed bytes
    loaded = nsq.load(tmp_path / "a", model=build())
    assert sum(isinstance(m, WeightOnlyLinear) for m in loaded.modules()) == 14
    assert torch.equal(logits(loaded), logits(packed))


def test_int4_bytes_are_an_eighth_of_fp32(tmp_path):
    res = compress(tiny, "rtn", {"bits": 4, "group_size": 32})
    res.save(tmp_path / "a")
    sd = load_file(tmp_path / "a" / "model.safetensors")
    names = [n for n, m in res.model.named_modules() if isinstance(m, WeightOnlyLinear)]
    fp32 = sum(res.model.get_submodule(n).in_features * res.model.get_submodule(n).out_features * 4 for n in names)
    codes = sum(sd[f"{n}.weight"].numel() for n in names)
    extra = sum(sd[f"{n}.weight_scale_"].numel() * 4 + sd[f"{n}.weight_zero_point_"].numel() for n in names)
    assert codes * 8 == fp32                                 # two int4 codes per byte
    assert (codes + extra) / fp32 < 0.125 + 0.04             # scales (fp32) + zero points per 32 inputs


def test_generate_from_loaded_hf_model(tmp_path):
    cfg = {"bits": 4, "group_size": 32, "samples": 4}
    sim = compress(hf_llama, "gptq", {**cfg, "pack": False}).model
    res = compress(hf_llama, "gptq", cfg)
    res.save(tmp_path / "a")
    loaded = nsq.load(tmp_path / "a", model=hf_llama())
    prompt = IDS[:1, :5]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    out = loaded.generate(prompt, **kw)
    assert out.shape == (1, 11)
    assert torch.equal(out, sim.generate(prompt, **kw))


def test_pack_restrictions_are_recipe_errors():
    with pytest.raises(RecipeError, match="pack"):
        load_recipe([{"gptq": {"bits": 3}}])
    with pytest.raises(RecipeError, match="power of two"):
        load_recipe([{"rtn": {"group_size": 100}}])
    load_recipe([{"rtn": {"bits": 3, "group_size": 100, "pack": False}}])   # simulated: any grid


def test_preset_and_old_records_without_pack():
    r = load_recipe("w4-g128-gptq")
    c = r.steps[0].config
    assert (r.steps[0].name, c.bits, c.group_size, c.pack) == ("gptq", 4, 128, True)
    from nnsqueeze.registry import STEPS
    m = tiny()
    assert STEPS.get("gptq").rebuild(m, c, {"layers": ["model.layers.0.mlp.up_proj"], "bits": 4,
                                            "group_size": 128, "symmetric": True}) is m
    assert not any(isinstance(x, WeightOnlyLinear) for x in m.modules())


def test_gpt2_conv1d_is_packed_as_linear(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (optional extra)")

    def gpt2():
        torch.manual_seed(0)
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg).eval()

    cfg = {"bits": 4, "group_size": 32, "samples": 4}
    sim = compress(gpt2, "gptq", {**cfg, "pack": False}).model
    res = compress(gpt2, "gptq", cfg)
    res.save(tmp_path / "a")
    loaded = nsq.load(tmp_path / "a", model=gpt2())
    assert sum(isinstance(m, WeightOnlyLinear) for m in loaded.modules()) == 8   # c_attn, c_proj, c_fc, c_proj
    assert (logits(loaded) - logits(sim)).abs().max() < 1e-4


def test_scale_dtype_fp16_packs_fp16_scales_and_bad_value_is_a_recipe_error():
    res = compress(tiny, "gptq", {"bits": 4, "group_size": 32, "samples": 4, "scale_dtype": "fp16"})
    wol = [m for m in res.model.modules() if isinstance(m, WeightOnlyLinear)]
    assert len(wol) == 14
    assert all(torch.equal(m.weight_scale_.half().float(), m.weight_scale_) for m in wol)
    assert res.records[0]["record"]["scale_dtype"] == "fp16"
    with pytest.raises(RecipeError, match="scale_dtype"):
        load_recipe({"version": 1, "steps": [{"rtn": {"scale_dtype": "fp8"}}]})


def test_clip_option_packs_records_and_bad_values_are_recipe_errors(tmp_path):
    cfg = {"bits": 4, "group_size": 32, "samples": 4, "clip": {"method": "mse", "grid": 10, "min_ratio": 0.6}}
    res = compress(tiny, "gptq", cfg)
    res.save(tmp_path / "a")
    rec = json.loads((tmp_path / "a" / "nnsqueeze.json").read_text())["steps"][0]["record"]
    assert rec["clip"] == {"method": "mse", "grid": 10, "min_ratio": 0.6, "weighted": None}
    assert torch.equal(logits(nsq.load(tmp_path / "a", model=tiny())), logits(res.model))
    for step_name, bad in [("gptq", {"clip": {"method": "percentile"}}), ("gptq", {"clip": {"grid": 1}}),
                           ("gptq", {"clip": {"min_ratio": 1.0}}), ("rtn", {"clip": {"weighted": True}}),
                           ("awq", {"clip": {"method": "mse"}})]:
        with pytest.raises(RecipeError):
            load_recipe({"version": 1, "steps": [{step_name: bad}]})
