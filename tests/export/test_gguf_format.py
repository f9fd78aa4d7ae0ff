"""GGUF export: gguf's own reader lists Q4_0 / Q8_0 tensors whose dequantization (gguf.quants) equals
nnsqueeze's weights once the q/k rows are un-permuted; metadata and tokenizer are in the file."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from nnsqueeze.errors import ExportError
from nnsqueeze.export.gguf_format import gguf_name, rope_rows
from nnsqueeze.export.hf_formats import save_pretrained
from nnsqueeze.llm.packed import PackedLinear
from llm_fixtures import packed, tokenizer  # noqa: F401 - pytest fixtures


def _field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize("bits,qtype", [(4, "Q4_0"), (8, "Q8_0")])
def test_gguf_tensors_dequantize_to_nnsqueeze_weights(packed, tokenizer, tmp_path, bits, qtype):
    res = packed(bits, 32, True, "fp16")
    out = res.save(tmp_path / "gg", format="gguf", tokenizer=tokenizer)
    reader = gguf.GGUFReader(out / "model.gguf")
    tensors = {t.name: t for t in reader.tensors}
    layers = {n: m for n, m in res.model.named_modules() if isinstance(m, PackedLinear)}
    assert len(layers) == 14
    for name, m in layers.items():
        t = tensors[gguf_name(f"{name}.weight")]
        assert t.tensor_type.name == qtype
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))
        heads = {"q_proj": 4, "k_proj": 2}.get(name.rsplit(".", 1)[1])
        if heads:                                       # undo llama.cpp's rotary row order
            w = w[torch.argsort(rope_rows(m.out_features, heads))]
        assert torch.equal(w, m.dequantized_weight()), name
    for key in ("output.weight", "token_embd.weight", "output_norm.weight", "blk.1.ffn_norm.weight"):
        assert tensors[key].tensor_type.name == "F32"
    assert np.array_equal(np.array(tensors["output.weight"].data), res.model.lm_head.weight.detach().numpy())
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "llama.block_count") == 2 and _field(reader, "llama.attention.head_count_kv") == 2
    assert _field(reader, "general.file_type") == (2 if bits == 4 else 7)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == 97 and tokens[1] == "<s>" and _field(reader, "tokenizer.ggml.bos_token_id") == 1
    assert _field(reader, "tokenizer.ggml.model") == "gpt2" and _field(reader, "tokenizer.ggml.merges")[0] == "e e"


def test_f16_float_tensors(packed, tmp_path):
    out = save_pretrained(packed(4, 32, True, "fp16").model, tmp_path / "gg", format="gguf", float_type="f16")
    tensors = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out / "model.gguf").tensors}
    assert tensors["token_embd.weight"] == "F16" and tensors["output_norm.weight"] == "F32"


@pytest.mark.parametrize("scheme,fix", [
    ((4, 128, False, "fp16"), "rtn: {bits: 4, group_size: 32, symmetric: true, scale_dtype: fp16}"),
    ((8, None, True, "fp16"), "rtn: {bits: 8, group_size: 32, symmetric: true, scale_dtype: fp16}"),
    ((4, 32, True, "fp32"), "rtn: {bits: 4, group_size: 32, symmetric: true, scale_dtype: fp16}")])
def test_schemes_gguf_cannot_hold_name_the_nearest_fit(packed, tmp_path, scheme, fix):
    with pytest.raises(ExportError) as e:
        packed(*scheme).save(tmp_path / "gg", format="gguf")
    assert fix in str(e.value)
    assert list(tmp_path.iterdir()) == []
