"""Perplexity of a causal LM on a token stream, with a pinned protocol.

Protocol (what a reported number means):
- the corpus is one 1-d stream of token ids (documents already joined by the caller, e.g. with
  ``"\\n\\n"`` as the usual WikiText protocol does; the split is the caller's to state);
- it is cut into **non-overlapping** windows of exactly ``seq_len`` tokens, from the start; the
  trailing ``len % seq_len`` tokens are dropped (reported as ``dropped_tokens``);
- within a window, token ``t`` is predicted from tokens ``< t`` of the same window only, so each
  window scores ``seq_len - 1`` tokens (its first token has no context and is never scored);
- ``ppl = exp(sum NLL / scored tokens)``, NLL in float64, natural log; the model runs in eval mode
  under ``torch.no_grad``, ``batch_size`` windows at a time (the result does not depend on it).

::

    >>> import torch
    >>> from nnsqueeze.llm.tiny import TinyLlama, TinyLlamaConfig
    >>> from nnsqueeze.llm.perplexity import perplexity
    >>> model = TinyLlama(TinyLlamaConfig(vocab_size=50, hidden_size=32))
    >>> _ = torch.nn.init.zeros_(model.lm_head.weight)      # uniform predictions: ppl = vocab size
    >>> r = perplexity(model, torch.randint(0, 50, (1000,)), seq_len=64)
    >>> round(r.ppl, 6), r.windows, r.scored_tokens, r.dropped_tokens
    (50.0, 15, 945, 40)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data import logits as output_logits
from ..errors import DataError


@dataclass
class PerplexityResult:
    ppl: float
    nll: float              # mean negative log-likelihood per scored token (nats)
    scored_tokens: int
    windows: int
    seq_len: int
    dropped_tokens: int

    def as_dict(self) -> dict:
        return {**asdict(self), "protocol": "non-overlapping windows, first token of each unscored, tail dropped"}


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, seq_len: int = 512, batch_size: int = 8,
               max_windows: int | None = None, device: torch.device | str | None = None) -> PerplexityResult:
    """Perplexity of ``model`` (``model(input_ids)`` -> logits or an object with ``.logits``) on ``tokens``."""
    tokens = torch.as_tensor(tokens).reshape(-1).long()
    if seq_len < 2:
        raise DataError("perplexity.seq_len", f"must be >= 2, got {seq_len}", fix="use e.g. 512")
    n_windows = tokens.numel() // seq_len
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise DataError("perplexity.tokens", f"{tokens.numel()} tokens is less than one window of {seq_len}",
                        fix="give more text or a smaller seq_len")
    device = device or next((p.device for p in model.parameters()), torch.device("cpu"))
    windows = tokens[: n_windows * seq_len].reshape(n_windows, seq_len)
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for i in range(0, n_windows, batch_size):
            ids = windows[i:i + batch_size].to(device)              # (b, seq_len)
            logits = output_logits(model(ids))                        # (b, seq_len, vocab)
            # Position t predicts token t+1: (b, seq_len-1, vocab) vs (b, seq_len-1).
            nll = F.cross_entropy(logits[:, :-1].double().reshape(-1, logits.shape[-1]),
                                  ids[:, 1:].reshape(-1), reduction="sum")
            total += float(nll)
    finally:
        model.train(was_training)
    scored = n_windows * (seq_len - 1)
    mean = total / scored
    return PerplexityResult(math.exp(mean), mean, scored, n_windows, seq_len,
                            tokens.numel() - n_windows * seq_len)
