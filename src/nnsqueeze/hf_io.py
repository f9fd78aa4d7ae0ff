"""Hugging Face models and text corpora in, by path: what ``nnsqueeze compress --model DIR --data FILE`` reads.

- :func:`load_model`: a Hugging Face model directory (``config.json`` + weights + tokenizer) or a
  ``.gguf`` file -> ``(model, tokenizer)``, fp32, eval mode; the task comes from
  ``config.architectures`` or is given (:data:`TASKS`).
- :func:`load_text_data`: a ``.txt`` file, a ``.jsonl``/``.csv``/``.parquet`` file with a text column
  (``path`` uses the column ``text``; ``path:COLUMN`` names another), or a directory written by
  ``datasets``' ``save_to_disk`` -> ``{'train', 'calib', 'eval'}`` batches of token windows.
- :func:`is_model_path` / :func:`is_text_path`: tell a path from the CLI's ``MODULE:FACTORY`` spec.

::

    >>> import nnsqueeze as nsq
    >>> from nnsqueeze.hf_io import load_model, load_text_data
    >>> model, tok = load_model("SmolLM2-dir")                                       # doctest: +SKIP
    >>> data = load_text_data("corpus.jsonl:content", tok, seq_len=256, samples=32)  # doctest: +SKIP
    >>> r = nsq.compress(model, "w4-g128-gptq", calib_data=data["calib"], eval_data=data["eval"],
    ...                  metric="perplexity")                                         # doctest: +SKIP

(skipped in the doctests: it needs transformers and a model directory). The corpus side needs
neither: any callable with a tokenizer's ``tok(texts, add_special_tokens=False)["input_ids"]``
will do, here one token per byte:

    >>> import json, os, tempfile
    >>> from nnsqueeze.hf_io import is_model_path, is_text_path, read_texts
    >>> def byte_tok(texts, add_special_tokens=False):
    ...     return {"input_ids": [list(t.encode()) for t in texts]}
    >>> with tempfile.TemporaryDirectory() as d:
    ...     path = os.path.join(d, "corpus.jsonl")
    ...     with open(path, "w") as f:
    ...         for i in range(10):                      # 10 documents of 44 bytes: 27 windows of 16
    ...             print(json.dumps({"content": f"document {i} " * 4}), file=f)
    ...     texts = read_texts(path + ":content")
    ...     data = load_text_data(path + ":content", byte_tok, seq_len=16, samples=4, batch_size=2)
    >>> len(texts), texts[9]
    (10, 'document 9 document 9 document 9 document 9 ')
    >>> [tuple(b.shape) for b in data["calib"]], [tuple(b.shape) for b in data["eval"]]
    ([(2, 16), (2, 16)], [(2, 16)])
    >>> is_text_path("corpus.jsonl:content"), is_text_path("mnist1d"), is_model_path("mypkg.models:make")
    (True, False, False)

Every wrong input raises :class:`~nnsqueeze.errors.ModelError` or :class:`~nnsqueeze.errors.DataError`
naming it and the fix, before anything is written.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import struct
from pathlib import Path
from typing import Any

import torch

from .errors import DataError, ModelError

log = logging.getLogger("nnsqueeze")

__all__ = ["load_model", "load_text_data", "read_texts", "is_model_path", "is_text_path", "task_of", "TASKS",
           "TEXT_SUFFIXES"]

#: Task -> the transformers auto class that loads it.
TASKS = {"causal-lm": "AutoModelForCausalLM", "feature-extraction": "AutoModel",
         "sequence-classification": "AutoModelForSequenceClassification"}
TEXT_SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet")
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json")


# --------------------------------------------------------------------------- telling paths from specs

def is_model_path(spec: str) -> bool:
    """Whether ``--model spec`` names a HF directory / GGUF file rather than ``MODULE:FACTORY``:
    it exists, ends in ``.gguf``, or has no ``:`` (a factory spec always has one)."""
    return Path(spec).expanduser().exists() or spec.endswith(".gguf") or ":" not in spec


def _split_column(spec: str) -> tuple[Path, str | None]:
    p = Path(spec).expanduser()
    if p.exists() or ":" not in spec:
        return p, None
    left, column = spec.rsplit(":", 1)
    return Path(left).expanduser(), column


def is_text_path(spec: str) -> bool:
    """Whether ``--data spec`` names a text corpus (``path`` or ``path:COLUMN``) rather than ``mnist1d``,
    ``images:DIR``, ``MODULE:FACTORY`` or ``path/file.py:FACTORY``: the path exists or has a text suffix
    (.txt/.jsonl/.csv/.parquet)."""
    if spec == "mnist1d" or spec.startswith("images:"):
        return False
    p, column = _split_column(spec)
    if column is not None and p.suffix == ".py":  # a factory in an existing file, not a column of a corpus
        return False
    return p.exists() or p.suffix.lower() in TEXT_SUFFIXES


# --------------------------------------------------------------------------- models

def task_of(architectures: list[str] | None, where: str = "config.json") -> str:
    """The task of the first architecture: ``*ForCausalLM``/``*LMHeadModel`` -> causal-lm,
    ``*ForSequenceClassification`` -> sequence-classification, ``*Model`` -> feature-extraction."""
    if not architectures:
        raise ModelError(where, "has no 'architectures' entry, so the task is unknown",
                         fix=f"give the task explicitly (--task {'|'.join(TASKS)})")
    arch = architectures[0]
    if arch.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal-lm"
    if arch.endswith("ForSequenceClassification"):
        return "sequence-classification"
    if arch.endswith("Model"):
        return "feature-extraction"
    raise ModelError(where, f"architecture {arch} is not supported (supported: *ForCausalLM / *LMHeadModel, "
                     "*ForSequenceClassification, *Model)",
                     fix=f"give a model of a supported kind, or force one with --task {'|'.join(TASKS)}")


def task_of_model(model: torch.nn.Module) -> str | None:
    """The task of a loaded model, from its class name (what it computes), or None when unknown."""
    try:
        return task_of([type(model).__name__], where=type(model).__name__)
    except ModelError:
        return None


def _check_task(task: str | None) -> None:
    if task is not None and task not in TASKS:
        raise ModelError("task", f"unknown task {task!r}", fix=f"use one of: {', '.join(TASKS)}")


def _tokenizer(path: Path, where: str, **kw):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), **kw)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ModelError(where, f"has no usable tokenizer ({str(e).splitlines()[0][:200]})",
                         fix="save the model's tokenizer into the directory: tokenizer.save_pretrained(DIR)") from e


def _gguf_model(path: Path):
    """The GGUF's causal LM in fp32: transformers' own reader (dequantizes Q4_1/Q8_0/..., undoes
    llama.cpp's q/k row permutation), without ``from_pretrained(gguf_file=...)``, which insists on
    the accelerate package for no use on one CPU."""
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = transformers.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model,
                                   torch_dtype=torch.float32)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # A tied lm_head has no tensor of its own in the file: tie_weights() below fills it.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"GGUF tensors do not match {type(model).__name__}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.tie_weights()
    return model.eval()


def load_gguf(path: str | Path) -> tuple[torch.nn.Module, Any]:
    """``(model, tokenizer)`` of a GGUF file (a causal LM), dequantized to fp32, eval mode."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelError(str(path), "no such GGUF file", fix="give the path of a .gguf file")
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(str(path), "reading GGUF files needs the package gguf, which is not installed",
                         fix="pip install gguf (or pip install 'nnsqueeze[real]')")
    try:
        model = _gguf_model(p)
    # A truncated or foreign file fails inside the reader with struct/index errors.
    except (OSError, ValueError, KeyError, RuntimeError, NotImplementedError, struct.error, IndexError, EOFError) as e:
        raise ModelError(str(path), f"transformers cannot load this GGUF file: {str(e)[:300]}",
                         fix="use a GGUF of an architecture transformers supports (llama, qwen2, mistral, ...)") from e
    return model, _tokenizer(p.parent, str(path), gguf_file=p.name)


def load_model(path: str, task: str | None = None) -> tuple[torch.nn.Module, Any]:
    """``(model, tokenizer)`` from a Hugging Face model directory or a ``.gguf`` file, fp32, eval mode.

    ``task``: one of :data:`TASKS`; ``None`` takes it from ``config.json``'s ``architectures``.
    A GGUF file is a causal LM, dequantized to fp32 by transformers (needs the ``gguf`` package).
    """
    import transformers

    _check_task(task)
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelError(str(path), "no such file or directory",
                         fix="give a Hugging Face model directory (config.json + weights) or a .gguf file")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ModelError(str(path), "is a file but not a .gguf model",
                             fix="give the model's directory (config.json + weights) or a .gguf file")
        if task not in (None, "causal-lm"):
            raise ModelError(str(path), f"a GGUF file holds a causal LM, not a {task} model",
                             fix="use --task causal-lm (or leave it out)")
        return load_gguf(p)
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise ModelError(str(path), "is a directory without config.json, so not a Hugging Face model",
                         fix="give the directory model.save_pretrained(DIR) wrote (config.json + weights)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(str(cfg_file), f"is not valid JSON ({e})", fix="rewrite it with model.save_pretrained") from e
    if not any(any(p.glob(g)) for g in WEIGHT_FILES):
        raise ModelError(str(path), "has config.json but no weights (model.safetensors or pytorch_model.bin)",
                         fix="save them with model.save_pretrained(DIR)")
    task = task or task_of(cfg.get("architectures"), str(cfg_file))
    tok = _tokenizer(p, str(path))  # before the (slower) weights: fail fast on a missing tokenizer
    cls = getattr(transformers, TASKS[task])
    try:
        model = cls.from_pretrained(str(p), dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelError(str(path), f"cannot be loaded as a {task} model: {str(e).splitlines()[0][:300]}",
                         fix=f"check the architecture in config.json or pick another --task ({', '.join(TASKS)})"
                         ) from e
    return model.eval(), tok


# --------------------------------------------------------------------------- text

def _need(package: str, what: str, where: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise DataError(where, f"reading {what} needs the package {package}, which is not installed",
                        fix=f"pip install {package}")


def _column(rows: list[dict], column: str | None, where: str) -> tuple[str, list[Any]]:
    names = list(rows[0]) if rows else []
    col = column or "text"
    if col not in names:
        got = ", ".join(map(str, names)) or "none"
        raise DataError(where, f"has no column {col!r} (columns: {got})",
                        fix=f"name the text column: {where}:COLUMN" if column is None else "use one of the columns")
    return col, [r.get(col) for r in rows]


def _rows(p: Path, where: str) -> list[dict]:
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where} line {i}", f"is not valid JSON ({e.msg})",
                                    fix="write one JSON object per line") from e
                if not isinstance(row, dict):
                    raise DataError(f"{where} line {i}", f"is a JSON {type(row).__name__}, not an object",
                                    fix='write one object per line, e.g. {"text": "..."}')
                rows.append(row)
        return rows
    if suffix == ".csv":
        csv.field_size_limit(1 << 30)  # documents are long; the default limit is 128 KiB
        with open(p, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    _need("pyarrow", "Parquet files", where)
    import pyarrow.parquet as pq

    return pq.read_table(p).to_pylist()


def read_texts(spec: str) -> list[str]:
    """The documents of a text corpus ``path`` or ``path:COLUMN`` (empty ones dropped), in file order."""
    p, column = _split_column(spec)
    where = str(p)
    if not p.exists():
        raise DataError(where, "no such file or directory",
                        fix="give a .txt, .jsonl, .csv or .parquet file (path:COLUMN for another column than "
                            "'text') or a datasets directory from save_to_disk")
    if p.is_dir():
        texts = _dataset_texts(p, column, where)
    elif p.suffix.lower() == ".txt":
        if column is not None:
            raise DataError(spec, "a .txt file has no columns", fix=f"give the path alone: {where}")
        texts = [p.read_text(encoding="utf-8")]
    elif p.suffix.lower() in TEXT_SUFFIXES:
        rows = _rows(p, where)
        if not rows:
            raise DataError(where, "has no rows", fix="give a file with at least one text row")
        col, texts = _column(rows, column, where)
        for i, t in enumerate(texts):
            if t is not None and not isinstance(t, str):
                raise DataError(f"{where} row {i}", f"column {col!r} holds a {type(t).__name__}, not text",
                                fix="name a column of strings: path:COLUMN")
    else:
        raise DataError(where, f"unsupported file type {p.suffix or '(no suffix)'!r}",
                        fix=f"give one of: {', '.join(TEXT_SUFFIXES)}, or a datasets directory")
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise DataError(where, "holds no text (empty file or only empty rows)", fix="give a file with text in it")
    return texts


def _dataset_texts(p: Path, column: str | None, where: str) -> list[str]:
    if not ((p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()):
        raise DataError(where, "is a directory but not a datasets directory (no dataset_info.json or "
                        "dataset_dict.json)", fix="give a file, or a directory written by Dataset.save_to_disk")
    _need("datasets", "a datasets directory", where)
    import datasets

    ds = datasets.load_from_disk(str(p))
    if isinstance(ds, datasets.DatasetDict):  # a whole DatasetDict: its train split (or its only one)
        if "train" not in ds and len(ds) != 1:
            raise DataError(where, f"has splits {', '.join(ds)} and none is 'train'",
                            fix="save the one split to use: ds[SPLIT].save_to_disk(DIR)")
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    rows = [dict.fromkeys(ds.column_names)]
    col, _ = _column(rows, column, where)
    return [t for t in ds[col] if isinstance(t, str)]


def _windows(ids: torch.Tensor, seq_len: int, idx: list[int], batch_size: int) -> list[torch.Tensor]:
    rows = torch.stack([ids[i * seq_len:(i + 1) * seq_len] for i in idx]) if idx else ids.new_zeros(0, seq_len)
    return [rows[i:i + batch_size] for i in range(0, len(idx), batch_size)]


def load_text_data(spec: str, tokenizer, seq_len: int = 512, samples: int = 32, eval_samples: int | None = None,
                   batch_size: int = 8, seed: int = 0) -> dict[str, list[torch.Tensor]]:
    """``{'train', 'calib', 'eval'}``: (<= batch_size, seq_len) LongTensor batches of token windows.

    The documents are tokenized with ``tokenizer`` (no special tokens) and joined into one stream,
    with the EOS token between documents when the tokenizer has one, then cut into non-overlapping
    ``seq_len`` windows from the start (tail dropped). The **last** ``eval_samples`` windows (default
    ``min(samples, max(1, windows // 10))``) are held out for evaluation (perplexity); ``samples``
    calibration windows are drawn without replacement from the others (seeded, in stream order).
    ``train`` is the calibration windows. Same inputs -> the same tensors.
    """
    for name, v, lo in (("seq_len", seq_len, 2), ("samples", samples, 1), ("batch_size", batch_size, 1)):
        if not isinstance(v, int) or v < lo:
            raise DataError(name, f"must be an integer >= {lo}, got {v!r}", fix=f"use e.g. --{name.replace('_', '-')} "
                            + {"seq_len": "512", "samples": "32", "batch_size": "8"}[name])
    if tokenizer is None or not callable(tokenizer):
        raise DataError("tokenizer", "a tokenizer is needed to turn the text into tokens",
                        fix="load the model with load_model(path), which returns (model, tokenizer)")
    texts = read_texts(spec)
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    eos = getattr(tokenizer, "eos_token_id", None)
    sep = [eos] if eos is not None else []
    ids = torch.tensor([t for doc in enc for t in (*doc, *sep)], dtype=torch.long)
    n = ids.numel() // seq_len
    n_eval = eval_samples if eval_samples is not None else min(samples, max(1, n // 10))
    if n_eval < 1 or n - n_eval < samples:
        raise DataError(spec, f"gives {ids.numel()} tokens = {n} windows of {seq_len}, fewer than {samples} "
                        f"calibration + {max(n_eval, 1)} evaluation windows",
                        fix=f"give more text, or a smaller --seq-len or --samples (at most {max(n - 1, 0)} here)")
    g = torch.Generator().manual_seed(seed)
    calib = sorted(torch.randperm(n - n_eval, generator=g)[:samples].tolist())
    held = list(range(n - n_eval, n))
    log.info("text data %s: %d tokens, %d calibration + %d evaluation windows of %d", spec, ids.numel(),
             len(calib), len(held), seq_len)
    cal = _windows(ids, seq_len, calib, batch_size)
    return {"train": cal, "calib": cal, "eval": _windows(ids, seq_len, held, batch_size)}
