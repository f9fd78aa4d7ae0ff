"""Sizes read from a tensor's shape, and reshapes that keep the channel axis whole.

``x.shape`` / ``x.size()`` give a :class:`Dims`, ``x.shape[i]`` / ``x.size(i)`` a :class:`Dim` that
remembers which tensor and axis it was read from. A reshape keeps the channels when one output axis
has the input's channel count with the same number of elements before it (window partitions that
split or merge the spatial axes only: MaxViT's ``x.reshape(B, C, H // P, P, W // P, P)``). Its size
there must follow the channels after pruning: ``-1``, or that same tensor's channel count read at run
time; a constant (``self.hidden_dim``) or another tensor's count freezes the channels, and a channel
count given to the reshape of another tensor freezes the tensor it was read from::

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.structured.graph import build_graph
    >>> class Windows(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = nn.Conv2d(2, 6, 1), nn.Linear(6, 3)
    ...     def forward(self, x):
    ...         h = self.a(x)
    ...         B, C, H, W = h.shape
    ...         h = h.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 3, 5, 1)   # channels last
    ...         return self.b(h.reshape(B, (H // 2) * (W // 2), 4, C))
    >>> g = build_graph(Windows(), torch.randn(1, 2, 4, 6))
    >>> [(grp.size, sorted((m.module, m.role) for m in grp.members)) for grp in g.groups]
    [(6, [('a', 'out'), ('b', 'in')])]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .spaces import Builder, Info


@dataclass(frozen=True)
class Dims:
    """``x.shape`` of a tracked tensor."""
    info: Info


@dataclass(frozen=True)
class Dim:
    """``x.shape[index]`` of a tracked tensor; ``channels``: it is that tensor's channel count."""
    info: Info
    index: int

    @property
    def channels(self) -> bool:
        return self.index == self.info.axis


def query(x: Info | None, attr: str, index: Any) -> Dims | Dim | None:
    """``x.shape`` (``attr="shape"``), ``x.size()`` or ``x.size(index)``."""
    if x is None:
        return None
    if attr == "size" and isinstance(index, int):
        return Dim(x, index % x.ndim)
    return Dims(x)


def item(b: Builder, where: str, dims: Dims, index: Any) -> Dim | None:
    """``dims[index]``: an int gives a :class:`Dim`; a slice over the channel axis freezes the channels."""
    if isinstance(index, int):
        return Dim(dims.info, index % dims.info.ndim)
    b.leave(where, "slice of a shape that holds the channel count", dims.info)
    return None


def channel_uses(values: Any) -> list[Dim]:
    """Every channel-count :class:`Dim` (or whole :class:`Dims`) in ``values`` (nested tuples/lists/dicts)."""
    if isinstance(values, Dim):
        return [values] if values.channels else []
    if isinstance(values, Dims):
        return [Dim(values.info, values.info.axis)]
    if isinstance(values, (tuple, list)):
        return [d for v in values for d in channel_uses(v)]
    if isinstance(values, dict):
        return [d for v in values.values() for d in channel_uses(v)]
    return []


def freeze_uses(b: Builder, where: str, values: Any) -> None:
    """Channel counts that would not follow pruning here: the tensors they were read from keep their channels."""
    for d in channel_uses(values):
        b.leave(where, "uses a tensor's channel count read from its shape", d.info)


def reshape(b: Builder, where: str, x: Info | None, in_shape: tuple, shape: tuple,
            raw: list, sizes: list) -> tuple[bool, Info | None]:
    """A reshape/view with size arguments ``raw`` (fx) resolved to ``sizes``; returns (handled, output).

    Not handled (``False``): the channel axis is not kept whole, the caller's flatten rules apply.
    """
    if x is None or len(raw) != len(shape):
        freeze_uses(b, where, [d for d in channel_uses(sizes) if x is None or d.info.segs != x.segs])
        return x is None, None
    before = math.prod(in_shape[:x.axis])
    axis = next((j for j in range(len(shape)) if shape[j] == in_shape[x.axis]
                 and math.prod(shape[:j]) == before), None)
    if axis is None:   # flatten rules decide about x; another tensor's channel count pins that tensor
        freeze_uses(b, where, [d for d in channel_uses(sizes) if d.info.segs != x.segs])
        return False, None
    own = sizes[axis]
    others = [s for j, s in enumerate(sizes) if j != axis]
    freeze_uses(b, where, others)
    if raw[axis] == -1 or (isinstance(own, Dim) and own.channels and own.info.segs == x.segs):
        return True, Info(axis, len(shape), x.segs)
    freeze_uses(b, where, [own])
    b.leave(where, "reshape to a channel count fixed in forward() (use -1 or the tensor's own size)", x)
    return True, None
