"""AWQ-packed models in the open formats: input scales folded into the norms / previous rows give the
packed AWQ model's logits (within float rounding) from what each format stores; scales that cannot
fold are an ExportError before anything is written."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

from nnsqueeze.errors import ExportError
from nnsqueeze.export.awq_fold import fold_awq
from nnsqueeze.export.gguf_format import gguf_name, rope_rows
from nnsqueeze.export.hf_formats import save_pretrained
from nnsqueeze.llm.packed import PackedLinear
from llm_fixtures import awq_packed, ids  # noqa: F401 - pytest fixtures

# fp32 scales: the norm / row divisions round in float32. fp16 formats also round the folded
# up_proj / v_proj group scales to float16 (relative weight change <= 2**-11).
TOL = {"compressed-tensors": 1e-5, "gptq": 2e-3, "gguf": 2e-3}


def _gptq_float(out, cfg):
    """A float LLaMA from a GPTQ checkpoint by the GPTQ formula ``(q - z) * s`` (gptqmodel's)."""
    sd, model = load_file(out / "model.safetensors"), transformers.LlamaForCausalLM(cfg).eval()
    dense = {k: v for k, v in sd.items() if k.rsplit(".", 1)[1] not in ("qweight", "qzeros", "scales", "g_idx")}
    for key in [k for k in sd if k.endswith(".qweight")]:
        name = key[: -len(".qweight")]
        shifts = torch.arange(8) * 4
        q = ((sd[key].unsqueeze(1) >> shifts.view(1, 8, 1)) & 15).reshape(-1, sd[key].shape[1])      # (K, N)
        qz = sd[f"{name}.qzeros"]
        z = ((qz.unsqueeze(2) >> shifts.view(1, 1, 8)) & 15).reshape(qz.shape[0], -1)
        g = sd[f"{name}.g_idx"].long()
        dense[f"{name}.weight"] = ((q - (z[g] + 1)) * sd[f"{name}.scales"][g].float()).T.contiguous()   # v1: z - 1
    model.load_state_dict(dense, strict=False)
    return model


def _gguf_float(out, cfg):
    """A float LLaMA from the GGUF file: gguf's dequantization, llama.cpp's q/k row order undone."""
    reader = gguf.GGUFReader(out / "model.gguf")
    tensors = {t.name: t for t in reader.tensors}
    model = transformers.LlamaForCausalLM(cfg).eval()
    sd = {}
    for key, v in model.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        t = tensors[gguf_name(key)]
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type))).float().reshape(v.shape)
        heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}.get(key.split(".")[-2])
        if heads:
            w = w[torch.argsort(rope_rows(w.shape[0], heads))]
        sd[key] = w
    model.load_state_dict(sd, strict=False)
    return model


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq", "gguf"])
def test_awq_exports_give_the_packed_models_logits(fmt, awq_packed, ids, tmp_path):
    model = awq_packed()
    scaled = [n for n, m in model.named_modules() if isinstance(m, PackedLinear) and "input_scale_" in m._buffers]
    assert len(scaled) == 14
    with torch.no_grad():
        ref = model(ids).logits
    out = save_pretrained(model, tmp_path / "x", format=fmt)
    assert all("input_scale_" in model.get_submodule(n)._buffers for n in scaled)   # the caller's model unchanged
    if fmt == "compressed-tensors":
        loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    else:
        loaded = (_gptq_float if fmt == "gptq" else _gguf_float)(out, model.config)
    with torch.no_grad():
        got = loaded(ids).logits
    err = float((got - ref).abs().max() / ref.abs().max())
    assert err < TOL[fmt], err
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_folded_norms_carry_the_scales(awq_packed):
    model = awq_packed()
    folded = fold_awq(model)
    blk, ref = folded.model.layers[0], model.model.layers[0]
    s = ref.self_attn.q_proj.input_scale_
    assert torch.equal(ref.self_attn.k_proj.input_scale_, s)          # share_scales: one scale for q/k/v
    assert torch.allclose(blk.input_layernorm.weight, ref.input_layernorm.weight / s)
    s_o = ref.self_attn.o_proj.input_scale_.reshape(2, 2, -1)          # GQA 4/2: repeated per kv head
    assert torch.equal(s_o[:, 0], s_o[:, 1])
    assert not any("input_scale_" in m._buffers for m in folded.modules())


def test_unshared_scales_are_refused_before_writing(awq_packed, tmp_path):
    with pytest.raises(ExportError, match="share_scales: true") as e:
        save_pretrained(awq_packed(False), tmp_path / "x", format="compressed-tensors")
    assert "cannot fold into model.layers.0.input_layernorm" in str(e.value)
    assert list(tmp_path.iterdir()) == []
