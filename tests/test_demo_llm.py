"""``nnsqueeze demo --llm --size tiny``: the LM demo end to end through the CLI (in process, seconds)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers", reason="transformers is not installed (optional extra)")

from typer.testing import CliRunner  # noqa: E402

from nnsqueeze.cli import app  # noqa: E402


def test_demo_llm_tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    out = tmp_path / "demo"
    r = CliRunner().invoke(app, ["--quiet", "demo", "--llm", "--size", "tiny", "--out", str(out)])
    assert r.exit_code == 0, r.output[-3000:]
    assert "perplexity" in r.output and "packed int4" in r.output and "demo --llm targets" in r.output
    m = json.loads((out / "demo-llm.json").read_text())
    assert m["preset"] == "w4-g128-gptq" and m["quantized_layers"] == 14           # 2 blocks x 7 Linears
    assert m["reload_max_abs_diff"] <= 1e-4                                         # artifact == compressed model
    assert 1 < m["ppl_fp32"] < 512 and 1 < m["ppl_int4"] < 512
    assert m["eval"]["seq_len"] == 64 and m["eval"]["windows"] >= 5
    # int4 codes two per byte + one fp32 scale and a packed zero point per row (64 inputs < 128)
    assert m["quantized_fp32_bytes"] / m["quantized_packed_bytes"] > 3
    assert m["model_safetensors_bytes"] < m["model_fp32_bytes"]
    assert m["sample_int4"].startswith("Return a new list containing")
    # the packed model through the C decode loop (llm/fastdecode.py): the same greedy tokens as generate()
    assert m["c_loop_tokens_equal"] is True and m["gen_tokens_per_s_int4_c_loop"] > 0
    assert "C decode loop" in r.output
    assert (out / "nnsqueeze.json").is_file() and (out / "model.safetensors").is_file()


def test_demo_size_is_checked():
    r = CliRunner().invoke(app, ["demo", "--llm", "--size", "huge"])
    assert r.exit_code == 2 and "--size" in r.output
    r = CliRunner().invoke(app, ["demo", "--size", "tiny"])
    assert r.exit_code == 2 and "--llm" in r.output
