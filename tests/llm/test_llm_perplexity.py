"""Perplexity protocol: non-overlapping windows, first token of each unscored, tail dropped."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nnsqueeze.errors import DataError
from nnsqueeze.llm.perplexity import perplexity
from nnsqueeze.llm.tiny import TinyLlama, TinyLlamaConfig


def model():
    torch.manual_seed(0)
    return TinyLlama(TinyLlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_layers=2))


def test_uniform_model_has_vocab_perplexity():
    m = model()
    torch.nn.init.zeros_(m.lm_head.weight)
    r = perplexity(m, torch.randint(0, 40, (333,)), seq_len=32, batch_size=3)
    assert r.ppl == pytest.approx(40.0, rel=1e-9)
    assert (r.windows, r.scored_tokens, r.dropped_tokens) == (10, 310, 13)


def test_matches_manual_and_batch_size_independent():
    m = model()
    toks = torch.randint(0, 40, (200,))
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in toks[:192].reshape(6, 32):
            lg = m(w[None]).logits[0].double()
            nll += float(F.cross_entropy(lg[:-1], w[1:], reduction="sum"))
            n += 31
    expect = math.exp(nll / n)
    for bs in (1, 4, 16):
        assert perplexity(m, toks, seq_len=32, batch_size=bs).ppl == pytest.approx(expect, rel=1e-6)
    assert perplexity(m, toks, seq_len=32, max_windows=2).windows == 2


def test_errors():
    with pytest.raises(DataError, match="less than one window"):
        perplexity(model(), torch.arange(10), seq_len=32)
    with pytest.raises(DataError):
        perplexity(model(), torch.arange(100), seq_len=1)
