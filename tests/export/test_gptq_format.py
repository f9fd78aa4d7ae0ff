"""GPTQ export: the layout read back with the GPTQ dequantization formula, written here independently
(unpack int32 nibbles/bytes, ``(q - z) * s`` with v1's ``z = qzeros + 1``), equals nnsqueeze's weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from nnsqueeze.errors import ExportError
from nnsqueeze.export.hf_formats import save_pretrained
from nnsqueeze.llm.packed import PackedLinear
from llm_fixtures import packed  # noqa: F401 - pytest fixtures


def unpack(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> codes, ``32 / bits`` per word along ``dim``, lowest bits first."""
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int64) * bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    if dim == 0:   # (K / per, N) -> (K, N)
        return ((w.unsqueeze(1) >> shifts.view(1, per, 1)) & ((1 << bits) - 1)).reshape(-1, w.shape[1])
    return ((w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(w.shape[0], -1)


@pytest.mark.parametrize("bits,group,sym", [(4, 32, True), (4, 16, False), (8, None, True), (8, 32, False)])
def test_gptq_layout_dequantizes_to_nnsqueeze_weights(packed, tmp_path, bits, group, sym):
    res = packed(bits, group, sym, "fp16")
    out = res.save(tmp_path / "gptq", format="gptq")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == bits and qc["sym"] is sym and qc["desc_act"] is False
    assert qc["group_size"] == (group or -1)
    assert qc["checkpoint_format"] == ("gptq" if sym else "gptq_v2")
    sd = load_file(out / "model.safetensors")
    layers = {n: m for n, m in res.model.named_modules() if isinstance(m, PackedLinear)}
    assert len(layers) == 14
    for name, m in layers.items():
        qweight, qzeros, scales, g_idx = (sd[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx"))
        assert qweight.dtype == qzeros.dtype == g_idx.dtype == torch.int32 and scales.dtype == torch.float16
        q = unpack(qweight, bits, 0)                                         # (K, N)
        z = unpack(qzeros, bits, 1) + (1 if sym else 0)                      # (G, N); v1 stores z - 1
        g = g_idx.long()
        w = (q.float() - z[g].float()) * scales.float()[g]                   # (K, N)
        assert torch.equal(w.T, m.dequantized_weight()), name
    assert torch.equal(sd["lm_head.weight"], res.model.lm_head.weight)


def test_fp32_scales_are_refused_before_writing(packed, tmp_path):
    res = packed(4, 32, True, "fp32")
    with pytest.raises(ExportError, match="scale_dtype: fp16") as e:
        save_pretrained(res.model, tmp_path / "gptq", format="gptq")
    assert "rtn: {bits: 4, group_size: 32, symmetric: true, scale_dtype: fp16}" in str(e.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bits,group,sym", [(4, 32, True), (4, 16, False), (8, 32, False)])
def test_fp16_exact_scales_dequantize_equal_in_fp16_arithmetic(packed, tmp_path, bits, group, sym):
    """gptqmodel's CPU kernels compute ``(q - z) * s`` in fp16 (the scales' dtype). With
    ``scale_dtype: fp16-exact`` that fp16 product equals nnsqueeze's float32 weight for every weight;
    with plain fp16 scales it does not (the product needs up to 15 significant bits)."""
    def fp16_dequant(res):
        out = res.save(tmp_path / f"gptq-{id(res)}", format="gptq")
        sd = load_file(out / "model.safetensors")
        for name, m in ((n, m) for n, m in res.model.named_modules() if isinstance(m, PackedLinear)):
            q = unpack(sd[f"{name}.qweight"], bits, 0)
            z = unpack(sd[f"{name}.qzeros"], bits, 1) + (1 if sym else 0)
            g = sd[f"{name}.g_idx"].long()
            yield name, m, ((q - z[g]).half() * sd[f"{name}.scales"][g]).float()   # fp16 multiply

    for name, m, w16 in fp16_dequant(packed(bits, group, sym, "fp16-exact")):
        assert torch.equal(w16.T, m.dequantized_weight()), name
    assert any(not torch.equal(w16.T, m.dequantized_weight())
               for _, m, w16 in fp16_dequant(packed(bits, group, sym, "fp16")))
