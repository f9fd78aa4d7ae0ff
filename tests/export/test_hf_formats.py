"""The format dispatcher: typed errors before anything is written, atomic directories that replace
only our own exports, and fp16 scales (``scale_dtype``) kept exact."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from nnsqueeze.errors import ArtifactError, ExportError
from nnsqueeze.export.hf_formats import MARKER, pack_int32, save_pretrained
from nnsqueeze.llm.packed import PackedLinear, add_input_scale_, pack_linear_
from nnsqueeze.quant.weight_only import convert_weight_only_
from llm_fixtures import ids, llama, packed  # noqa: F401 - pytest fixtures


def test_unknown_format_and_unpacked_model_are_export_errors(packed, llama, tmp_path):
    with pytest.raises(ExportError, match="use one of: compressed-tensors, gptq, gguf"):
        save_pretrained(packed().model, tmp_path / "x", format="onnx-ish")
    with pytest.raises(ExportError, match="no packed weight-only layers") as e:
        save_pretrained(llama, tmp_path / "x", format="compressed-tensors")
    assert "pack: true" in str(e.value)
    with pytest.raises(ExportError, match="Hugging Face config"):
        save_pretrained(nn.Sequential(pack_linear_(convert_weight_only_(nn.Linear(64, 8)))), tmp_path / "x",
                        format="gptq")
    assert list(tmp_path.iterdir()) == []


def test_awq_input_scales_and_short_groups_are_refused(llama, tmp_path):
    model = llama
    lin = model.model.layers[0].self_attn.q_proj     # k/v read the same norm without scales: cannot fold
    add_input_scale_(pack_linear_(convert_weight_only_(lin, bits=4, group_size=32)), torch.full((64,), 2.0))
    with pytest.raises(ExportError, match="input scales cannot fold into model.layers.0.input_layernorm"):
        save_pretrained(model, tmp_path / "x", format="compressed-tensors")
    model = llama                                                    # reset the layer: plain again
    model.model.layers[0].self_attn.q_proj = nn.Linear(64, 64, bias=False)
    model.model.layers[0].mlp.down_proj = nn.Linear(96, 64, bias=False)
    pack_linear_(convert_weight_only_(model.model.layers[0].mlp.down_proj, bits=4, group_size=64))
    with pytest.raises(ExportError, match="not a multiple of group_size 64") as e:
        save_pretrained(model, tmp_path / "x", format="gptq")
    assert "group_size dividing 96" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_foreign_directory_is_refused_and_own_export_replaced(packed, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(ArtifactError, match="non-empty directory"):
        save_pretrained(packed().model, foreign, format="compressed-tensors")
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"] and (foreign / "notes.txt").read_text() == "keep"
    out = save_pretrained(packed().model, tmp_path / "ct", format="compressed-tensors")
    assert json.loads((out / MARKER).read_text())["format"] == "compressed-tensors"
    (out / "README.md").write_text("user notes")
    with pytest.raises(ArtifactError, match="exists already"):   # ours, but replacing needs overwrite
        save_pretrained(packed(8, None, False).model, out, format="compressed-tensors")
    save_pretrained(packed(8, None, False).model, out, format="compressed-tensors", overwrite=True)
    assert (out / "README.md").read_text() == "user notes"   # only the export's own files were replaced
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["num_bits"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct", "mine"]   # no temporary leftovers


def test_fp16_scales_are_stored_as_fp16_and_exact(packed, tmp_path):
    res = packed(4, 32, True, "fp16")
    for m in res.model.modules():
        if isinstance(m, PackedLinear):   # the step chose fp16 values (kept in a float32 buffer)
            assert m.weight_scale_.dtype == torch.float32
            assert torch.equal(m.weight_scale_.half().float(), m.weight_scale_)
    out = save_pretrained(res.model, tmp_path / "ct", format="compressed-tensors", scale_dtype="fp16")
    assert json.loads((out / MARKER).read_text())["scale_dtype"] == "fp16"
    with pytest.raises(ExportError, match="scale_dtype: fp16"):
        save_pretrained(packed().model, tmp_path / "x", format="compressed-tensors", scale_dtype="fp16")
    with pytest.raises(ExportError, match="unknown scale_dtype"):
        save_pretrained(res.model, tmp_path / "x", format="compressed-tensors", scale_dtype="fp8")


def test_pack_int32_layout():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15, 9]], dtype=torch.uint8)
    words = pack_int32(codes, 4)
    assert words.dtype == torch.int32 and words.shape == (1, 2)
    assert int(words[0, 0]) & 0xFFFFFFFF == 0xF7654321 and int(words[0, 1]) == 9
    assert pack_int32(torch.tensor([[1, 2, 3, 255]], dtype=torch.uint8), 8).tolist() == [[0xFF030201 - 2 ** 32]]


def _rtn(model, *steps):
    import nnsqueeze as nsq

    return nsq.compress(model, {"version": 1, "steps": [*steps, {"rtn": {"bits": 4, "group_size": 32,
                                                                         "scale_dtype": "fp16"}}],
                                "export": {"onnx": None}, "evaluate": {"warmup": 0, "runs": 1, "per_step": False}},
                        metric=None, progress=False, example_inputs=torch.zeros(1, 8, dtype=torch.long)).model


def test_tied_embeddings_are_stored_once_in_every_format(llama, ids, tmp_path):
    import gguf
    import transformers
    from safetensors.torch import load_file

    llama.config.tie_word_embeddings = True
    llama.lm_head.weight = llama.model.embed_tokens.weight
    model = _rtn(llama)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ct = save_pretrained(model, tmp_path / "ct", format="compressed-tensors")
    assert "lm_head.weight" not in load_file(ct / "model.safetensors")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(ct).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    gp = save_pretrained(model, tmp_path / "gptq", format="gptq")
    assert "lm_head.weight" not in load_file(gp / "model.safetensors")
    gg = save_pretrained(model, tmp_path / "gguf", format="gguf")
    names = {t.name for t in gguf.GGUFReader(gg / "model.gguf").tensors}
    assert "token_embd.weight" in names and "output.weight" not in names   # llama.cpp reuses token_embd


def test_rotated_model_exports_and_online_hook_is_refused(llama, ids, tmp_path):
    import transformers

    model = _rtn(llama, {"rotate": {"rotation": "random", "online_hadamard": False}})
    out = save_pretrained(model, tmp_path / "ct", format="compressed-tensors")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    hooked = _rtn(llama, {"rotate": {"rotation": "random", "online_hadamard": True, "online_block": "random"}})
    for fmt in ("compressed-tensors", "gptq", "gguf"):
        with pytest.raises(ExportError, match="online_hadamard: false") as e:
            save_pretrained(hooked, tmp_path / "x", format=fmt)
        assert "mlp.down_proj" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]
