"""Channel dependency graph: which output channels, in which layers, must be removed together.

The model is traced with ``torch.fx`` and run once on example inputs (``ShapeProp``). Every tensor
in the graph carries its *channel axis* as a list of segments; a segment is a slice of a *channel
space*: the output channels created by one producer (Conv/Linear/Embedding). Operations that tie
channels together (residual ``+``, ``*``, elementwise ops between branches) merge spaces with a
union-find; ``cat`` along the channel axis concatenates segments; ``flatten`` before a ``Linear``
expands each channel to ``L`` consecutive input features; BatchNorm and depthwise convolutions pass
channels through and are shrunk with them. A merged space is one prunable **group**.

Anything the graph cannot prove safe *freezes* the spaces it touches (with a reason): model inputs
and outputs, LayerNorm/GroupNorm (they normalize across channels), grouped convolutions, attention
modules, unknown ops, tensor indexing, reshapes other than flatten, splits inside a segment, shared
weights. Frozen groups are left intact and reported, never broken::

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.structured.graph import build_graph
    >>> m = nn.Sequential(nn.Conv1d(1, 8, 3), nn.BatchNorm1d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6, 4))
    >>> g = build_graph(m, torch.randn(2, 1, 8))
    >>> [(grp.size, sorted({(mb.module, mb.role) for mb in grp.members})) for grp in g.groups]
    [(8, [('0', 'out'), ('1', 'out'), ('4', 'in')])]
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError

# ---- data structures ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Seg:
    """``length`` channels of ``space`` laid out along an axis; each channel spans ``expand`` positions."""
    space: int
    length: int
    expand: int = 1


@dataclass(frozen=True)
class Member:
    """A layer dimension that follows a space: channel ``c`` is index ``offset + c*expand + j`` of it.

    ``role`` is ``out`` (the layer's output dimension: conv/linear rows, BN vectors, depthwise
    conv channels, embedding columns) or ``in`` (conv/linear input columns).
    """
    module: str
    role: str
    offset: int
    expand: int = 1


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


ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU,
                       nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Dropout,
                       nn.Dropout1d, nn.Dropout2d, nn.Identity)
POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
CROSS_CHANNEL_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
UNARY_FUNCS = {F.relu, torch.relu, F.relu6, F.gelu, F.silu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh,
               F.leaky_relu, F.hardswish, F.hardsigmoid, F.elu, F.mish, F.dropout, F.dropout1d, F.dropout2d,
               operator.neg, torch.neg, torch.abs, torch.exp}
UNARY_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "float", "clone", "detach", "neg", "abs", "exp",
                 "relu_", "sigmoid_"}
BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.imul,
          torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum}
BINARY_METHODS = {"add", "sub", "mul", "div", "add_", "mul_"}
POOL_FUNCS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
              F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
              F.adaptive_max_pool1d, F.adaptive_max_pool2d}
SHAPE_QUERIES = {"size", "dim", "numel"}


class _Builder:
    def __init__(self, model: nn.Module):
        self.model = model
        self.parent: list[int] = []
        self.length: list[int] = []
        self.members: list[list[Member]] = []
        self.frozen: dict[int, str] = {}   # space -> reason (only on spaces, resolved at the end)
        self.origin: list[str] = []
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
            self.members[s.space].append(Member(module, role, off, s.expand))
            off += s.length * s.expand
        if module in self.shared:
            self.freeze(info, f"{module} shares a weight with {', '.join(x for x in self.shared[module] if x != module)}")

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


def _index_axis(x: Info, index: Any) -> int | None:
    """New channel axis after ``x[index]`` if ``index`` only adds axes (None) or takes full slices."""
    items = list(index) if isinstance(index, tuple) else [index]
    if any(i is not None and i is not Ellipsis and i != slice(None) for i in items):
        return None
    if items.count(Ellipsis) > 1:
        return None
    if Ellipsis in items:
        k = items.index(Ellipsis)
        used = sum(i is not None for i in items if i is not Ellipsis)
        items = items[:k] + [slice(None)] * (x.ndim - used) + items[k + 1:]
    dim = 0
    for pos, i in enumerate(items):
        if i is None:
            continue
        if dim == x.axis:
            return pos
        dim += 1
    return len(items) + (x.axis - dim)  # the axis is among the untouched trailing dims


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
                         "data-dependent control flow); Hugging Face models are not supported yet") from None
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    with torch.no_grad():
        was = gm.training
        gm.eval()
        ShapeProp(gm).propagate(*args)
        gm.train(was)
    return gm


def build_graph(model: nn.Module, example_inputs: Any) -> DependencyGraph:
    """Trace ``model`` on ``example_inputs`` and return its prunable channel groups."""
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
            out = _module_rule(b, node.target, mods[node.target], ins[0] if ins else None, ins, shape, node)
        else:
            out = _function_rule(b, node, where, args, ins, shape)
        env[node.name] = out

    roots: dict[int, list[int]] = {}
    for s in range(len(b.parent)):
        roots.setdefault(b.find(s), []).append(s)
    g = DependencyGraph(skipped=dict(b.skipped))
    for root, spaces in roots.items():
        members = [m for s in spaces for m in b.members[s]]
        reasons = [b.frozen[s] for s in spaces if s in b.frozen]
        if reasons:
            layers = sorted({m.module for m in members if m.role == "out"})
            if layers:
                g.frozen.append((", ".join(layers), reasons[0]))
            continue
        if not any(m.role == "out" for m in members):
            continue
        g.groups.append(Group(len(g.groups), b.length[root], members))
    return g


def _module_rule(b: _Builder, name: str, mod: nn.Module, x: Info | None, ins: list[Info],
                 shape: tuple[int, ...] | None, node: Any) -> Info | None:
    if isinstance(mod, nn.modules.conv._ConvNd) and not mod.transposed:
        if x is not None and x.axis != 1:
            b.leave(name, "input channels are not on axis 1", x)
            x = None
        if mod.groups == 1:
            if x is not None:
                b.member(x, name, "in")
            s = b.new(mod.out_channels, name)
            info = Info(1, len(shape), (Seg(s, mod.out_channels),))
            b.member(info, name, "out")
            return info
        if mod.groups == mod.in_channels == mod.out_channels:  # depthwise: channels pass through
            if x is None:
                s = b.new(mod.out_channels, name, frozen=f"{name}: depthwise conv on a fixed input")
                return Info(1, len(shape), (Seg(s, mod.out_channels),))
            b.member(x, name, "out")
            return Info(1, len(shape), x.segs)
        b.leave(name, f"grouped convolution (groups={mod.groups}) is not pruned", x)
        return Info(1, len(shape), (Seg(b.new(mod.out_channels, name, frozen=f"{name}: grouped conv"),
                                        mod.out_channels),))
    if isinstance(mod, nn.Linear):
        if x is not None and x.axis != x.ndim - 1:
            b.leave(name, "input features are not the last axis", x)
            x = None
        if x is not None:
            b.member(x, name, "in")
        s = b.new(mod.out_features, name)
        info = Info(len(shape) - 1, len(shape), (Seg(s, mod.out_features),))
        b.member(info, name, "out")
        return info
    if isinstance(mod, nn.Embedding):
        s = b.new(mod.embedding_dim, name)
        info = Info(len(shape) - 1, len(shape), (Seg(s, mod.embedding_dim),))
        b.member(info, name, "out")
        return info
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        if x is None:
            return None
        if x.axis != 1:
            b.leave(name, "BatchNorm over a non-channel axis", x)
            return None
        b.member(x, name, "out")
        return x
    if isinstance(mod, CROSS_CHANNEL_NORMS):
        b.leave(name, f"{type(mod).__name__} normalizes across channels; its input channels are kept", *ins)
        return None
    if isinstance(mod, ELEMENTWISE_MODULES):
        return x
    if isinstance(mod, nn.PReLU):
        if mod.num_parameters == 1:
            return x
        b.leave(name, "per-channel PReLU is not pruned", x)
        return None
    if isinstance(mod, POOL_MODULES):
        if x is not None and x.axis != 1:
            b.leave(name, "pooling over the channel axis", x)
            return None
        return x
    if isinstance(mod, nn.Flatten):
        return _flatten(b, name, x, mod.start_dim, shape)
    from .attention import ATTENTION

    reason = ("attention: its embed_dim channels are kept (heads are pruned inside the layer)"
              if isinstance(mod, ATTENTION) else f"{type(mod).__name__} is not supported by structured pruning")
    b.leave(name, reason, *ins)
    return None


def _flatten(b: _Builder, where: str, x: Info | None, start: int, shape: tuple[int, ...] | None) -> Info | None:
    if x is None or shape is None:
        return None
    start = start % x.ndim
    if x.axis == start and len(shape) == start + 1:
        inner = shape[start] // sum(s.length * s.expand for s in x.segs)
        return Info(start, len(shape), tuple(Seg(s.space, s.length, s.expand * inner) for s in x.segs))
    if x.axis < start:
        return Info(x.axis, len(shape), x.segs)
    b.leave(where, "flatten/reshape that mixes channels", x)
    return None


def _function_rule(b: _Builder, node: Any, where: str, args: list, ins: list[Info],
                   shape: tuple[int, ...] | None) -> Any:
    t, method = node.target, node.op == "call_method"
    x = args[0] if args and isinstance(args[0], Info) else None
    if method and t in SHAPE_QUERIES or (not method and t in (getattr, len)):
        return None
    if shape is None and t is not operator.getitem and not (method and t in ("split", "chunk")) \
            and t not in (torch.split, torch.chunk):
        b.leave(f"{node.name} ({where})", "op with non-tensor output", *ins)
        return None
    if (method and t in UNARY_METHODS) or (not method and t in UNARY_FUNCS):
        return x
    if (method and t in BINARY_METHODS) or (not method and t in BINARY):
        out = b.union_infos(ins, node.name)
        for a, info in zip(node.args, args):  # an untracked operand with a channel axis pins the channels
            sh = _shape(a) if info is None and hasattr(a, "meta") else None
            if out is not None and sh is not None and 0 <= len(sh) + out.axis - out.ndim < len(sh) \
                    and sh[len(sh) + out.axis - out.ndim] != 1:
                b.leave(node.name, "combined with a tensor whose channels the graph does not track", out)
        return out
    if not method and t in POOL_FUNCS:
        return x if x is None or x.axis == 1 else b.leave(node.name, "pooling over channels", x)
    if (method and t in ("flatten", "view", "reshape")) or t is torch.flatten or t is torch.reshape:
        if x is None:
            return None
        if tuple(shape) == tuple(node.args[0].meta["tensor_meta"].shape):
            return x
        if t in ("flatten",) or t is torch.flatten:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            return _flatten(b, node.name, x, start, shape)
        sizes = node.args[1:] if len(node.args) > 2 or not isinstance(node.args[1], (tuple, list)) else node.args[1]
        if sizes and isinstance(sizes[-1], int) and sizes[-1] != -1:
            return b.leave(node.name, "reshape to a fixed size (use flatten or -1)", x)
        return _flatten(b, node.name, x, len(shape) - 1, shape) if len(shape) <= x.ndim else \
            b.leave(node.name, "reshape that mixes channels", x)
    if t in ("mean", "sum", "amax") or t in (torch.mean, torch.sum, torch.amax):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        if x is None or dims is None:
            return b.leave(node.name, "reduction over all axes", x) if x else None
        dims = [d % x.ndim for d in (dims if isinstance(dims, (tuple, list)) else [dims])]
        if x.axis in dims:
            return b.leave(node.name, "reduction over the channel axis", x)
        axis = x.axis if keep else x.axis - sum(d < x.axis for d in dims)
        return Info(axis, len(shape), x.segs)
    if (method and t in ("transpose", "permute")) or t in (torch.transpose, torch.permute):
        if x is None:
            return None
        rest = list(node.args[1:])
        if t in ("transpose", torch.transpose):
            d0, d1 = (r % x.ndim for r in rest[:2])
            perm = list(range(x.ndim))
            perm[d0], perm[d1] = perm[d1], perm[d0]
        else:
            perm = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else list(rest)
            perm = [p % x.ndim for p in perm]
        return Info(perm.index(x.axis), x.ndim, x.segs)
    if t is torch.cat or t is torch.concat:
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        parts = list(args[0])
        dim = dim % len(shape)
        if all(p is not None and p.axis == dim for p in parts):
            return Info(dim, len(shape), tuple(s for p in parts for s in p.segs))
        if any(p is not None and p.axis == dim for p in parts):  # a fixed tensor joins the channels
            segs = []
            for p, a in zip(parts, tensors):
                if p is None:
                    n = a.meta["tensor_meta"].shape[dim]
                    segs.append(Seg(b.new(n, node.name, frozen=f"{node.name}: concatenated with a fixed tensor"), n))
                else:
                    segs.extend(p.segs)
            return Info(dim, len(shape), tuple(segs))
        return b.union_infos(parts, node.name)
    if t in ("split", "chunk") or t in (torch.split, torch.chunk):
        if x is None:
            return None
        dim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % x.ndim
        if dim != x.axis:
            return ("pieces", x)
        return b.leave(node.name, "split along channels: its sizes are fixed in forward()", x)
    if t is operator.getitem:
        src = args[0]
        if isinstance(src, tuple) and len(src) == 2 and src[0] == "pieces":
            return src[1] if isinstance(src[1], Info) else src[1][node.args[1]]
        if isinstance(src, Info):
            axis = _index_axis(src, node.args[1])
            return Info(axis, len(shape), src.segs) if axis is not None else b.leave(node.name, "tensor indexing", src)
        return None
    if (method and t == "unsqueeze") or t is torch.unsqueeze:
        if x is None:
            return None
        d = (node.args[1] if len(node.args) > 1 else node.kwargs["dim"]) % (x.ndim + 1)
        return Info(x.axis + (d <= x.axis), x.ndim + 1, x.segs)
    b.leave(f"{node.name} ({where})", "operation not understood by the dependency graph", *ins)
    return None
