"""Hugging Face directories / GGUF files and text corpora in, by path (nnsqueeze.hf_io), the
perplexity metric, and an end-to-end compress on a tiny random LLaMA written by the test."""

from __future__ import annotations

import csv
import importlib.util
import json

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed (optional extra 'hf')")

import tiny_llm  # noqa: E402
from nnsqueeze import hf_io  # noqa: E402
from nnsqueeze.errors import DataError, ModelError  # noqa: E402
from nnsqueeze.hf_io import is_model_path, is_text_path, load_model, load_text_data, read_texts  # noqa: E402
from nnsqueeze.llm.perplexity import perplexity as stream_perplexity  # noqa: E402
from nnsqueeze.metrics import get_metric  # noqa: E402

TEXT = " ".join(tiny_llm.SENTENCES * 12)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    model, tok = tiny_llm.write_hf_dir(path)
    return path, model, tok


def _snapshot(path):
    return {p.name: p.stat().st_mtime_ns for p in path.iterdir()}


# --------------------------------------------------------------------------- models

def test_load_model_causal_lm_reloads_the_saved_model(hf_dir):
    path, src, tok = hf_dir
    model, tok2 = load_model(str(path))
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    ids = torch.tensor([tok.encode(tiny_llm.SENTENCES[0])])
    assert tok2.encode(tiny_llm.SENTENCES[0]) == ids[0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, src(ids).logits, atol=0, rtol=0)


def test_load_model_explicit_task(hf_dir):
    model, _ = load_model(str(hf_dir[0]), task="feature-extraction")
    assert type(model).__name__ == "LlamaModel"


@pytest.mark.parametrize("archs,task", [(["LlamaForCausalLM"], "causal-lm"), (["GPT2LMHeadModel"], "causal-lm"),
                                        (["BertModel"], "feature-extraction"),
                                        (["BertForSequenceClassification"], "sequence-classification")])
def test_task_of(archs, task):
    assert hf_io.task_of(archs) == task


def _copy_dir(src, dst, drop=(), config=None):
    dst.mkdir()
    for p in src.iterdir():
        if p.name not in drop:
            (dst / p.name).write_bytes(p.read_bytes())
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("case,match", [
    ("missing", "no such file or directory"),
    ("no-config", "without config.json"),
    ("no-weights", "no weights"),
    ("no-tokenizer", "no usable tokenizer"),
    ("unsupported", "LlamaForTokenClassification is not supported"),
    ("no-architectures", "has no 'architectures'"),
    ("not-gguf", "not a .gguf model"),
])
def test_load_model_errors_name_the_problem_and_fix(hf_dir, tmp_path, case, match):
    src = hf_dir[0]
    path = {
        "missing": lambda: tmp_path / "nope",
        "no-config": lambda: _copy_dir(src, tmp_path / "d", drop=("config.json",)),
        "no-weights": lambda: _copy_dir(src, tmp_path / "d", drop=("model.safetensors",)),
        "no-tokenizer": lambda: _copy_dir(src, tmp_path / "d", drop=("tokenizer.json", "tokenizer_config.json",
                                                                      "special_tokens_map.json")),
        "unsupported": lambda: _copy_dir(src, tmp_path / "d",
                                         config={"architectures": ["LlamaForTokenClassification"]}),
        "no-architectures": lambda: _copy_dir(src, tmp_path / "d", config={"architectures": None}),
        "not-gguf": lambda: src / "config.json",
    }[case]()
    with pytest.raises(ModelError, match=match) as e:
        load_model(str(path))
    assert e.value.fix


def test_unknown_task_lists_the_supported_ones(hf_dir):
    with pytest.raises(ModelError, match="causal-lm, feature-extraction, sequence-classification"):
        load_model(str(hf_dir[0]), task="translation")


def test_gguf_file_loads_as_causal_lm(tmp_path):
    pytest.importorskip("gguf")
    src, tok = tiny_llm.write_gguf(tmp_path / "m.gguf")
    model, _ = load_model(str(tmp_path / "m.gguf"))
    ids = torch.tensor([tok.encode(tiny_llm.SENTENCES[1])])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, src(ids).logits, atol=1e-5, rtol=0)
    with pytest.raises(ModelError, match="causal LM"):
        load_model(str(tmp_path / "m.gguf"), task="feature-extraction")


def test_paths_are_told_from_factory_specs(hf_dir, tmp_path):
    (tmp_path / "c.jsonl").write_text("{}\n")
    assert is_model_path(str(hf_dir[0])) and is_model_path("missing/model.gguf") and is_model_path("some-dir")
    assert not is_model_path("mypkg.models:build")
    assert is_text_path(str(tmp_path / "c.jsonl")) and is_text_path(f"{tmp_path / 'c.jsonl'}:content")
    assert is_text_path("missing.txt")
    assert not is_text_path("mnist1d") and not is_text_path("mypkg.data:load")
    (tmp_path / "f.py").write_text("def data(): pass\n")  # an existing file's factory, not a text column
    assert not is_text_path(f"{tmp_path / 'f.py'}:data") and not is_text_path(f"images:{tmp_path}")
    (tmp_path / "toy.py").write_text("")  # an existing file.py:FACTORY is code, not a corpus with a column
    assert not is_text_path(f"{tmp_path / 'toy.py'}:data") and not is_model_path(f"{tmp_path / 'toy.py'}:build")


# --------------------------------------------------------------------------- text data

def _write(tmp_path, kind, texts, column="text"):
    path = tmp_path / f"corpus.{kind}"
    if kind == "txt":
        path.write_text("\n\n".join(texts))
    elif kind == "jsonl":
        path.write_text("".join(json.dumps({"id": i, column: t}) + "\n" for i, t in enumerate(texts)))
    else:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["id", column])
            w.writeheader()
            w.writerows({"id": i, column: t} for i, t in enumerate(texts))
    return path


@pytest.mark.parametrize("kind", ["txt", "jsonl", "csv"])
def test_load_text_data_windows(hf_dir, tmp_path, kind):
    tok = hf_dir[2]
    path = _write(tmp_path, kind, tiny_llm.SENTENCES * 12)
    d = load_text_data(str(path), tok, seq_len=16, samples=6, batch_size=4)
    assert set(d) == {"train", "calib", "eval"} and d["train"] is d["calib"]
    calib, ev = torch.cat(d["calib"]), torch.cat(d["eval"])
    assert calib.shape == (6, 16) and calib.dtype == torch.long and [len(b) for b in d["calib"]] == [4, 2]
    assert ev.shape[1] == 16 and 1 <= len(ev) <= 6
    again = load_text_data(str(path), tok, seq_len=16, samples=6, batch_size=4)
    assert all(torch.equal(a, b) for a, b in zip(d["calib"] + d["eval"], again["calib"] + again["eval"]))
    # The stream: documents joined by EOS, cut into windows; eval = the last windows, calib = others.
    docs = read_texts(str(path))
    stream = torch.tensor([t for doc in docs for t in (*tok.encode(doc), tok.eos_token_id)])
    windows = stream[: stream.numel() // 16 * 16].reshape(-1, 16)
    assert torch.equal(ev, windows[len(windows) - len(ev):])
    assert all(any(torch.equal(c, w) for w in windows[:len(windows) - len(ev)]) for c in calib)


def test_column_by_name_and_eval_count(hf_dir, tmp_path):
    path = _write(tmp_path, "jsonl", tiny_llm.SENTENCES * 12, column="content")
    d = load_text_data(f"{path}:content", hf_dir[2], seq_len=16, samples=4, eval_samples=3)
    assert torch.cat(d["calib"]).shape == (4, 16) and torch.cat(d["eval"]).shape == (3, 16)
    assert read_texts(f"{path}:content")[:2] == tiny_llm.SENTENCES[:2]


@pytest.mark.parametrize("case,match", [
    ("missing", "no such file or directory"),
    ("no-column", "has no column 'text' \\(columns: id, content\\)"),
    ("bad-column", "has no column 'body'"),
    ("empty", "has no rows"),
    ("blank", "holds no text"),
    ("too-short", "fewer than 6 calibration"),
    ("txt-column", "a .txt file has no columns"),
    ("bad-json", "line 2: is not valid JSON"),
    ("not-text", "holds a int, not text"),
    ("suffix", "unsupported file type '.xml'"),
    ("plain-dir", "not a datasets directory"),
])
def test_text_data_errors(hf_dir, tmp_path, case, match):
    content = _write(tmp_path, "jsonl", tiny_llm.SENTENCES * 12, column="content")
    spec = {
        "missing": lambda: str(tmp_path / "nope.jsonl"),
        "no-column": lambda: str(content),
        "bad-column": lambda: f"{content}:body",
        "empty": lambda: str(_touch(tmp_path / "e.jsonl", "")),
        "blank": lambda: str(_touch(tmp_path / "b.txt", "  \n\n ")),
        "too-short": lambda: str(_touch(tmp_path / "s.txt", tiny_llm.SENTENCES[0])),
        "txt-column": lambda: f"{_touch(tmp_path / 's.txt', 'hello')}:text",
        "bad-json": lambda: str(_touch(tmp_path / "j.jsonl", '{"text": "a"}\n{"text": \n')),
        "not-text": lambda: f"{content}:id",
        "suffix": lambda: str(_touch(tmp_path / "x.xml", "<a/>")),
        "plain-dir": lambda: str((tmp_path / "dir").mkdir() or tmp_path / "dir"),
    }[case]()
    before = _snapshot(tmp_path)
    with pytest.raises(DataError, match=match) as e:
        load_text_data(spec, hf_dir[2], seq_len=16, samples=6)
    assert e.value.fix and _snapshot(tmp_path) == before


def _touch(path, text):
    path.write_text(text)
    return path


def test_optional_packages_are_named(hf_dir, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("pyarrow", "datasets") else real(name, *a))
    (tmp_path / "c.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match="needs the package pyarrow") as e:
        load_text_data(str(tmp_path / "c.parquet"), hf_dir[2])
    assert e.value.fix == "pip install pyarrow"
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset_info.json").write_text("{}")
    with pytest.raises(DataError, match="needs the package datasets"):
        load_text_data(str(tmp_path / "ds"), hf_dir[2])


def test_bad_arguments(hf_dir, tmp_path):
    path = _write(tmp_path, "txt", tiny_llm.SENTENCES)
    with pytest.raises(DataError, match="seq_len"):
        load_text_data(str(path), hf_dir[2], seq_len=1)
    with pytest.raises(DataError, match="tokenizer"):
        load_text_data(str(path), None)


# --------------------------------------------------------------------------- perplexity

def test_perplexity_metric_matches_the_stream_protocol(hf_dir):
    _, model, tok = hf_dir
    ids = torch.tensor(tok.encode(TEXT))
    windows = ids[: (ids.numel() // 16) * 16].reshape(-1, 16)
    metric, name = get_metric("perplexity")
    value = metric(model, [windows[:3], windows[3:]])  # batching does not change it
    assert name == "perplexity" and metric.lower_is_better
    assert value == pytest.approx(stream_perplexity(model, ids, seq_len=16).ppl, rel=1e-9)
    with pytest.raises(DataError, match="token ids"):
        metric(model, [torch.randn(2, 16)])


# --------------------------------------------------------------------------- end to end

def test_compress_a_hf_dir_on_a_text_file_reports_perplexity(hf_dir, tmp_path):
    import nnsqueeze as nsq

    path = _write(tmp_path, "jsonl", [f"{i}: {s}" for i, s in enumerate(tiny_llm.SENTENCES * 8)])
    model, tok = load_model(str(hf_dir[0]))
    data = load_text_data(str(path), tok, seq_len=32, samples=4, eval_samples=2)
    recipe = {"version": 1, "steps": [{"gptq": {"bits": 4, "group_size": 32, "samples": 4}}],
              "export": {"onnx": None}, "evaluate": {"warmup": 0, "runs": 1, "per_step": False}}
    result = nsq.compress(model, recipe, calib_data=data["calib"], eval_data=data["eval"], metric="perplexity",
                          progress=False)
    b, c = result.report["baseline"], result.report["compressed"]
    assert b["measured"]["metric"] == "perplexity" and b["measured"]["lower_is_better"] is True
    ref = get_metric("perplexity")[0]
    assert b["accuracy"] == pytest.approx(ref(model, data["eval"]), rel=1e-9)        # the fp32 model, untouched
    assert c["accuracy"] == pytest.approx(ref(result.model, data["eval"]), rel=1e-9)
    assert c["accuracy"] != b["accuracy"]
    row = next(r for r in result.report.summary_rows() if r[0] == "perplexity")
    word = "worse" if c["accuracy"] > b["accuracy"] else "better"
    assert row[3] == f"{100 * (c['accuracy'] - b['accuracy']) / b['accuracy']:+.2f}% ({word})"
    assert "| perplexity |" in result.report.to_markdown()
