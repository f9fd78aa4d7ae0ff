"""Attention-head pruning for ``nn.MultiheadAttention``: whole heads leave q/k/v and the output projection.

``nn.MultiheadAttention`` ties its inner width to ``embed_dim``, so a head-pruned layer is replaced
by :class:`PrunedMultiheadAttention`: the same call signature, parameter names and outputs, an
inner width of ``num_heads * head_dim`` (``head_dim`` and the ``1/sqrt(head_dim)`` scale unchanged).
Its output equals the original's with the removed heads' ``out_proj`` columns set to zero::

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.structured.attention import prune_heads
    >>> mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    >>> small = prune_heads(mha, [0, 2])
    >>> small.num_heads, tuple(small.in_proj_weight.shape), tuple(small.out_proj.weight.shape)
    (2, (24, 16), (16, 8))
    >>> x = torch.randn(2, 5, 16)
    >>> small(x, x, x)[0].shape
    torch.Size([2, 5, 16])

Its ``embed_dim`` is read from ``in_proj_weight``, so hidden-size pruning (:mod:`.hidden_attn`) narrows
the stream side (``in_proj_weight`` input columns, ``out_proj`` rows) in place, heads and ``head_dim`` unchanged.

Supported: ``kdim == vdim == embed_dim`` (packed ``in_proj_weight``), no ``bias_k``/``bias_v``, no
``add_zero_attn``, 2-D ``attn_mask`` and ``key_padding_mask``. Anything else is left intact by the
step (reported with :func:`unsupported_reason`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


class PrunedMultiheadAttention(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.batch_first, self.dropout = batch_first, dropout
        inner = num_heads * head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner)) if bias else None
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)
        nn.init.xavier_uniform_(self.in_proj_weight)

    @property
    def embed_dim(self) -> int:
        """The stream width, read from the weights (hidden-size pruning narrows it in place)."""
        return self.in_proj_weight.shape[1]

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not self.batch_first or not batched:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        b, lq, _ = query.shape
        ls = key.shape[1]
        h, d = self.num_heads, self.head_dim
        w = self.in_proj_weight.chunk(3)
        bs = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q = F.linear(query, w[0], bs[0]).reshape(b, lq, h, d).transpose(1, 2)
        k = F.linear(key, w[1], bs[1]).reshape(b, ls, h, d).transpose(1, 2)
        v = F.linear(value, w[2], bs[2]).reshape(b, ls, h, d).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d)
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(lq, ls, dtype=torch.bool, device=q.device).triu(1)
        if attn_mask is not None:
            scores = scores.masked_fill(attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
                else scores + attn_mask
        if key_padding_mask is not None:
            kpm = key_padding_mask[:, None, None, :]
            scores = scores.masked_fill(kpm, float("-inf")) if kpm.dtype == torch.bool else scores + kpm
        attn = F.dropout(scores.softmax(-1), self.dropout, self.training)
        out = self.out_proj((attn @ v).transpose(1, 2).reshape(b, lq, h * d))
        if not self.batch_first or not batched:
            out = out.transpose(0, 1)
        if not batched:
            out, attn = out.squeeze(1), attn.squeeze(0)
        weights = (attn.mean(-3) if average_attn_weights else attn) if need_weights else None
        return out, weights


ATTENTION = (nn.MultiheadAttention, PrunedMultiheadAttention)


def unsupported_reason(m: nn.Module) -> str | None:
    if isinstance(m, PrunedMultiheadAttention):
        return None
    if not m._qkv_same_embed_dim:
        return "kdim/vdim differ from embed_dim"
    if m.bias_k is not None or m.add_zero_attn:
        return "bias_k/bias_v or add_zero_attn"
    return None


def head_dim(m: nn.Module) -> int:
    return m.head_dim


def head_parts(m: nn.Module) -> list[Tensor]:
    """Per head (rows): its q, k, v projection rows (+ biases) and its ``out_proj`` columns."""
    h, d = m.num_heads, m.head_dim
    w = m.in_proj_weight.detach().reshape(3, h, d, -1)
    parts = [w[i].reshape(h, -1) for i in range(3)]
    if m.in_proj_bias is not None:
        parts += [b.reshape(h, -1) for b in m.in_proj_bias.detach().reshape(3, h, d)]
    parts.append(m.out_proj.weight.detach().reshape(m.embed_dim, h, d).transpose(0, 1).reshape(h, -1))
    return parts


@torch.no_grad()
def prune_heads(m: nn.Module, keep: list[int]) -> PrunedMultiheadAttention:
    """A :class:`PrunedMultiheadAttention` holding heads ``keep`` (sorted) of ``m``."""
    h, d = m.num_heads, m.head_dim
    keep_t = torch.as_tensor(sorted(keep), dtype=torch.long)
    new = PrunedMultiheadAttention(m.in_proj_weight.shape[1], len(keep), d, bias=m.in_proj_bias is not None,
                                   batch_first=m.batch_first, dropout=m.dropout)
    new.to(device=m.in_proj_weight.device, dtype=m.in_proj_weight.dtype)
    new.in_proj_weight.copy_(m.in_proj_weight.reshape(3, h, d, -1)[:, keep_t].reshape(3 * len(keep) * d, -1))
    if m.in_proj_bias is not None:
        new.in_proj_bias.copy_(m.in_proj_bias.reshape(3, h, d)[:, keep_t].reshape(-1))
        new.out_proj.bias.copy_(m.out_proj.bias)
    e = m.out_proj.out_features
    new.out_proj.weight.copy_(m.out_proj.weight.reshape(e, h, d)[:, keep_t].reshape(e, -1))
    new.train(m.training)
    return new
