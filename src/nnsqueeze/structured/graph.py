"""Channel dependency graph: which output channels, in which layers, must be removed together.

The model is traced with ``torch.fx`` and run once on example inputs (``ShapeProp``). Every tensor
in the graph carries its *channel axis* as a list of segments; a segment is a slice of a *channel
space*: the output channels created by one producer (Conv/Linear/Embedding). Operations that tie
channels together (residual ``+``, ``*``, elementwise ops between branches) merge spaces with a
union-find; ``cat`` along the channel axis concatenates segments; ``flatten`` before a ``Linear``
expands each channel to ``L`` consecutive input features; BatchNorm and depthwise convolutions pass
channels through and are shrunk with them. Two coarser couplings are kept per space and resolved
when the group is built: a grouped convolution (``groups=G``) *folds* its input and output spaces
(channel ``c`` goes with ``c + k*C/G``: every group keeps the same count, and the weight's shared
input columns stay aligned); a GroupNorm *blocks* its space (the ``C/G`` channels of one norm group
go together, so the other groups' statistics are unchanged). A merged space is one prunable **group**.

``chunk(n)`` along channels folds the same way (the pieces stay equal). Anything the graph cannot
prove safe *freezes* the spaces it touches (with a reason): model inputs and outputs, LayerNorm (it
normalizes across all channels), attention modules, unknown ops, tensor indexing, reshapes other than
flatten, ``split`` with sizes, shared weights. The per-operation rules are in :mod:`.rules`. Frozen
groups are left intact and reported, never broken::

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.structured.graph import build_graph
    >>> m = nn.Sequential(nn.Conv1d(1, 8, 3), nn.BatchNorm1d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6, 4))
    >>> g = build_graph(m, torch.randn(2, 1, 8))
    >>> [(grp.size, sorted({(mb.module, mb.role) for mb in grp.members})) for grp in g.groups]
    [(8, [('0', 'out'), ('1', 'out'), ('4', 'in')])]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import ModelError

# ---- data structures ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Seg:
    """``length`` channels of ``space`` laid out along an axis; each channel spans ``expand`` positions.

    ``span`` > 0: a piece of a ``chunk`` along channels: ``length`` channels that stand for channel
    ``c``, ``c + length``, ... of the (folded) space.
    """
    space: int
    length: int
    expand: int = 1
    span: int = 0


@dataclass(frozen=True)
class Member:
    """A layer dimension that follows a space: channel ``c`` is index ``offset + c*expand + j`` of it.

    ``role`` is ``out`` (the layer's output dimension: conv/linear rows, BN/GroupNorm vectors,
    depthwise conv channels, embedding columns) or ``in`` (conv/linear input columns). ``span``
    (internal, 0 = the whole space) is how many channels of its space a member indexes: a grouped
    conv's weight reads only ``C_in / groups`` input columns, shared by every group.
    """
    module: str
    role: str
    offset: int
    expand: int = 1
    span: int = 0


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


class _Builder:
    def __init__(self, model: nn.Module):
        self.model = model
        self.parent: list[int] = []
        self.length: list[int] = []
        self.members: list[list[Member]] = []
        self.frozen: dict[int, str] = {}   # space -> reason (only on spaces, resolved at the end)
        self.origin: list[str] = []
        self.period: dict[int, int] = {}   # space -> fold period (grouped conv): c couples with c + k*period
        self.block: dict[int, int] = {}    # space -> block size (GroupNorm): c couples with its block
        self.skipped: dict[str, str] = {}
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

    def freeze(self, info: Any, reason: str) -> None:
        for i in _infos(info):
            for s in i.segs:
                self.frozen.setdefault(s.space, reason)

    def member(self, info: Info, module: str, role: str) -> None:
        off = 0
        for s in info.segs:
            self.members[s.space].append(Member(module, role, off, s.expand, s.span))
            off += s.length * s.expand
        if module in self.shared:
            self.freeze(info, f"{module} shares a weight with {', '.join(x for x in self.shared[module] if x != module)}")

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
            if ((ref.axis - ref.ndim) != (o.axis - o.ndim) or [(s.length, s.expand) for s in ref.segs]
                    != [(s.length, s.expand) for s in o.segs]):
                for i in infos:
                    self.freeze(i, f"{where}: branches with different channel layouts")
                return None
            for a, b in zip(ref.segs, o.segs):
                self.union(a.space, b.space)
        return max(infos, key=lambda i: i.ndim)


def _infos(x: Any) -> list[Info]:
    if isinstance(x, Info):
        return [x]
    if isinstance(x, (tuple, list)):
        return [i for v in x for i in _infos(v)]
    if isinstance(x, dict):
        return [i for v in x.values() for i in _infos(v)]
    return []


def _shape(node: Any) -> tuple[int, ...] | None:
    tm = node.meta.get("tensor_meta") if hasattr(node, "meta") else None
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None


def _trace(model: nn.Module, example_inputs: Any):
    import torch.fx
    from torch.fx.passes.shape_prop import ShapeProp

    from .attention import ATTENTION

    class _Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, ATTENTION) or super().is_leaf_module(m, qualname)

    try:
        gm = torch.fx.GraphModule(model, _Tracer().trace(model))
    except Exception as e:
        raise ModelError(type(model).__name__, f"torch.fx cannot trace the model ({type(e).__name__}: "
                         f"{str(e)[:200]})", fix="structured pruning needs a forward() that torch.fx can trace (no "
                         "data-dependent control flow); Hugging Face attention / feed-forward blocks are "
                         "pruned by module patterns instead (structured/hf.py)") from None
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    with torch.no_grad():
        was = gm.training
        gm.eval()
        ShapeProp(gm).propagate(*args)
        gm.train(was)
    return gm


def build_graph(model: nn.Module, example_inputs: Any) -> DependencyGraph:
    """Trace ``model`` on ``example_inputs`` and return its prunable channel groups."""
    from .rules import function_rule, module_rule

    gm = _trace(model, example_inputs)
    b = _Builder(model)
    env: dict[str, Any] = {}
    mods = dict(model.named_modules())

    def get(a: Any) -> Any:
        if hasattr(a, "name") and hasattr(a, "op"):
            return env.get(a.name)
        if isinstance(a, (tuple, list)):
            return type(a)(get(x) for x in a)
        if isinstance(a, dict):
            return {k: get(v) for k, v in a.items()}
        return None

    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in gm.graph.nodes:
        shape = _shape(node)
        args = [get(a) for a in node.args]
        ins = [i for a in args for i in _infos(a)]
        kw = {k: get(v) for k, v in node.kwargs.items()}
        ins += [i for v in kw.values() for i in _infos(v)]
        out: Any = None
        where = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        if node.op == "placeholder":
            out = None  # inputs: nothing prunable flows in
        elif node.op == "output":
            b.freeze(ins, "reaches the model output")
        elif node.op == "get_attr":
            out = None
        elif node.op == "call_module" and calls[node.target] > 1 and any(True for _ in mods[node.target].parameters()):
            b.leave(node.target, f"called {calls[node.target]} times in forward(); its channels are kept", *ins)
            out = None
        elif node.op == "call_module":
            out = module_rule(b, node.target, mods[node.target], ins[0] if ins else None, ins, shape, node)
        else:
            out = function_rule(b, node, where, args, ins, shape)
        env[node.name] = out

    roots: dict[int, list[int]] = {}
    for s in range(len(b.parent)):
        roots.setdefault(b.find(s), []).append(s)
    g = DependencyGraph(skipped=dict(b.skipped))
    for root, spaces in roots.items():
        members = [m for s in spaces for m in b.members[s]]
        reasons = [b.frozen[s] for s in spaces if s in b.frozen]
        n = max(b.length[s] for s in spaces)    # spaces of other lengths join through chunk pieces
        period = math.gcd(*[b.period.get(s, b.length[s]) for s in spaces])
        block = math.lcm(*[b.block.get(s, 1) for s in spaces])
        if period < n and block > 1:
            reasons.append("grouped convolution and GroupNorm on the same channels")
        elif block >= n and n > 1:
            reasons.append("GroupNorm with a single group normalizes across all its channels")
        if reasons:
            layers = sorted({m.module for m in members if m.role == "out"})
            if layers:
                g.frozen.append((", ".join(layers), reasons[0]))
            continue
        if not any(m.role == "out" for m in members):
            continue
        if period < n:   # channel c (< period) stands for c, c + period, c + 2*period, ...
            members = [Member(m.module, m.role, m.offset + k * period * m.expand, m.expand)
                       for s in spaces for m in b.members[s] for k in range((m.span or b.length[s]) // period)]
            n = period
        elif block > 1:  # channel c stands for the block c*block .. c*block + block-1
            members = [Member(m.module, m.role, m.offset, m.expand * block) for m in members]
            n //= block
        g.groups.append(Group(len(g.groups), n, members))
    return g
