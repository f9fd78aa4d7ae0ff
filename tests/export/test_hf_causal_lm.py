"""nsq.compress with the default ONNX export on a Hugging Face causal LM: the key/value cache is not
exported (use_cache=False), the sequence axis is dynamic, packed int4 layers become MatMulNBits."""

from __future__ import annotations

import pytest
import torch

import nnsqueeze as nsq

transformers = pytest.importorskip("transformers")


def test_packed_llama_exports_and_matches_in_ort(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, 97, (2, 16), generator=g) for _ in range(2)]
    evals = [torch.randint(0, 97, (3, 11), generator=g)]  # another batch size and length
    recipe = {"version": 1, "steps": [{"rtn": {"bits": 4, "group_size": 32, "pack": True}}],
              "evaluate": {"runs": 2, "warmup": 0}}
    res = nsq.compress(model, recipe, calib_data=calib, eval_data=evals, metric=lambda m, d: 0.0)
    exp = res.report["export"]
    for side in ("baseline", "compressed"):
        assert exp[side]["max_abs_diff"] <= exp[side]["tolerance"] <= 1e-3
        assert exp[side]["verified_batches"] >= 2
    assert exp["compressed"]["ort_int8_ops"].get("MatMulNBits", 0) == 14   # 7 Linears x 2 blocks
    res.save(tmp_path / "out")
    assert (tmp_path / "out" / "model.onnx").stat().st_size < exp["baseline"]["size_bytes"]
