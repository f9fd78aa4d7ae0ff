# Imported by the format tests (not a conftest.py: a second conftest module would shadow tests/conftest.py
# for `from conftest import ...` in the full run).
"""Fixtures of the open-format exports: a tiny random Hugging Face LLaMA packed by ``rtn``, and a
tiny BPE tokenizer. Compressions are cached per scheme (rtn needs no data; the models are read only)."""

from __future__ import annotations

import functools

import pytest
import torch

VOCAB = 97
IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))


def hf_llama():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(cfg).eval()


@functools.lru_cache(maxsize=None)
def _packed(bits: int, group_size: int | None, symmetric: bool, scale_dtype: str):
    import nnsqueeze as nsq

    step = {"rtn": {"bits": bits, "group_size": group_size, "symmetric": symmetric, "scale_dtype": scale_dtype}}
    res = nsq.compress(hf_llama(), {"version": 1, "steps": [step], "export": {"onnx": None},
                                    "evaluate": {"warmup": 0, "runs": 1, "per_step": False}},
                       metric=None, progress=False, example_inputs=IDS[:1])
    return res


@pytest.fixture
def packed():
    """``packed(bits, group_size, symmetric, scale_dtype)`` -> a CompressionResult (shared: do not modify)."""
    return lambda bits=4, group_size=32, symmetric=True, scale_dtype="fp32": _packed(bits, group_size, symmetric,
                                                                                      scale_dtype)


@pytest.fixture(scope="session")
def tokenizer():
    """A 97-token byte-level BPE tokenizer built in memory (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["Ġ"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    merges = []
    for a in "etaoinsh":
        for b in "etaoinsh":
            if len(vocab) < VOCAB:
                merges.append((a, b))
                vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture
def ids():
    """(2, 12) token ids, fixed seed."""
    return IDS.clone()


@pytest.fixture
def llama():
    """A fresh (unquantized) tiny random LLaMA, seed 0."""
    return hf_llama()


@functools.lru_cache(maxsize=None)
def _awq(share: bool):
    import nnsqueeze as nsq

    calib = [torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    step = {"awq": {"bits": 4, "group_size": 32, "pack": True, "share_scales": share, "scale_dtype": "fp16",
                    "samples": 4, "n_grid": 5}}
    return nsq.compress(hf_llama(), {"version": 1, "steps": [step], "export": {"onnx": None},
                                     "evaluate": {"warmup": 0, "runs": 1, "per_step": False}},
                        calib_data=calib, metric=None, progress=False, example_inputs=IDS[:1]).model


@pytest.fixture
def awq_packed():
    """``awq_packed(share_scales=True)`` -> the tiny LLaMA packed by ``awq`` int4 g32 fp16 scales (shared)."""
    return lambda share_scales=True: _awq(share_scales)
