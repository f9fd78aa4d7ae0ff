"""Channel permutations and uneven couplings for the dependency graph: channel shuffle, ``chunk`` of
an interleaved tensor.

**Channel shuffle** (ShuffleNet: ``x.view(N, g, C/g, H, W).transpose(1, 2).contiguous().view(N, C,
H, W)``): output channel ``b*g + a`` is input channel ``a*C/g + b``. The pruned model runs the same
code on fewer channels, so it equals the original with channels removed only when every group ``a``
keeps the same ``b`` s: input channels ``b, C/g + b, ...`` are *linked* (removed together), and the
output lists them interleaved (explicit channel lists, :func:`~.spaces.runs`). The three nodes are
matched as one chain (:func:`shuffle_groups`); any other reshape of the channel axis stays frozen.

**chunk of an interleaved tensor** (ShuffleNet's ``x.chunk(2, dim=1)`` after a shuffle): the pieces
must stay equal, but which channels go matters not; linking piece ``k``'s channel ``i`` with piece
0's (as ``chunk`` of one plain tensor does) would merge more and more channels into one unit at every
block. A *tie* is recorded instead: the allocator removes as many positions from every piece
(:func:`~.allocate.enforce_ties`)::

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.structured.graph import build_graph
    >>> class Unit(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b, self.c = nn.Conv2d(2, 4, 1), nn.Conv2d(2, 4, 1), nn.Conv2d(4, 4, 1)
    ...         self.d = nn.Conv2d(8, 3, 1)
    ...     def forward(self, x):
    ...         y = torch.cat([self.a(x), self.b(x)], 1)
    ...         y = y.view(1, 2, 4, 3, 3).transpose(1, 2).contiguous().view(1, 8, 3, 3)
    ...         x1, x2 = y.chunk(2, dim=1)
    ...         return self.d(torch.cat([x1, self.c(x2)], 1))
    >>> g = build_graph(Unit(), torch.randn(1, 2, 3, 3))
    >>> [grp.size for grp in g.groups], len(g.ties)
    ([2, 2, 4], 1)
"""

from __future__ import annotations

from typing import Any

from .spaces import Builder, Info, elements, node_shape, runs


def _only_user(node: Any) -> Any:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _is_swap(node: Any, axis: int, ndim: int) -> bool:
    import torch
    if not ((node.op == "call_method" and node.target == "transpose") or node.target is torch.transpose):
        return False
    dims = [d for d in node.args[1:3]] if len(node.args) >= 3 else []
    return len(dims) == 2 and all(isinstance(d, int) for d in dims) and \
        sorted(d % ndim for d in dims) == [axis, axis + 1]


def _is_reshape(node: Any) -> bool:
    import torch
    return (node.op == "call_method" and node.target in ("view", "reshape", "flatten")) or \
        node.target in (torch.reshape, torch.flatten)


def shuffle_groups(node: Any, x: Info, shape: tuple[int, ...] | None) -> int:
    """``g`` if ``node`` (a view/reshape of ``x``) starts a channel shuffle with ``g`` groups, else 0."""
    src = node_shape(node.args[0]) if node.args and hasattr(node.args[0], "meta") else None
    if src is None or shape is None or len(shape) != len(src) + 1:
        return 0
    a = x.axis
    if shape[:a] != src[:a] or shape[a + 2:] != src[a + 1:] or shape[a] * shape[a + 1] != src[a] \
            or shape[a] < 2 or shape[a + 1] < 2:
        return 0
    swap = _only_user(node)
    if swap is None or not _is_swap(swap, a, len(shape)):
        return 0
    nxt = _only_user(swap)
    if nxt is not None and nxt.op == "call_method" and nxt.target == "contiguous":
        nxt = _only_user(nxt)
    if nxt is None or not _is_reshape(nxt) or node_shape(nxt) != src:
        return 0
    return shape[a]


def shuffle(b: Builder, where: str, x: Info, g: int) -> Info | None:
    """The channel axis after a shuffle of ``g`` groups; links the channels each group must share."""
    el = elements(x)
    if el is None or x.segs[0].expand != 1 or len(el) % g:
        b.leave(where, "channel shuffle of flattened or uneven channels", x)
        return None
    p = len(el) // g
    for a in range(1, g):
        for j in range(p):
            (sa, ca), (sb, cb) = el[a * p + j], el[j]
            b.link(sa, (ca,), sb, (cb,))
    return Info(x.axis, x.ndim, runs([el[a * p + j] for j in range(p) for a in range(g)]))


def chunk_pieces(b: Builder, where: str, x: Info, n: int) -> Any:
    """``("pieces", [Info, ...])`` for ``chunk(n)`` of a multi-segment channel axis, tied to lose equally."""
    el = elements(x)
    if el is None or len(el) % n:
        b.leave(where, "chunk of channels that do not split evenly", x)
        return None
    m = len(el) // n
    pieces = [el[k * m:(k + 1) * m] for k in range(n)]
    b.ties.append(pieces)
    return ("pieces", [Info(x.axis, x.ndim, runs(p, x.segs[0].expand)) for p in pieces])
