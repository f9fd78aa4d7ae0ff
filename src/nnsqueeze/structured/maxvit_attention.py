"""Attention-head pruning for torchvision's MaxViT attention (``RelativePositionalMultiHeadAttention``).

MaxViT's block (window) and grid attention both run this layer on ``[B, G, P, D]`` partitions. Its
forward reshapes the heads' output back to the *input* width ``D``, so a layer with fewer heads cannot
run through it. A head-pruned layer is therefore replaced by :class:`PrunedRelativeAttention`: the same
parameter and buffer names (``to_qkv``, ``merge``, ``relative_position_bias_table``,
``relative_position_index``), the same call and output, an inner width of ``n_heads * head_dim``
(``head_dim`` unchanged, and so is ``scale_factor``: torchvision scales the keys by ``feat_dim ** -0.5``, the
input width, which pruning does not change). A removed head takes its q, k and v rows of ``to_qkv`` (weight
and bias), its ``merge`` input columns and its column of the relative-position bias table, as Swin's window
attention does (:mod:`.window_attention`). The output equals the original's with the removed heads'
``merge`` input columns set to zero::

    >>> import torch
    >>> from nnsqueeze.zoo.tvision import import_torchvision
    >>> from nnsqueeze.structured.maxvit_attention import prune_heads
    >>> maxvit = import_torchvision().models.maxvit
    >>> attn = maxvit.RelativePositionalMultiHeadAttention(12, 3, 4).eval()   # 4 heads of 3, 2x2 partitions
    >>> small = prune_heads(attn, [0, 3])
    >>> small.n_heads, tuple(small.to_qkv.weight.shape), tuple(small.merge.weight.shape)
    (2, (18, 12), (12, 6))
    >>> small(torch.randn(2, 5, 4, 12)).shape
    torch.Size([2, 5, 4, 12])

The torchvision class is recognised without importing torchvision (:func:`relative_types` looks it up in
``sys.modules``: a model holding it has imported it already). The structured graph keeps the layer whole
(a leaf, like ``nn.MultiheadAttention``): its channels are the residual stream's, its heads are pruned here.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from .window_attention import keep_packed_heads, packed_head_parts

Tensor = torch.Tensor

_TV = "torchvision.models.maxvit"
_TV_CLASS = "RelativePositionalMultiHeadAttention"


class PrunedRelativeAttention(nn.Module):
    """A MaxViT relative-position attention with ``n_heads`` heads of ``head_dim``; built by :func:`prune_heads`."""

    def __init__(self, n_heads: int, head_dim: int, max_seq_len: int, size: int, scale_factor: float):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        self.max_seq_len, self.size, self.scale_factor = max_seq_len, size, scale_factor

    @property
    def num_heads(self) -> int:
        return self.n_heads

    def get_relative_positional_bias(self) -> Tensor:
        index = self.relative_position_index.view(-1)
        bias = self.relative_position_bias_table[index].view(self.max_seq_len, self.max_seq_len, -1)
        return bias.permute(2, 0, 1).contiguous().unsqueeze(0)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``[B, G, P, D]``; the heads' output is ``n_heads * head_dim`` wide before ``merge``."""
        b, g, p, _ = x.shape
        h, dh = self.n_heads, self.head_dim
        q, k, v = torch.chunk(self.to_qkv(x), 3, dim=-1)
        q = q.reshape(b, g, p, h, dh).permute(0, 1, 3, 2, 4)
        k = k.reshape(b, g, p, h, dh).permute(0, 1, 3, 2, 4) * self.scale_factor
        v = v.reshape(b, g, p, h, dh).permute(0, 1, 3, 2, 4)
        attn = F.softmax(torch.einsum("bghid,bghjd->bghij", q, k) + self.get_relative_positional_bias(), dim=-1)
        out = torch.einsum("bghij,bghjd->bghid", attn, v)
        return self.merge(out.permute(0, 1, 3, 2, 4).reshape(b, g, p, h * dh))


def relative_types() -> tuple[type, ...]:
    """torchvision's MaxViT attention class (when torchvision's MaxViT module is loaded) and ours."""
    tv = sys.modules.get(_TV)
    return ((getattr(tv, _TV_CLASS),) if hasattr(tv, _TV_CLASS) else ()) + (PrunedRelativeAttention,)


def unsupported_reason(m: nn.Module) -> str | None:
    """Why the heads of ``m`` cannot be pruned (None: they can)."""
    h, d = m.n_heads, m.head_dim
    if m.to_qkv.out_features != 3 * h * d or m.merge.in_features != h * d:
        return f"to_qkv / merge widths do not match n_heads={h} of head_dim={d}"
    if m.relative_position_bias_table.shape[-1] != h:
        return "the relative-position bias table does not hold one column per head"
    return None


def head_parts(m: nn.Module) -> list[Tensor]:
    """Per head (rows): its q, k, v rows of ``to_qkv`` (+ biases) and its ``merge`` input columns."""
    return packed_head_parts(m.to_qkv, m.merge, m.n_heads, m.head_dim)


@torch.no_grad()
def prune_heads(m: nn.Module, keep: list[int]) -> PrunedRelativeAttention:
    """A :class:`PrunedRelativeAttention` holding heads ``keep`` (sorted) of the MaxViT attention ``m``."""
    reason = unsupported_reason(m)
    if reason:
        raise ModelError(type(m).__name__, f"its heads cannot be pruned: {reason}",
                         fix="leave its heads whole (`ignore` the layer)")
    kt, qkv, merge = keep_packed_heads(m, m.to_qkv, m.merge, m.n_heads, m.head_dim, keep)
    new = PrunedRelativeAttention(len(keep), m.head_dim, m.max_seq_len, m.size, m.scale_factor)
    new.to_qkv, new.merge = qkv, merge
    t = m.relative_position_bias_table
    new.relative_position_bias_table = nn.Parameter(t[:, kt].clone(), requires_grad=t.requires_grad)
    for name, buf in m.named_buffers(recurse=False):
        new.register_buffer(name, buf.clone(), persistent=name not in m._non_persistent_buffers_set)
    new.train(m.training)
    return new


def macs(m: nn.Module, x: Tensor) -> int:
    """MACs of the attention core of one call on ``x`` (``[B, G, P, D]``): ``QK^T`` and ``AV`` within each
    partition of ``P`` tokens. ``to_qkv`` and ``merge`` are Linear modules, counted as such."""
    b, g, p, _ = x.shape
    return b * g * p * 2 * p * m.n_heads * m.head_dim
