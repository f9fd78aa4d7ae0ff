"""Attention cores in a ``torch.export`` graph: which Linears make the query, key, value and output of each.

An attention core is ``aten.scaled_dot_product_attention(q, k, v)`` or ``matmul(softmax(scores), v)``
with ``scores`` a ``matmul(q, k^T)`` (scaled, masked). From each of q, k and v the graph is walked
back, through the operations a head-wise pipeline uses (reshape into heads, transpose, RoPE's
``mul``/``neg``/``slice``/``cat``, a KV cache ``cat``, grouped-query ``unsqueeze``/``expand``), to
the one Linear that produced it; from the core's output forward through reshapes and transposes to
the one Linear that reads it. Accepted when every node on those paths is used only on them (no head
layout leaks elsewhere), the three Linears are distinct modules called once, the reshape after each
one splits its rows head-major (``(..., heads, head_dim)``) and the widths agree: ``q`` rows
``H*d``, ``k`` rows ``KV*d``, ``v`` rows ``KV*dv``, the output projection ``H*dv`` columns, ``KV``
dividing ``H``. One pruned channel is then one key/value head with the ``H/KV`` query heads after it
(the layout of ``repeat_kv`` and of ``enable_gqa``). Anything else is reported with the reason, and
its channels stay frozen by the ordinary rules::

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.structured.xgraph import export_program
    >>> from nnsqueeze.structured.xattn import find_cores
    >>> class Attn(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.q, self.k, self.v, self.o = nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(8, 4), nn.Linear(8, 8)
    ...     def forward(self, x):
    ...         B, L, _ = x.shape
    ...         q = self.q(x).view(B, L, -1, 2).transpose(1, 2)
    ...         k, v = (f(x).view(B, L, -1, 2).transpose(1, 2) for f in (self.k, self.v))
    ...         y = nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    ...         return self.o(y.transpose(1, 2).reshape(B, L, -1))
    >>> m = Attn()
    >>> cores, inner, rejected = find_cores(m, export_program(m, torch.randn(2, 3, 8)))
    >>> [(c.q, c.k, c.v, c.o, c.kv, c.rep, c.d) for c in cores], rejected
    ([('q', 'k', 'v', 'o', 2, 2, 2)], [])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

PASS = {"view", "reshape", "_unsafe_view", "transpose", "permute", "contiguous", "clone", "expand", "unsqueeze",
        "to", "_to_copy", "mul", "add", "neg", "cat", "slice", "detach", "alias", "lift_fresh_copy"}
OUT_PASS = {"view", "reshape", "_unsafe_view", "transpose", "permute", "contiguous", "clone", "to", "_to_copy"}
SCORE_PASS = {"mul", "div", "add", "sub", "to", "_to_copy", "masked_fill", "where"}
PROB_PASS = {"dropout", "to", "_to_copy", "clone", "contiguous"}


@dataclass(frozen=True)
class Core:
    """One attention core: the module that owns it, its Linears and its head layout."""
    owner: str
    q: str
    k: str
    v: str
    o: str
    d: int        # query/key head size
    dv: int       # value head size
    kv: int       # key/value heads (the group's channels)
    rep: int      # query heads per key/value head


def _op(node: Any) -> str:
    t = node.target
    return t._schema.name.split("::")[-1] if hasattr(t, "_schema") else ""


def _shape(node: Any) -> tuple[int, ...]:
    val = node.meta.get("val")
    return tuple(int(d) for d in val.shape) if isinstance(val, torch.Tensor) else ()


def _users(node: Any) -> list[Any]:
    """The users of ``node`` that compute something (not export's ``_assert_*`` metadata checks)."""
    return [u for u in node.users if not _op(u).startswith("_assert")]


def _nodes(a: Any) -> list[Any]:
    if isinstance(a, torch.fx.Node):
        return [a]
    if isinstance(a, (list, tuple)):
        return [n for x in a for n in _nodes(x)]
    return []


def _module(model: nn.Module, node: Any) -> str | None:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else None


def _linears(model: nn.Module, nodes: list[Any]) -> dict[Any, str]:
    """``aten.linear`` nodes run by an ``nn.Linear`` module (its path)."""
    out = {}
    for n in nodes:
        if _op(n) == "linear":
            path = _module(model, n)
            try:
                if path is not None and isinstance(model.get_submodule(path), nn.Linear):
                    out[n] = path
            except AttributeError:
                pass
    return out


def _back(start: Any, linears: dict[Any, str], tainted: set[Any]) -> tuple[Any, set[Any]] | str:
    """The one Linear node ``start`` comes from, and the nodes in between; or why not."""
    found, region, stack, seen = set(), set(), [start], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in linears:
            found.add(n)
            continue
        if n not in tainted:
            continue   # masks, RoPE tables, an empty cache: no channels
        if _op(n) not in PASS:
            return f"{_op(n) or n.op} between a projection and the attention"
        region.add(n)
        stack.extend(x for a in list(n.args) + list(n.kwargs.values()) for x in _nodes(a))
    if len(found) != 1:
        return f"{len(found)} projections feed one attention input"
    return found.pop(), region


def _probs(node: Any) -> tuple[list[Any], Any] | None:
    """From a softmax: the nodes up to the ``matmul`` with the values, and that matmul."""
    chain, cur = [], node
    while len(_users(cur)) == 1:
        u = _users(cur)[0]
        if _op(u) in ("matmul", "bmm") and u.args[0] is cur:
            return chain, u
        if _op(u) not in PROB_PASS:
            return None
        chain.append(u)
        cur = u
    return None


def _scores(node: Any, tainted: set[Any]) -> tuple[list[Any], Any] | None:
    """From a softmax back: the scaling/masking nodes and the ``matmul(q, k^T)``."""
    chain, cur = [], node.args[0]
    while _op(cur) in SCORE_PASS:
        chain.append(cur)
        nxt = [a for a in _nodes(list(cur.args)) if a in tainted]
        if len(nxt) != 1:
            return None
        cur = nxt[0]
    return (chain, cur) if _op(cur) in ("matmul", "bmm") else None


def _core(model: nn.Module, node: Any, tainted: set[Any]) -> tuple[Any, Any, Any, Any, set[Any]] | None:
    """(q, k, v, output node, core nodes) of an attention core at ``node``, or None."""
    if _op(node) == "scaled_dot_product_attention":
        return node.args[0], node.args[1], node.args[2], node, {node}
    if _op(node) in ("softmax", "_softmax") and node in tainted:
        s, p = _scores(node, tainted), _probs(node)
        if s is None or p is None:
            return None
        return s[1].args[0], s[1].args[1], p[1].args[1], p[1], {node, s[1], p[1], *s[0], *p[0]}
    return None


def find_cores(model: nn.Module, ep: Any) -> tuple[list[Core], set[Any], list[tuple[str, str]]]:
    """The accepted cores, the exported graph's nodes inside them (taken out of the channel rules), and
    ``(module, reason)`` for each core that was not accepted."""
    nodes = list(ep.graph_module.graph.nodes)
    linears = _linears(model, nodes)
    calls: dict[str, int] = {}
    for path in linears.values():
        calls[path] = calls.get(path, 0) + 1
    tainted: set[Any] = set()
    for n in nodes:
        if n in linears or any(a in tainted for a in _nodes(list(n.args) + list(n.kwargs.values()))):
            tainted.add(n)
    cores, inner, rejected = [], set(), []
    for n in nodes:
        found = _core(model, n, tainted)
        if found is None:
            continue
        owner = _module(model, n) or n.name
        got = _accept(model, found, linears, calls, tainted, owner)
        if isinstance(got, str):
            rejected.append((owner, got))
            continue
        core, region = got
        cores.append(core)
        inner |= region
    return cores, inner, rejected


def _accept(model: nn.Module, found: tuple, linears: dict[Any, str], calls: dict[str, int], tainted: set[Any],
            owner: str) -> tuple[Core, set[Any]] | str:
    q, k, v, out, region = found
    lins = []
    for x in (q, k, v):
        got = _back(x, linears, tainted)
        if isinstance(got, str):
            return got
        lins.append(got[0])
        region |= got[1]
    cur, o = out, None
    while o is None:
        if len(_users(cur)) != 1:
            return "the attention output is used by more than its output projection"
        u = _users(cur)[0]
        if u in linears and u.args[0] is cur:
            o = u
        elif _op(u) in OUT_PASS:
            region.add(u)
            cur = u
        else:
            return f"{_op(u) or u.op} between the attention and its output projection"
    names = [linears[x] for x in (*lins, o)]
    if len(set(names)) != 4 or any(calls[p] != 1 for p in names):
        return "q/k/v/output projections are not four distinct Linears called once"
    for lin in lins:
        if any(u not in region for u in _users(lin)):
            return f"{linears[lin]}'s output is used outside the attention"
    for n in region - {out}:
        if any(u not in region and u is not o for u in _users(n)):
            return f"{n.name} ({_op(n)}) inside the attention is used outside it"
    d, dv, hq = _shape(q)[-1], _shape(v)[-1], _shape(q)[-3] if len(_shape(q)) >= 3 else 0
    lq, lk, lv, lo = (model.get_submodule(p) for p in names)
    if not (d and dv and hq) or lq.out_features != hq * d or lk.out_features % d or \
            lv.out_features * d != lk.out_features * dv or lo.in_features != hq * dv:
        return "q/k/v/output projection widths do not agree with the attention's head shapes"
    kv = lk.out_features // d
    if kv == 0 or hq % kv:
        return f"{hq} query heads are not a multiple of {kv} key/value heads"
    for lin, heads, size in zip(lins, (hq, kv, kv), (d, d, dv)):
        first = _users(lin)[0]
        if _op(first) not in ("view", "reshape", "_unsafe_view") or _shape(first)[-2:] != (heads, size):
            return f"{linears[lin]}'s rows are not split head-major into ({heads}, {size})"
    return Core(owner, *names, d, dv, kv, hq // kv), region
