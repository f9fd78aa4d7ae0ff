"""`nnsqueeze compress` on a Hugging Face directory and a text file, out as an open format: a real
subprocess on a tiny random LLaMA (tests/tiny_llm.py), no network."""

import json
import subprocess
import sys

import pytest

import tiny_llm

RECIPE = """version: 1
steps:
  - gptq: {bits: 4, group_size: 32, samples: 4}
export: {onnx: null}
evaluate: {warmup: 0, runs: 1, per_step: false}
"""


def nsq(*args, cwd):
    return subprocess.run([sys.executable, "-m", "nnsqueeze", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_hf")
    tiny_llm.write_hf_dir(d / "llm")
    (d / "text.txt").write_text("\n".join(tiny_llm.SENTENCES * 40))
    (d / "r.yaml").write_text(RECIPE)
    (d / "build.py").write_text("import torch\ndef build():\n    return torch.nn.Linear(4, 4)\n")
    return d


def test_hf_dir_and_text_file_to_compressed_tensors(work):
    p = nsq("compress", "--model", "llm", "--data", "text.txt", "--seq-len", "32", "--samples", "4",
            "--recipe", "r.yaml", "--format", "compressed-tensors", "--out", "ct", cwd=work)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "perplexity" in p.stdout  # the metric defaults to perplexity for a causal LM on text
    out = work / "ct"
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["config_groups"]["group_0"]["weights"]["group_size"] == 32
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()


@pytest.mark.parametrize("args, words", [
    (["--model", "build.py:build", "--data", "text.txt"], "only a Hugging Face --model brings a tokenizer"),
    (["--model", "build.py:build", "--task", "causal-lm", "--data", "text.txt"], "--task"),
    (["--model", "llm", "--data", "text.txt", "--format", "onnx-int3"], "unknown format 'onnx-int3'"),
    (["--model", "llm", "--task", "translation", "--data", "text.txt"], "unknown task 'translation'"),
    (["--model", "nowhere/llm", "--data", "text.txt"], "no such file or directory"),
    (["--model", "llm", "--data", "missing.txt"], "missing.txt"),
])
def test_bad_hf_inputs_exit_2_without_writing(work, args, words):
    p = nsq("compress", *args, "--recipe", "r.yaml", "--out", "bad", cwd=work)
    assert p.returncode == 2, p.stderr[-2000:]
    assert words in " ".join(p.stderr.split()) and "Traceback" not in p.stderr
    assert not (work / "bad").exists()


def test_scheme_the_format_cannot_hold_fails_before_the_run(work):
    (work / "g64.yaml").write_text(RECIPE.replace("group_size: 32", "group_size: 64"))
    p = nsq("compress", "--model", "llm", "--data", "text.txt", "--seq-len", "32", "--samples", "4",
            "--recipe", "g64.yaml", "--format", "gguf", "--out", "bad", cwd=work)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    msg = " ".join(p.stderr.split())
    assert "steps[0].gptq" in msg and "gptq: {bits: 4, group_size: 32, symmetric: true, scale_dtype: fp16}" in msg
    assert "perplexity" not in p.stdout and not (work / "bad").exists()   # refused before any run or write


def test_group_the_format_lacks_is_fitted_for_compressed_tensors_and_reported(work):
    """group_size 64 leaves the tiny LLaMA's down_proj (96 inputs) a short group: --format compressed-tensors
    gives those layers group 32 (warned, reported, in the checkpoint); a recipe that says
    uneven_groups: short is refused before the run."""
    (work / "g64.yaml").write_text(RECIPE.replace("group_size: 32", "group_size: 64"))
    p = nsq("compress", "--model", "llm", "--data", "text.txt", "--seq-len", "32", "--samples", "4",
            "--recipe", "g64.yaml", "--format", "compressed-tensors", "--out", "ct-g64", cwd=work)
    assert p.returncode == 0, p.stderr[-2000:]
    err = " ".join(p.stderr.split())
    assert "steps[0].gptq: group_size 64 does not divide the inputs of 2 layers" in err
    assert "(96 inputs: group_size 32)" in err
    qc = json.loads((work / "ct-g64" / "config.json").read_text())["quantization_config"]
    assert sorted(g["weights"]["group_size"] for g in qc["config_groups"].values()) == [32, 64]
    report = json.loads((work / "ct-g64" / "nnsqueeze_report.json").read_text())
    assert any("use group_size 32" in str(r) for r in report["skipped"] + report["notes"])
    (work / "short.yaml").write_text(RECIPE.replace("group_size: 32", "group_size: 64, uneven_groups: short"))
    p = nsq("compress", "--model", "llm", "--data", "text.txt", "--seq-len", "32", "--samples", "4",
            "--recipe", "short.yaml", "--format", "compressed-tensors", "--out", "bad", cwd=work)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "or uneven_groups: smaller" in " ".join(p.stderr.split()) and not (work / "bad").exists()


FP8_RECIPE = """version: 1
steps:
  - quantize: {weights: {format: WFMT, granularity: per-channel},
               activations: {format: fp8-e4m3, dynamic: true, granularity: per-token}}
export: {onnx: null}
evaluate: {warmup: 0, runs: 1, per_step: false}
"""


def test_fp8_to_compressed_tensors_float_quantized(work):
    (work / "fp8.yaml").write_text(FP8_RECIPE.replace("WFMT", "fp8-e4m3"))
    p = nsq("compress", "--model", "llm", "--data", "text.txt", "--seq-len", "32", "--samples", "4",
            "--recipe", "fp8.yaml", "--format", "compressed-tensors", "--out", "ct-fp8", cwd=work)
    assert p.returncode == 0, p.stderr[-2000:]
    qc = json.loads((work / "ct-fp8" / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    assert qc["format"] == "float-quantized" and group["weights"]["strategy"] == "channel"
    assert group["input_activations"]["strategy"] == "token" and group["input_activations"]["dynamic"] is True

