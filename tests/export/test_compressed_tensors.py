"""compressed-tensors ``pack-quantized`` export: transformers loads it to the same logits and greedy
tokens (symmetric), and compressed-tensors' own decompressor gives nnsqueeze's weights bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationConfig
from safetensors.torch import load_file

from nnsqueeze.export.hf_formats import save_pretrained
from nnsqueeze.llm.packed import PackedLinear
from llm_fixtures import ids, packed, tokenizer  # noqa: F401 - pytest fixtures


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}


@pytest.mark.parametrize("bits,group", [(4, 32), (8, None)], ids=["int4-g32", "int8-channel"])
def test_transformers_loads_bit_equal_logits_and_tokens(packed, tokenizer, ids, tmp_path, bits, group):
    res = packed(bits, group, True)
    out = res.save(tmp_path / "ct", format="compressed-tensors", tokenizer=tokenizer)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any(isinstance(m, PackedLinear) for m in loaded.modules())
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, res.model(ids).logits)      # measured: bit-equal
        kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=0)
        assert torch.equal(loaded.generate(ids[:1], **kw), res.model.generate(ids[:1], **kw))
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("seat").input_ids == tokenizer("seat").input_ids


@pytest.mark.parametrize("bits,group,sym", [(4, 32, False), (4, None, False), (8, 32, False), (4, 16, True)])
def test_decompressor_gives_nnsqueeze_weights(packed, tmp_path, bits, group, sym):
    """compressed-tensors' own PackedQuantizationCompressor reads every layer back exactly (asymmetric
    included: transformers 5 + compressed-tensors 0.20 cannot build asymmetric pack-quantized models
    on CPU, their meta-device initialisation expects unpacked zero points)."""
    res = packed(bits, group, sym)
    out = save_pretrained(res.model, tmp_path / "ct", format="compressed-tensors")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    config = QuantizationConfig.model_validate(qc)
    assert config.format == "pack-quantized" and config.ignore == ["lm_head"]
    (group_cfg,) = config.config_groups.values()
    assert group_cfg.weights.symmetric is sym and group_cfg.weights.strategy == ("group" if group else "channel")
    sd = load_file(out / "model.safetensors")
    layers = _layers(res.model)
    assert set(group_cfg.targets) == set(layers)
    for name, m in layers.items():
        part = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
        assert part["weight_packed"].dtype == torch.int32
        assert part["weight_packed"].shape == (m.out_features, m.in_features * bits // 32)
        assert ("weight_zero_point" in part) is (not sym)
        w = PackedQuantizationCompressor.decompress(part, group_cfg)["weight"]
        assert torch.equal(w, m.dequantized_weight()), name
    assert torch.equal(sd["lm_head.weight"], res.model.lm_head.weight)


def test_uneven_groups_smaller_loads_bit_equal_with_two_group_sizes(tokenizer, ids, tmp_path):
    """group_size 64 on the tiny LLaMA's down_proj (96 inputs) leaves a short group, which compressed-tensors
    cannot hold; ``uneven_groups: smaller`` gives that layer group 32 (the others keep 64). The checkpoint has
    one config group per size, and transformers loads it to nnsqueeze's logits and greedy tokens bit for bit.
    The nnsqueeze artifact reloads to the same packed layers too."""
    import nnsqueeze as nsq
    from llm_fixtures import hf_llama

    step = {"rtn": {"bits": 4, "group_size": 64, "uneven_groups": "smaller"}}
    res = nsq.compress(hf_llama(), {"version": 1, "steps": [step], "export": {"onnx": None},
                                    "evaluate": {"warmup": 0, "runs": 1, "per_step": False}},
                       metric=None, progress=False, example_inputs=ids[:1])
    groups = {n: m.group_size for n, m in _layers(res.model).items()}
    assert {g for n, g in groups.items() if n.endswith("down_proj")} == {32}
    assert {g for n, g in groups.items() if not n.endswith("down_proj")} == {64}
    fallbacks = " ".join(str(s) for s in res.report["skipped"] + res.report["notes"])
    assert "does not divide 96 inputs, so 2 layers (model.layers.0.mlp.down_proj, model.layers.1.mlp.down_proj) " \
           "use group_size 32" in fallbacks
    out = res.save(tmp_path / "ct", format="compressed-tensors", tokenizer=tokenizer)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    sizes = sorted(g["weights"]["group_size"] for g in qc["config_groups"].values())
    assert sizes == [32, 64]
    assert "uneven_groups: smaller" in (out / "nnsqueeze_recipe.yaml").read_text()   # the run's record travels
    assert json.loads((out / "nnsqueeze_report.json").read_text())["skipped"] == res.report["skipped"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, res.model(ids).logits)
        kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=0)
        assert torch.equal(loaded.generate(ids[:1], **kw), res.model.generate(ids[:1], **kw))
    art = res.save(tmp_path / "art")
    back = nsq.load(art, hf_llama())
    assert {n: m.group_size for n, m in _layers(back).items()} == groups
    with torch.no_grad():
        assert torch.equal(back(ids).logits, res.model(ids).logits)
