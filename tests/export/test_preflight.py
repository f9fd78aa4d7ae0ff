"""Pre-flight of the open formats (``check_recipe``): a recipe whose result a format cannot hold is
an ExportError naming the nearest scheme that fits, before any compression runs."""

from __future__ import annotations

import pytest
import torch
import transformers

from nnsqueeze.errors import ExportError
from nnsqueeze.export.hf_formats import check_recipe


@pytest.fixture(scope="module")
def smol_shaped():
    """One block shaped like SmolLM2-135M (hidden 576, MLP 1536, GQA 9/3), random weights."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=576, intermediate_size=1536, num_hidden_layers=1,
                                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=32,
                                   tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg).eval()


def _error(model, recipe, fmt):
    with pytest.raises(ExportError) as e:
        check_recipe(model, recipe, fmt)
    return " ".join(str(e.value).split())


def test_g128_on_576_inputs_names_group_64(smol_shaped):
    before = {k: v.clone() for k, v in smol_shaped.state_dict().items()}
    msg = _error(smol_shaped, "w4-g128-gptq", "compressed-tensors")
    assert "steps[0].gptq.group_size" in msg and "group_size 128 does not divide" in msg and "(576)" in msg
    assert "group_size 64 divides every selected layer's inputs (576, 1536)" in msg
    assert all(torch.equal(v, before[k]) for k, v in smol_shaped.state_dict().items())   # nothing ran
    check_recipe(smol_shaped, [{"gptq": {"bits": 4, "group_size": 64}}], "compressed-tensors")   # the fix fits


def test_no_power_of_two_group_fits_names_per_row(smol_shaped):
    msg = _error(smol_shaped, [{"rtn": {"bits": 4, "group_size": 128, "targets": ["model.layers.0.mlp.down_proj",
                                                                                     "re:.*q_proj"]}}], "gptq")
    assert "set scale_dtype: fp16" in msg   # gptq's fp16 scales come first
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=40, intermediate_size=72, num_hidden_layers=1,
                                   num_attention_heads=4, max_position_embeddings=32)
    msg = _error(transformers.LlamaForCausalLM(cfg), [{"rtn": {"bits": 4, "group_size": 32}}], "compressed-tensors")
    assert "use group_size: null" in msg and "(40, 72)" in msg


@pytest.mark.parametrize("recipe, fmt, words", [
    ("w4-g128-gptq", "gguf", "gptq: {bits: 4, group_size: 32, symmetric: true, scale_dtype: fp16}"),
    ([{"rtn": {"bits": 8, "group_size": 32, "symmetric": False, "scale_dtype": "fp16"}}], "gguf",
     "rtn: {bits: 8, group_size: 32, symmetric: true, scale_dtype: fp16}"),
    ([{"rtn": {"bits": 4, "group_size": 64}}], "gptq", "steps[0].rtn.scale_dtype"),
    ([{"rtn": {"bits": 4, "group_size": 64, "scale_dtype": "fp16"}},
      {"rtn": {"bits": 8, "group_size": 64, "scale_dtype": "fp16", "targets": ["lm_head"]}}], "gptq",
     "one scheme per checkpoint"),
    ("w4-g128-quarot-gptq", "compressed-tensors", "use online_hadamard: false"),
    ([{"awq": {"pack": True, "group_size": 64}}], "compressed-tensors", "set share_scales: true"),
    ([{"awq": {"pack": True, "group_size": 64, "share_scales": True, "ignore": ["re:.*k_proj"]}}],
     "compressed-tensors", "select (or ignore) q/k/v together"),
    ([{"quantize": {}}], "compressed-tensors", "step 'quantize' leaves layers it cannot hold"),
    ([{"rtn": {"bits": 4, "group_size": 64, "pack": False}}], "compressed-tensors", "no step packs weights"),
    ("w4-g128-gptq", "onnx", "unknown format 'onnx'"),
])
def test_schemes_the_format_cannot_hold(smol_shaped, recipe, fmt, words):
    assert words in _error(smol_shaped, recipe, fmt)


@pytest.mark.parametrize("recipe, fmt", [
    ([{"rotate": {"online_hadamard": False, "rotation": "random"}}, {"rtn": {"bits": 4, "group_size": 64}}],
     "compressed-tensors"),
    ([{"awq": {"pack": True, "group_size": 64, "share_scales": True, "scale_dtype": "fp16"}}], "gptq"),
    ([{"sparsegpt": {}}, {"gptq": {"bits": 8, "group_size": 32, "scale_dtype": "fp16"}}], "gguf"),
    ([{"rtn": {"bits": 4, "group_size": 64}}, {"rtn": {"bits": 8, "group_size": None, "targets": ["lm_head"]}}],
     "compressed-tensors"),
])
def test_recipes_that_fit_pass(smol_shaped, recipe, fmt):
    check_recipe(smol_shaped, recipe, fmt)


def test_gguf_needs_llama(smol_shaped):
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    assert "not 'gpt2'" in _error(gpt2, [{"rtn": {"bits": 4, "group_size": 32, "scale_dtype": "fp16"}}], "gguf")


def test_fit_groups_gives_576_wide_layers_group_64_for_compressed_tensors(smol_shaped):
    """The CLI's --format compressed-tensors with w4-g128-gptq on SmolLM2's shapes: the step gets
    ``uneven_groups: smaller`` (q/k/v/o/gate/up: 64; down_proj, 1536 inputs: 128) and then fits."""
    from nnsqueeze.export.preflight import fit_groups
    from nnsqueeze.recipe import load_recipe

    r = load_recipe("w4-g128-gptq")
    (msg,) = fit_groups(smol_shaped, r, "compressed-tensors")
    assert "steps[0].gptq: group_size 128 does not divide the inputs of 6 layers" in msg
    assert "576 inputs: group_size 64" in msg and "uneven_groups: short" in msg
    c = r.steps[0].config
    assert c.uneven_groups == "smaller" and c.group_for(576) == 64 and c.group_for(1536) == 128
    check_recipe(smol_shaped, r, "compressed-tensors")   # now fits
    assert fit_groups(smol_shaped, r, "compressed-tensors") == []   # set: left alone
    for fmt in ("gptq", "gguf"):   # one group size per checkpoint: not changed, refused by check_recipe
        r = load_recipe("w4-g128-gptq")
        assert fit_groups(smol_shaped, r, fmt) == [] and r.steps[0].config.uneven_groups == "short"


def test_uneven_groups_short_set_in_the_recipe_is_refused_with_both_fixes(smol_shaped):
    from nnsqueeze.export.preflight import fit_groups
    from nnsqueeze.recipe import load_recipe

    r = load_recipe([{"gptq": {"bits": 4, "group_size": 128, "pack": True, "uneven_groups": "short"}}])
    assert fit_groups(smol_shaped, r, "compressed-tensors") == []
    msg = _error(smol_shaped, r, "compressed-tensors")
    assert "use group_size 64" in msg and "or uneven_groups: smaller" in msg


def test_uneven_groups_smaller_is_refused_by_one_group_formats(smol_shaped):
    msg = _error(smol_shaped, [{"rtn": {"bits": 4, "group_size": 128, "scale_dtype": "fp16",
                                        "uneven_groups": "smaller"}}], "gptq")
    assert "steps[0].rtn.uneven_groups" in msg and "several group sizes and gptq holds one" in msg
