"""The embedded language models behind ``nnsqueeze demo --llm`` and ``bench/llm_ppl.py``.

Trained locally, once, on the text that ships with Python (:mod:`nnsqueeze.zoo.pycorpus`), then
cached; nothing is downloaded. Two architectures trained the same way on the same tokens:

- ``arch="llama"``: ``transformers.LlamaForCausalLM``, RMSNorm, rotary positions, SwiGLU,
  grouped-query attention (6 query heads share 2 key/value heads), untied ``lm_head``;
- ``arch="gpt2"``: ``transformers.GPT2LMHeadModel`` (LayerNorm, learned positions, GELU MLP,
  ``Conv1D`` layers, tied ``lm_head``).

``size="default"``: hidden 384, 6 blocks, 4096-token byte-level BPE vocabulary (about 12.6M parameters
for LLaMA, 12.3M for GPT-2), :data:`TRAIN` steps of 8 x 256 tokens (AdamW, warmup + cosine, fixed
seeds). ``size="tiny"`` (tests): hidden 64, 2 blocks, 512-token vocabulary, trains in seconds on the
tiny corpus.

    >>> import torch
    >>> from nnsqueeze.zoo import pylm
    >>> tok = pylm.load_tokenizer(size="tiny")
    >>> tok.decode(tok.encode("def f(x):\\n    return x")) == "def f(x):\\n    return x"
    True
    >>> model = pylm.pretrained("llama", size="tiny")        # trains once (seconds), then cached
    >>> ids = pylm.token_stream("validation", size="tiny")   # 1-d LongTensor
    >>> from nnsqueeze.llm.perplexity import perplexity
    >>> perplexity(model, ids, seq_len=pylm.EVAL_SEQ_LEN["tiny"]).ppl < 512
    True

Cache (``$NNSQUEEZE_CACHE`` or ``~/.cache/nnsqueeze``, in ``pylm/``): ``tokenizer-<size>-<hash>/``
(``tokenizer.json``, ``save_pretrained`` files) and ``<arch>-<size>-<hash>/`` (``config.json``,
``model.safetensors``, the tokenizer files, and ``pylm.json`` with the training time, steps/s, final
loss and validation perplexity). A directory is built under a temporary name and renamed into place
(a crash leaves no half cache), under a file lock (two processes do not train the same model twice).
The hash covers the model/training configuration and the corpus (so a new Python retrains).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from ..safeio import file_lock
from . import pycorpus
from .mnist1d import content_hash, cache_root

log = logging.getLogger("nnsqueeze")

__all__ = ["load_tokenizer", "pretrained", "build_model", "train", "token_stream", "eval_windows",
           "calibration", "model_dir", "info", "ARCHS", "SIZES", "MODELS", "TRAIN", "EVAL_SEQ_LEN"]

FORMAT_VERSION = 1
ARCHS = ("llama", "gpt2")
SIZES = ("default", "tiny")
EOS = "<|endoftext|>"

#: Tokenizer per size: byte-level BPE trained on the train split only.
TOKENIZER: dict[str, dict[str, Any]] = {
    "default": {"vocab_size": 4096, "min_frequency": 2},
    "tiny": {"vocab_size": 512, "min_frequency": 2},
}

#: Architecture per size (vocab_size comes from the tokenizer).
MODELS: dict[str, dict[str, dict[str, Any]]] = {
    "default": {
        "llama": {"hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 6, "num_attention_heads": 6,
                  "num_key_value_heads": 2, "max_position_embeddings": 512, "tie_word_embeddings": False},
        "gpt2": {"n_embd": 384, "n_inner": 1536, "n_layer": 6, "n_head": 6, "n_positions": 512},
    },
    "tiny": {
        "llama": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "max_position_embeddings": 128, "tie_word_embeddings": False},
        "gpt2": {"n_embd": 64, "n_inner": 128, "n_layer": 2, "n_head": 4, "n_positions": 128},
    },
}

#: Training recipe per size: AdamW, linear warmup then cosine to ``min_lr_ratio * lr``, clip 1.0.
TRAIN: dict[str, dict[str, Any]] = {
    "default": {"steps": 600, "batch_size": 8, "seq_len": 256, "lr": 2e-3, "min_lr_ratio": 0.1, "warmup": 20,
                "weight_decay": 0.1, "betas": [0.9, 0.95], "clip": 1.0, "init_seed": 0, "data_seed": 0},
    "tiny": {"steps": 60, "batch_size": 8, "seq_len": 64, "lr": 1e-2, "min_lr_ratio": 0.1, "warmup": 6,
             "weight_decay": 0.1, "betas": [0.9, 0.95], "clip": 1.0, "init_seed": 0, "data_seed": 0},
}

#: Perplexity protocol: non-overlapping windows of this many tokens over the validation split.
EVAL_SEQ_LEN = {"default": 256, "tiny": 64}


def _check(arch: str | None, size: str) -> None:
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if arch is not None and arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")


# --------------------------------------------------------------------------- cache plumbing

@contextlib.contextmanager
def locked(root: Path, name: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``root/.name.lock`` (released on exit, also if the process dies)."""
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / f".{name}.lock"):
        yield


def publish(root: Path, name: str, build) -> Path:
    """Run ``build(tmp_dir)`` in a fresh temporary directory under ``root``, then rename it to ``root/name``."""
    final = root / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)
        if final.exists():  # a stale, incomplete-looking directory (no marker): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# --------------------------------------------------------------------------- tokenizer

def _tokenizer_key(size: str) -> str:
    return f"tokenizer-{size}-{content_hash([FORMAT_VERSION, TOKENIZER[size], pycorpus.corpus_hash(size)])}"


def _train_tokenizer(size: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER[size]["vocab_size"],
                                  min_frequency=TOKENIZER[size]["min_frequency"],
                                  special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([d.text for d in pycorpus.load_corpus(size)["train"]], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS,
                                   clean_up_tokenization_spaces=False)


def load_tokenizer(size: str = "default", cache_dir: str | os.PathLike | None = None):
    """The byte-level BPE tokenizer (``PreTrainedTokenizerFast``), trained once on the train split."""
    from transformers import PreTrainedTokenizerFast

    _check(None, size)
    root = cache_root(cache_dir) / "pylm"
    key = _tokenizer_key(size)
    path = root / key
    if not (path / "tokenizer.json").is_file():
        with locked(root, key):
            if not (path / "tokenizer.json").is_file():
                log.info("pylm: training the %s tokenizer (once; cached in %s)", size, path)
                tok = _train_tokenizer(size)
                publish(root, key, lambda tmp: tok.save_pretrained(tmp))
    return PreTrainedTokenizerFast.from_pretrained(str(path))


# --------------------------------------------------------------------------- token streams

def token_stream(split: str = "validation", size: str = "default", tokenizer=None,
                 cache_dir: str | os.PathLike | None = None) -> torch.Tensor:
    """The split as one 1-d LongTensor: each document's tokens followed by ``<|endoftext|>``, in name order."""
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    tok = tokenizer or load_tokenizer(size, cache_dir)
    docs = pycorpus.load_corpus(size)[split]
    eos = tok.convert_tokens_to_ids(EOS)
    enc = tok([d.text for d in docs], add_special_tokens=False)["input_ids"]
    return torch.tensor([t for ids in enc for t in (*ids, eos)], dtype=torch.long)


def eval_windows(size: str = "default", seq_len: int | None = None, max_windows: int | None = None,
                 cache_dir: str | os.PathLike | None = None) -> torch.Tensor:
    """(n, seq_len) non-overlapping windows of the validation stream from its start (tail dropped):
    exactly what :func:`nnsqueeze.llm.perplexity.perplexity` scores."""
    seq_len = seq_len or EVAL_SEQ_LEN[size]
    ids = token_stream("validation", size, cache_dir=cache_dir)
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seq_len].reshape(n, seq_len)


def calibration(n: int = 32, seq_len: int | None = None, size: str = "default", batch_size: int = 8, seed: int = 0,
                cache_dir: str | os.PathLike | None = None) -> list[torch.Tensor]:
    """``n`` random windows of the *train* stream (seeded), as (<= batch_size, seq_len) LongTensor batches."""
    seq_len = seq_len or EVAL_SEQ_LEN[size]
    ids = token_stream("train", size, cache_dir=cache_dir)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n,), generator=g)
    rows = torch.stack([ids[s:s + seq_len] for s in starts.tolist()])
    return [rows[i:i + batch_size] for i in range(0, n, batch_size)]


# --------------------------------------------------------------------------- model and training

def build_model(arch: str = "llama", size: str = "default", vocab_size: int | None = None, seed: int | None = None):
    """A freshly initialized model (``seed``: the init seed, default the size's ``init_seed``)."""
    import transformers

    _check(arch, size)
    vocab_size = vocab_size or TOKENIZER[size]["vocab_size"]
    ids = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    if arch == "llama":
        config = transformers.LlamaConfig(vocab_size=vocab_size, **MODELS[size]["llama"], **ids)
        cls = transformers.LlamaForCausalLM
    else:
        config = transformers.GPT2Config(vocab_size=vocab_size, **MODELS[size]["gpt2"], **ids)
        cls = transformers.GPT2LMHeadModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TRAIN[size]["init_seed"] if seed is None else seed)
        return cls(config)


def _lr(step: int, c: dict[str, Any]) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from ``lr`` to ``min_lr_ratio * lr``."""
    if step < c["warmup"]:
        return c["lr"] * (step + 1) / c["warmup"]
    t = (step - c["warmup"]) / max(1, c["steps"] - c["warmup"])
    return c["lr"] * (c["min_lr_ratio"] + (1 - c["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * t)))


def train(model, tokens: torch.Tensor, config: dict[str, Any], losses: list[float] | None = None,
          log_every: int = 0) -> dict[str, float]:
    """Train ``model`` in place on random ``seq_len`` windows of the 1-d ``tokens`` (seeded).

    Returns ``{'seconds', 'cpu_seconds', 'steps_per_s', 'final_loss'}`` (CPU seconds of all threads:
    a measure of the work that does not depend on other load; final loss: mean of the last 10 steps).
    Thread count is the caller's; the global torch RNG is restored afterwards.
    """
    c = config
    g = torch.Generator().manual_seed(c["data_seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=c["lr"], betas=tuple(c["betas"]), weight_decay=c["weight_decay"])
    hist: list[float] = []
    model.train()
    t0, cpu0 = time.perf_counter(), time.process_time()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(c["data_seed"])  # dropout (none by default) and anything else random
        for step in range(c["steps"]):
            for group in opt.param_groups:
                group["lr"] = _lr(step, c)
            starts = torch.randint(0, tokens.numel() - c["seq_len"], (c["batch_size"],), generator=g)
            x = torch.stack([tokens[s:s + c["seq_len"]] for s in starts.tolist()])   # (b, seq_len)
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), c["clip"])
            opt.step()
            hist.append(loss.item())
            if log_every and (step + 1) % log_every == 0:
                el = time.perf_counter() - t0
                log.info("pylm train step %d/%d loss %.3f (%.1f s, %.3f steps/s)", step + 1, c["steps"],
                         hist[-1], el, (step + 1) / el)
    seconds = time.perf_counter() - t0
    model.eval()
    if losses is not None:
        losses.extend(hist)
    return {"seconds": round(seconds, 2), "cpu_seconds": round(time.process_time() - cpu0, 2),
            "steps_per_s": round(c["steps"] / seconds, 4),
            "final_loss": round(sum(hist[-10:]) / len(hist[-10:]), 4)}


def _model_key(arch: str, size: str) -> str:
    cfg = [FORMAT_VERSION, arch, MODELS[size][arch], TRAIN[size], TOKENIZER[size], pycorpus.corpus_hash(size)]
    return f"{arch}-{size}-{content_hash(cfg)}"


def model_dir(arch: str = "llama", size: str = "default", cache_dir: str | os.PathLike | None = None) -> Path:
    """Where :func:`pretrained` caches the model (a Hugging Face directory: ``from_pretrained`` loads it)."""
    _check(arch, size)
    return cache_root(cache_dir) / "pylm" / _model_key(arch, size)


def _complete(path: Path) -> bool:
    return (path / "pylm.json").is_file() and (path / "model.safetensors").is_file()


def pretrained(arch: str = "llama", size: str = "default", cache_dir: str | os.PathLike | None = None,
               force: bool = False, log_every: int = 0):
    """The trained model (eval mode): trained once with :data:`TRAIN` ``[size]``, then loaded from cache.

    ``force=True`` retrains and replaces the cache. Training uses the caller's torch thread count
    (the default size: about 330 CPU-seconds for LLaMA, 460 for GPT-2, i.e. under 15 minutes on one
    idle core; ``pylm.json`` records the wall time, CPU time and threads of the run).
    """
    import transformers

    _check(arch, size)
    path = model_dir(arch, size, cache_dir)
    cls = transformers.LlamaForCausalLM if arch == "llama" else transformers.GPT2LMHeadModel
    if force or not _complete(path):
        with locked(path.parent, path.name):
            if force or not _complete(path):
                tok = load_tokenizer(size, cache_dir)
                tokens = token_stream("train", size, tokenizer=tok)
                model = build_model(arch, size, vocab_size=len(tok))
                log.info("pylm: training the %s %s model (%d steps, once; cached in %s)", size, arch,
                         TRAIN[size]["steps"], path)
                stats = train(model, tokens, TRAIN[size], log_every=log_every)
                from ..llm.perplexity import perplexity

                val = perplexity(model, token_stream("validation", size, tokenizer=tok), seq_len=EVAL_SEQ_LEN[size])
                meta = {"arch": arch, "size": size, "params": sum(p.numel() for p in model.parameters()),
                        "train_tokens": int(tokens.numel()), "threads": torch.get_num_threads(), **stats,
                        "validation_ppl": round(val.ppl, 4), "eval": val.as_dict(), "model": MODELS[size][arch],
                        "train": TRAIN[size], "tokenizer": TOKENIZER[size], "corpus": pycorpus.corpus_hash(size),
                        "torch": torch.__version__, "transformers": transformers.__version__}
                log.info("pylm: %s %s trained in %.0f s (%.3f steps/s), validation perplexity %.2f", size, arch,
                         stats["seconds"], stats["steps_per_s"], val.ppl)

                def build(tmp: Path) -> None:
                    model.save_pretrained(tmp, safe_serialization=True)
                    tok.save_pretrained(tmp)
                    (tmp / "pylm.json").write_text(json.dumps(meta, indent=2) + "\n")

                publish(path.parent, path.name, build)
    return cls.from_pretrained(str(path)).eval()


def info(arch: str = "llama", size: str = "default",
         cache_dir: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """The cached model's ``pylm.json`` (training time, steps/s, validation perplexity) or None."""
    p = model_dir(arch, size, cache_dir) / "pylm.json"
    return json.loads(p.read_text()) if p.is_file() else None
