"""Channel spaces: the data structures of the channel dependency graph and the union-find that ties them.

A *space* is the set of output channels one producer creates; a tensor's channel axis is a list of
:class:`Seg` slices of spaces; a :class:`Member` is a layer dimension that follows a space. The
:class:`Builder` merges spaces (union-find), records folds (grouped convolutions), blocks (GroupNorm)
and freezes; :mod:`.rules` says what each operation does to them and :mod:`.graph` traces the model
and resolves the merged spaces into prunable :class:`Group` s. ::

    >>> from torch import nn
    >>> b = Builder(nn.Linear(2, 2))
    >>> s, t = b.new(4, "a"), b.new(4, "b")
    >>> b.union(s, t); b.find(t) == b.find(s)
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from torch import nn

@dataclass(frozen=True)
class Seg:
    """``length`` channels of ``space`` laid out along an axis; each channel spans ``expand`` positions.

    ``span`` > 0: a piece of a ``chunk`` along channels: ``length`` channels that stand for channel
    ``c``, ``c + length``, ... of the (folded) space. ``chans``: which channels of the space, in this
    order (a channel shuffle interleaves spaces); None: channels ``0 .. length-1``.
    """
    space: int
    length: int
    expand: int = 1
    span: int = 0
    chans: tuple[int, ...] | None = None

    def channels(self) -> Sequence[int]:
        return self.chans if self.chans is not None else range(self.length)


@dataclass(frozen=True)
class Member:
    """A layer dimension that follows a space: channel ``c`` is index ``offset + c*expand + j`` of it.

    ``role`` is ``out`` (the layer's output dimension: conv/linear rows, BN/GroupNorm vectors,
    depthwise conv channels, embedding columns) or ``in`` (conv/linear input columns). ``span``
    (internal, 0 = the whole space) is how many channels of its space a member indexes: a grouped
    conv's weight reads only ``C_in / groups`` input columns, shared by every group. ``chans``
    (internal): the channels of its space it indexes, in order, when not ``0 .. span-1``.
    ``index``: explicit positions, ``expand`` per channel (channel ``c`` is ``index[c*expand:
    (c+1)*expand]``) when they do not follow ``offset + c*expand + j`` (after a channel shuffle).
    """
    module: str
    role: str
    offset: int
    expand: int = 1
    span: int = 0
    chans: tuple[int, ...] | None = None
    index: tuple[int, ...] | None = None

    def positions(self, n: int) -> list[int]:
        """The ``n * expand`` indices of this layer dimension that channels ``0 .. n-1`` cover, in order."""
        if self.index is not None:
            return list(self.index)
        return list(range(self.offset, self.offset + n * self.expand))


@dataclass
class Group:
    """Channels that must be removed together: ``size`` channels, the layer dims that follow them."""
    id: int
    size: int
    members: list[Member]

    @property
    def producers(self) -> list[str]:
        """Layers whose *weights produce* these channels (conv/linear/embedding ``out``)."""
        return sorted({m.module for m in self.members if m.role == "out"})


@dataclass
class Info:
    """What flows along one tensor: its channel axis (non-negative) and rank, and the segments."""
    axis: int
    ndim: int
    segs: tuple[Seg, ...]


@dataclass
class DependencyGraph:
    groups: list[Group] = field(default_factory=list)
    frozen: list[tuple[str, str]] = field(default_factory=list)   # (layers, reason), one per frozen space
    skipped: dict[str, str] = field(default_factory=dict)         # layer -> reason it is left intact
    # equal-count ties (chunk pieces): each piece {group id: {channel: positions}} must lose as many
    # positions as every other piece of its tie
    ties: list[list[dict[int, dict[int, int]]]] = field(default_factory=list)


class Builder:
    """The channel spaces of one traced model: a union-find over spaces, the layer dims that follow
    each, and the couplings (fold, block) and freezes the rules record; :func:`~.graph.build_graph`
    resolves them into groups."""


    def __init__(self, model: nn.Module, norms: bool = False):
        self.model = model
        self.norms = norms                 # LayerNorm over channels and per-channel parameters follow channels
        self.params: dict[str, int] = {}   # "module.attr" -> the space a per-channel parameter follows
        self.parent: list[int] = []
        self.length: list[int] = []
        self.members: list[list[Member]] = []
        self.frozen: dict[int, str] = {}   # space -> reason (only on spaces, resolved at the end)
        self.origin: list[str] = []
        self.period: dict[int, int] = {}   # space -> fold period (grouped conv): c couples with c + k*period
        self.block: dict[int, int] = {}    # space -> block size (GroupNorm): c couples with its block
        self.skipped: dict[str, str] = {}
        # channel-level couplings, resolved in structured/resolve.py: links (channel i of one list is
        # channel i of the other) and ties (the pieces lose equally many channels)
        self.links: list[tuple[int, Sequence[int], int, Sequence[int]]] = []
        self.ties: list[list[list[tuple[int, int]]]] = []
        owners: dict[int, list[str]] = {}
        for name, mod in model.named_modules():
            for p in mod.parameters(recurse=False):
                owners.setdefault(id(p), []).append(name)
        self.shared = {n: ns for ns in owners.values() if len(ns) > 1 for n in ns}

    # union-find
    def new(self, length: int, origin: str, frozen: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.length.append(length)
        self.members.append([])
        self.origin.append(origin)
        if frozen:
            self.frozen[len(self.parent) - 1] = frozen
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra

    def link(self, a: int, chans_a: Sequence[int], b: int, chans_b: Sequence[int]) -> None:
        """Channel ``chans_a[i]`` of space ``a`` is channel ``chans_b[i]`` of space ``b``."""
        self.links.append((a, chans_a, b, chans_b))
        self.union(a, b)

    def freeze(self, info: Any, reason: str) -> None:
        for i in infos(info):
            for s in i.segs:
                self.frozen.setdefault(s.space, reason)

    def member(self, info: Info, module: str, role: str) -> None:
        off = 0
        for s in info.segs:
            chans = s.chans if s.chans is not None or s.span or s.length == self.length[s.space] \
                else tuple(range(s.length))   # the first channels of a space (a piece of a shuffled tensor)
            self.members[s.space].append(Member(module, role, off, s.expand, s.span, chans))
            off += s.length * s.expand
        if module in self.shared:
            others = ", ".join(x for x in self.shared[module] if x != module)
            self.freeze(info, f"{module} shares a weight with {others}")

    def param(self, info: Info, target: str, dim: int) -> None:
        """A parameter/buffer ``target`` (``module.attr``) whose ``dim`` lines up with ``info``'s channels."""
        owner, _, attr = target.rpartition(".")
        if target in self.params:   # used twice: the spaces it meets are one
            if len(info.segs) == 1 and info.segs[0].expand == 1 and not info.segs[0].span:
                self.union(self.params[target], info.segs[0].space)
            else:
                self.freeze(info, f"{target} is used on concatenated channels")
            return
        self.params[target] = info.segs[0].space
        self.member(info, owner, f"param:{attr}:{dim}")

    def fold(self, space: int, period: int) -> None:
        self.period[space] = math.gcd(self.period.get(space, 0), period)

    def coarsen(self, space: int, size: int) -> None:
        self.block[space] = math.lcm(self.block.get(space, 1), size)

    def leave(self, name: str, reason: str, *infos: Any) -> None:
        self.skipped.setdefault(name, reason)
        for i in infos:
            self.freeze(i, f"{name}: {reason}")

    # rules
    def union_infos(self, infos: list[Info], where: str) -> Info | None:
        """Elementwise between tensors: channel i of each is the same channel."""
        infos = [i for i in infos if i is not None]
        if not infos:
            return None
        ref = infos[0]
        for o in infos[1:]:
            if (ref.axis - ref.ndim) == (o.axis - o.ndim) and [(s.length, s.expand) for s in ref.segs] \
                    == [(s.length, s.expand) for s in o.segs]:
                for a, b in zip(ref.segs, o.segs):
                    self.link(a.space, a.channels(), b.space, b.channels())
                continue
            ea, eb = elements(ref), elements(o)
            if (ref.axis - ref.ndim) != (o.axis - o.ndim) or ea is None or eb is None or len(ea) != len(eb) \
                    or ref.segs[0].expand != o.segs[0].expand:
                for i in infos:
                    self.freeze(i, f"{where}: branches with different channel layouts")
                return None
            for (sa, ca), (sb, cb) in zip(ea, eb):   # same channels, cut into other segments
                self.link(sa, (ca,), sb, (cb,))
        return max(infos, key=lambda i: i.ndim)


def elements(info: Info) -> list[tuple[int, int]] | None:
    """``(space, channel)`` per channel along the axis, or None when the segments' ``expand`` differ."""
    if len({s.expand for s in info.segs}) > 1:
        return None
    return [(s.space, c) for s in info.segs for c in s.channels()]


def runs(elems: Sequence[tuple[int, int]], expand: int = 1) -> tuple[Seg, ...]:
    """The segments of a channel axis given ``(space, channel)`` per channel (consecutive runs merged)."""
    out: list[tuple[int, list[int]]] = []
    for space, c in elems:
        if out and out[-1][0] == space and out[-1][1][-1] + 1 == c:
            out[-1][1].append(c)
        else:
            out.append((space, [c]))
    return tuple(Seg(sp, len(cs), expand, 0, None if cs[0] == 0 else tuple(cs)) for sp, cs in out)


def infos(x: Any) -> list[Info]:
    """Every :class:`Info` in ``x`` (an Info, or nested tuples/lists/dicts of them)."""
    if isinstance(x, Info):
        return [x]
    if isinstance(x, Split):
        return [x.info]
    if isinstance(x, (tuple, list)):
        return [i for v in x for i in infos(v)]
    if isinstance(x, dict):
        return [i for v in x.values() for i in infos(v)]
    return []


@dataclass(frozen=True)
class Split:
    """A channel axis reshaped into ``(groups, C/groups)`` on the way of a channel shuffle (rules.py
    checks the whole ``view -> transpose -> view`` chain before making one); ``swapped`` after the
    transpose."""
    info: Info
    groups: int
    swapped: bool = False


def node_shape(node: Any) -> tuple[int, ...] | None:
    """The shape ``ShapeProp`` recorded on an fx node, or None."""
    tm = node.meta.get("tensor_meta") if hasattr(node, "meta") else None
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None
