"""One entry point for the attention layers whose heads are pruned inside the layer.

``nn.MultiheadAttention`` (:mod:`.attention`), torchvision's Swin window attention
(:mod:`.window_attention`) and torchvision's MaxViT attention (:mod:`.maxvit_attention`): :func:`head_types`
lists the classes, and :func:`head_parts`, :func:`prune_heads`, :func:`unsupported_reason`,
:func:`num_heads` dispatch to the module that knows the layer::

    >>> from torch import nn
    >>> from nnsqueeze.structured.heads import head_types, prune_heads
    >>> mha = nn.MultiheadAttention(8, 4)
    >>> isinstance(mha, head_types()), prune_heads(mha, [1, 2]).num_heads
    (True, 2)
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ModelError
from . import attention, maxvit_attention, window_attention


def head_types() -> tuple[type, ...]:
    """The attention classes with head pruning (torchvision's only once its Swin / MaxViT module is imported)."""
    return attention.ATTENTION + window_attention.window_types() + maxvit_attention.relative_types()


def _impl(m: nn.Module):
    if isinstance(m, attention.ATTENTION):
        return attention
    if isinstance(m, window_attention.window_types()):
        return window_attention
    if isinstance(m, maxvit_attention.relative_types()):
        return maxvit_attention
    raise ModelError(type(m).__name__, "not an attention layer whose heads nnsqueeze prunes",
                     fix="load onto the same architecture that was compressed")


def num_heads(m: nn.Module) -> int:
    """The layer's head count (torchvision's MaxViT attention calls it ``n_heads``)."""
    return m.n_heads if _impl(m) is maxvit_attention else m.num_heads


def unsupported_reason(m: nn.Module) -> str | None:
    return _impl(m).unsupported_reason(m)


def head_parts(m: nn.Module) -> list[torch.Tensor]:
    """Per head (rows): every weight that belongs to it (for the importance criteria)."""
    return _impl(m).head_parts(m)


def prune_heads(m: nn.Module, keep: list[int]) -> nn.Module:
    """A replacement for ``m`` holding heads ``keep`` only."""
    return _impl(m).prune_heads(m, keep)
