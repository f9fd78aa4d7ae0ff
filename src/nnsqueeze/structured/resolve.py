"""Resolve the channel spaces of a traced model into prunable groups, channel by channel.

The rules (:mod:`.rules`) leave a :class:`~.spaces.Builder`: spaces merged by a union-find, and the
couplings between their channels: *links* (channel ``i`` of one list is channel ``i`` of another:
residual adds, channel shuffles), *folds* (grouped convolutions and ``chunk``: ``c`` goes with
``c + k*period``) and *blocks* (GroupNorm: a whole norm group goes). Here every channel of the
merged spaces is an element of a second union-find; its classes are the *units* that are removed
together. Units used by the same layers the same number of times form one :class:`~.spaces.Group`,
whose members index the units' positions in each layer (explicitly when a shuffle interleaved them).
Equal-count *ties* (``chunk`` of an interleaved tensor) are translated to the groups' channels for
the allocator::

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.structured.graph import build_graph
    >>> class Shuffle(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b, self.c = nn.Conv2d(2, 4, 1), nn.Conv2d(2, 4, 1), nn.Conv2d(8, 3, 1)
    ...     def forward(self, x):
    ...         y = torch.cat([self.a(x), self.b(x)], 1)
    ...         y = y.view(y.size(0), 2, 4, 3, 3).transpose(1, 2).contiguous().view(y.size(0), 8, 3, 3)
    ...         return self.c(y)
    >>> g = build_graph(Shuffle(), torch.randn(1, 2, 3, 3))
    >>> [(grp.size, sorted((m.module, m.role, m.offset, m.expand) for m in grp.members)) for grp in g.groups]
    [(4, [('a', 'out', 0, 1), ('b', 'out', 0, 1), ('c', 'in', 0, 2)])]
"""

from __future__ import annotations

import math
from typing import Sequence

from .spaces import Builder, DependencyGraph, Group, Member


class _UF:
    def __init__(self, n: int):
        self.p = list(range(n))

    def find(self, a: int) -> int:
        p = self.p
        while p[a] != a:
            p[a] = p[p[a]]
            a = p[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.p[max(ra, rb)] = min(ra, rb)


def _reason(b: Builder, spaces: list[int]) -> str | None:
    """Why a merged space is left whole (the rules' freezes, and norm/fold clashes), or None."""
    reasons = [b.frozen[s] for s in spaces if s in b.frozen]
    n = max(b.length[s] for s in spaces)
    period = math.gcd(*[b.period.get(s, b.length[s]) for s in spaces])
    block = math.lcm(*[b.block.get(s, 1) for s in spaces])
    if period < n and block > 1:
        reasons.append("grouped convolution and GroupNorm on the same channels")
    elif block >= n and n > 1:
        reasons.append("GroupNorm with a single group normalizes across all its channels")
    return reasons[0] if reasons else None


def _members(module: str, role: str, blocks: list[list[list[int]]]) -> list[Member]:
    """Members of one layer dimension, given per unit its position blocks (one per channel it holds)."""
    k, e0 = len(blocks[0]), len(blocks[0][0])
    if all(len(b) == e0 for unit in blocks for b in unit):
        runs = [[p for b in unit for p in b] for unit in blocks]
        if all(r == list(range(r[0], r[0] + len(r))) for r in runs):
            copies = [runs]                                         # each unit: one run of positions
        else:
            copies = [[unit[t] for unit in blocks] for t in range(k)]   # k channels per unit, apart
    else:
        copies = [[[p for b in unit for p in b] for unit in blocks]]
    out = []
    for pos in copies:
        flat = [p for unit in pos for p in unit]
        e = len(pos[0])
        if flat == list(range(flat[0], flat[0] + len(flat))):
            out.append(Member(module, role, flat[0], e))
        else:
            out.append(Member(module, role, 0, e, index=tuple(flat)))
    return out


def _plain(b: Builder, spaces: list[int], g: DependencyGraph, fast: dict[int, tuple[int, int, int]]) -> None:
    """One group for spaces tied channel for channel (the common case), with its folds and blocks."""
    members = [m for s in spaces for m in b.members[s]]
    n = max(b.length[s] for s in spaces)
    period = math.gcd(*[b.period.get(s, b.length[s]) for s in spaces])
    block = math.lcm(*[b.block.get(s, 1) for s in spaces])
    if period < n:   # channel c (< period) stands for c, c + period, c + 2*period, ...
        members = [Member(m.module, m.role, m.offset + k * period * m.expand, m.expand)
                   for s in spaces for m in b.members[s] for k in range((m.span or b.length[s]) // period)]
        n = period
    elif block > 1:  # channel c stands for the block c*block .. c*block + block-1
        members = [Member(m.module, m.role, m.offset, m.expand * block) for m in members]
        n //= block
    else:
        members = [Member(m.module, m.role, m.offset, m.expand) for m in members]
    gid = len(g.groups)
    g.groups.append(Group(gid, n, members))
    for s in spaces:
        fast[s] = (gid, period, block)


def resolve(b: Builder) -> DependencyGraph:
    """The prunable groups, frozen spaces, skipped layers and count ties of a built graph."""
    roots: dict[int, list[int]] = {}
    for s in range(len(b.parent)):
        roots.setdefault(b.find(s), []).append(s)
    links: dict[int, list[tuple[int, Sequence[int], int, Sequence[int]]]] = {}
    for lk in b.links:
        links.setdefault(b.find(lk[0]), []).append(lk)
    g = DependencyGraph(skipped=dict(b.skipped))
    where: dict[tuple[int, int], tuple[int, int]] = {}      # (space, channel) -> (group id, channel)
    fast: dict[int, tuple[int, int, int]] = {}              # space -> (group id, period, block) (plain)
    for root, spaces in roots.items():
        members = [(s, m) for s in spaces for m in b.members[s]]
        reason = _reason(b, spaces)
        if reason:
            layers = sorted({m.module for _, m in members if m.role == "out"})
            if layers:
                g.frozen.append((", ".join(layers), reason))
            continue
        if not any(m.role == "out" for _, m in members):
            continue
        if all(m.chans is None for _, m in members) and all(
                type(ca) is range and ca == cb and ca.start == 0 for _, ca, _, cb in links.get(root, [])):
            _plain(b, spaces, g, fast)   # channel i is channel i everywhere: no per-channel work
            continue
        base, total = {}, 0
        for s in spaces:
            base[s], total = total, total + b.length[s]
        uf = _UF(total)
        for s in spaces:
            n, p, k = b.length[s], b.period.get(s, 0), b.block.get(s, 1)
            for c in range(n):
                if 0 < p < n:
                    uf.union(base[s] + c, base[s] + c % p)
                if k > 1:
                    uf.union(base[s] + c, base[s] + c - c % k)
        for sa, ca, sb, cb in links.get(root, []):
            for x, y in zip(ca, cb):
                uf.union(base[sa] + x, base[sb] + y)
        unit_ids: dict[int, int] = {}
        unit = [unit_ids.setdefault(uf.find(e), len(unit_ids)) for e in range(total)]
        # per layer dimension, per unit: position blocks (one per channel of a space it holds)
        dims: dict[tuple[str, str], list[list[list[int]]]] = {}
        for s, m in members:
            per = dims.setdefault((m.module, m.role), [[] for _ in unit_ids])
            chans = m.chans if m.chans is not None else range(m.span or b.length[s])
            for i, c in enumerate(chans):
                per[unit[base[s] + c]].append(list(range(m.offset + i * m.expand, m.offset + (i + 1) * m.expand)))
        classes: dict[tuple, list[int]] = {}   # units used alike by every layer form one group
        for u in range(len(unit_ids)):
            sig = tuple((d, tuple(sorted(len(bl) for bl in per[u]))) for d, per in dims.items() if per[u])
            classes.setdefault(sig, []).append(u)
        local: dict[int, tuple[int, int]] = {}
        for sig, units in classes.items():
            if not any(role == "out" for (_, role), _ in sig):
                g.frozen.append((", ".join(sorted({mod for (mod, _), _ in sig})), "channels no layer produces"))
                continue
            grp = [x for d, _ in sig for x in _members(*d, [sorted(dims[d][u]) for u in units])]
            gid = len(g.groups)
            g.groups.append(Group(gid, len(units), grp))
            for i, u in enumerate(units):
                local[u] = (gid, i)
        for s in spaces:
            for c in range(b.length[s]):
                if unit[base[s] + c] in local:
                    where[(s, c)] = local[unit[base[s] + c]]
    for tie in b.ties:
        pieces = []
        for piece in tie:
            counts: dict[int, dict[int, int]] = {}
            for el in piece:
                if el[0] in fast:
                    gid, period, block = fast[el[0]]
                    c = el[1] % period // block
                elif el in where:
                    gid, c = where[el]
                else:
                    continue   # a frozen channel: never removed
                counts.setdefault(gid, {})
                counts[gid][c] = counts[gid].get(c, 0) + 1
            pieces.append(counts)
        if any(pieces):
            g.ties.append(pieces)
    return g
