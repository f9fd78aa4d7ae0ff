"""The per-operation rules of the channel dependency graph (:mod:`.graph`): how each layer, function
and tensor method moves, joins, folds or freezes the channel segments flowing through it.

``module_rule`` handles ``call_module`` nodes (Conv/Linear/Embedding produce new channel spaces,
BatchNorm/depthwise conv/GroupNorm follow them, LayerNorm and unknown modules freeze them);
``function_rule`` handles functions and tensor methods (elementwise ops join branches, ``cat``
concatenates, ``chunk`` folds, ``flatten``/``transpose``/reductions move the channel axis)::

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.structured.graph import build_graph
    >>> g = build_graph(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)), torch.randn(2, 3))
    >>> g.groups, g.skipped["1"]
    ([], 'LayerNorm normalizes across channels; its input channels are kept')
    >>> g = build_graph(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)), torch.randn(2, 3), norms=True)
    >>> [(grp.size, sorted((m.module, m.role) for m in grp.members)) for grp in g.groups]   # norms: prune
    [(4, [('0', 'out'), ('1', 'out'), ('2', 'in')])]
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import shapes
from .attention import ATTENTION
from .maxvit_attention import relative_types
from .permute import chunk_pieces, shuffle, shuffle_groups
from .spaces import Builder, Info, Member, Seg, Split, node_shape

ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU,
                       nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Dropout,
                       nn.Dropout1d, nn.Dropout2d, nn.Identity)
POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
OWN_PRUNER = (nn.modules.conv._ConvNd, nn.Linear, nn.Embedding, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
              nn.LayerNorm)
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
# functions that scale whole samples (or the whole batch) by one factor: channels pass through.
# Matched by module and name so that the graph needs no torchvision import
# (torchvision.ops.stochastic_depth is an fx-wrapped leaf function: identity in eval mode, a
# per-row Bernoulli factor in training; timm's drop_path is the same per-sample factor).
PER_SAMPLE_FUNCS = {("torchvision.ops.stochastic_depth", "stochastic_depth"), ("timm.layers.drop", "drop_path")}


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


def _per_sample(t: Any) -> bool:
    """torchvision's ``stochastic_depth`` (fx-wrapped): drops whole samples, channels pass through."""
    return getattr(t, "__name__", "") == "stochastic_depth" and getattr(t, "__module__", "").startswith("torchvision.")


def module_rule(b: Builder, name: str, mod: nn.Module, x: Info | None, ins: list[Info],
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
        # grouped: input column j of the weight is channel j of *every* group; rows are per group
        G = mod.groups
        if x is not None and len(x.segs) == 1 and x.segs[0].expand == 1 and name not in b.shared:
            sp = x.segs[0].space
            b.fold(sp, mod.in_channels // G)
            b.members[sp].append(Member(name, "in", 0, 1, span=mod.in_channels // G))
        elif x is not None:
            b.leave(name, f"grouped convolution (groups={G}) reads concatenated tensors; its input channels "
                    "are kept", x)
        s = b.new(mod.out_channels, name)
        b.fold(s, mod.out_channels // G)
        info = Info(1, len(shape), (Seg(s, mod.out_channels),))
        b.member(info, name, "out")
        return info
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
    if isinstance(mod, nn.GroupNorm) and x is not None and x.axis == 1:
        size = mod.num_channels // mod.num_groups
        if any(sg.length % size or sg.expand != 1 for sg in x.segs):
            b.leave(name, "GroupNorm groups straddle concatenated tensors; its channels are kept", x)
            return None
        for sg in x.segs:
            b.coarsen(sg.space, size)
        if mod.affine:
            b.member(x, name, "out")
        return x
    if isinstance(mod, nn.LayerNorm) and b.norms and x is not None:
        return _layer_norm(b, name, mod, x, tuple(mod.normalized_shape))
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

    heads = isinstance(mod, ATTENTION + relative_types())
    reason = ("attention: its embed_dim channels are kept (heads are pruned inside the layer)" if heads
              else f"{type(mod).__name__} is not supported by structured pruning")
    b.leave(name, reason, *ins)
    return None


def _layer_norm(b: Builder, name: str, mod: nn.Module, x: Info, normalized: tuple) -> Info | None:
    """``norms: prune``: a LayerNorm over the channel axis alone loses the pruned channels with its weight and
    bias (it then normalizes over the kept ones)."""
    if len(normalized) != 1 or x.axis != x.ndim - 1 or not isinstance(mod, nn.LayerNorm):
        b.leave(name, "LayerNorm over more than the channel axis; its input channels are kept", x)
        return None
    b.member(x, name, "out")
    return x


def _param_target(b: Builder, node: Any, layers: bool = False) -> str | None:
    """``module.attr`` of a parameter or buffer read by a ``get_attr`` node (``layers``: also of a layer
    whose own pruner slices it)."""
    if not (hasattr(node, "op") and node.op == "get_attr" and isinstance(node.target, str)):
        return None
    owner, _, attr = node.target.rpartition(".")
    try:
        mod = b.model.get_submodule(owner)
    except AttributeError:
        return None
    if isinstance(mod, OWN_PRUNER) and not layers:   # a layer's own weight/bias: its pruner slices them with its role
        return None
    return node.target if isinstance(getattr(mod, attr, None), torch.Tensor) else None


def _flatten(b: Builder, where: str, x: Info | None, start: int, shape: tuple[int, ...] | None) -> Info | None:
    if x is None or shape is None:
        return None
    start = start % x.ndim
    if x.axis == start and len(shape) == start + 1:
        inner = shape[start] // sum(s.length * s.expand for s in x.segs)
        return Info(start, len(shape), tuple(Seg(s.space, s.length, s.expand * inner, s.span, s.chans)
                                             for s in x.segs))
    if x.axis < start:
        return Info(x.axis, len(shape), x.segs)
    b.leave(where, "flatten/reshape that mixes channels", x)
    return None


def _split_rule(b: Builder, node: Any, where: str, args: list, ins: list[Info],
                shape: tuple[int, ...] | None) -> Any:
    """The middle of a channel shuffle (checked as a chain by :func:`~.permute.shuffle_groups`)."""
    t, method = node.target, node.op == "call_method"
    sp = args[0] if args and isinstance(args[0], Split) else None
    if sp is not None:
        if method and t == "contiguous":
            return sp
        if not sp.swapped and ((method and t == "transpose") or t is torch.transpose):
            return Split(sp.info, sp.groups, True)
        if sp.swapped and ((method and t in ("view", "reshape")) or t is torch.reshape) \
                and shape is not None and len(shape) == sp.info.ndim:
            return shuffle(b, node.name, sp.info, sp.groups)
    b.leave(f"{node.name} ({where})", "channel axis split into groups and used by an operation the graph does "
            "not know", *ins)
    return None


def function_rule(b: Builder, node: Any, where: str, args: list, ins: list[Info],
                   shape: tuple[int, ...] | None) -> Any:
    t, method = node.target, node.op == "call_method"
    x = args[0] if args and isinstance(args[0], Info) else None
    if not method and t is getattr and len(node.args) > 1 and node.args[1] == "shape":
        return shapes.query(x, "shape", None)
    if method and t == "size":
        return shapes.query(x, "size", node.args[1] if len(node.args) > 1 else node.kwargs.get("dim"))
    if t is operator.getitem and isinstance(args[0], shapes.Dims):
        return shapes.item(b, node.name, args[0], node.args[1])
    if method and t in SHAPE_QUERIES or (not method and t in (getattr, len)):
        return None
    if shape is None and not ins:
        return None  # arithmetic on sizes (``C // groups``): no channels flow through it
    if any(isinstance(a, Split) for a in args) or any(isinstance(v, Split) for v in node.kwargs.values()):
        return _split_rule(b, node, where, args, ins, shape)
    if not method and (getattr(t, "__module__", ""), getattr(t, "__name__", "")) in PER_SAMPLE_FUNCS:
        return x
    if shape is None and t is not operator.getitem and not (method and t in ("split", "chunk")) \
            and t not in (torch.split, torch.chunk):
        if ins:   # arithmetic on sizes, asserts: no channels flow in, nothing to report
            b.leave(f"{node.name} ({where})", "op with non-tensor output", *ins)
        return None
    if (method and t in UNARY_METHODS) or (not method and t in UNARY_FUNCS) or _per_sample(t):
        return x
    if t is F.layer_norm:
        w = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
        target = _param_target(b, w, layers=True)
        owner = target.rpartition(".")[0] if target else None
        mod = b.model.get_submodule(owner) if owner is not None else None
        if b.norms and x is not None and owner is not None and isinstance(mod, nn.LayerNorm) \
                and target == f"{owner}.weight":    # a LayerNorm subclass calling F.layer_norm (LayerNorm2d)
            return _layer_norm(b, owner, mod, x, tuple(node.args[1]))
        return b.leave(owner or f"{node.name} ({where})", "LayerNorm normalizes across channels; its input channels "
                       "are kept" + ("" if b.norms else " (norms: prune removes them with the norm)"), x)
    if (method and t in BINARY_METHODS) or (not method and t in BINARY):
        out = b.union_infos(ins, node.name)
        for a, info in zip(node.args, args):  # an untracked operand with a channel axis pins the channels
            sh = node_shape(a) if info is None and hasattr(a, "meta") else None
            if out is not None and sh is not None and 0 <= len(sh) + out.axis - out.ndim < len(sh) \
                    and sh[len(sh) + out.axis - out.ndim] != 1:
                target, dim = _param_target(b, a), len(sh) + out.axis - out.ndim
                if b.norms and target is not None and sh[dim] == sum(s.length * s.expand for s in out.segs):
                    b.param(out, target, dim)   # layer scale, position embedding: per-channel entries go too
                    continue
                b.leave(node.name, "combined with a tensor whose channels the graph does not track", out)
        return out
    if not method and t in POOL_FUNCS:
        return x if x is None or x.axis == 1 else b.leave(node.name, "pooling over channels", x)
    if (method and t in ("view", "reshape")) or t is torch.reshape:
        one = len(node.args) == 2 and isinstance(node.args[1], (tuple, list))
        handled, out = shapes.reshape(b, node.name, x, tuple(node.args[0].meta["tensor_meta"].shape), shape,
                                      list(node.args[1] if one else node.args[1:]), list(args[1] if one else args[1:]))
        if handled:
            return out
    if (method and t in ("flatten", "view", "reshape")) or t is torch.flatten or t is torch.reshape:
        if x is None:
            return None
        if tuple(shape) == tuple(node.args[0].meta["tensor_meta"].shape):
            return x
        g = shuffle_groups(node, x, shape) if not (t == "flatten" or t is torch.flatten) else 0
        if g:
            return Split(x, g)
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
    if (method and t in ("transpose", "permute", "swapaxes", "swapdims")) or \
            t in (torch.transpose, torch.permute, torch.swapaxes, torch.swapdims):
        if x is None:
            return None
        rest = list(node.args[1:])
        if t in ("transpose", "swapaxes", "swapdims", torch.transpose, torch.swapaxes, torch.swapdims):
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
        # chunk(n) along channels: the sizes follow the tensor, so n equal pieces stay equal when every
        # piece loses the same channels: fold the space with period C/n, each piece is that period
        n = node.args[1] if len(node.args) > 1 else node.kwargs.get("chunks")
        if t in ("chunk", torch.chunk) and isinstance(n, int) and len(x.segs) == 1 and x.segs[0].expand == 1 \
                and not x.segs[0].span and x.segs[0].chans is None and x.segs[0].length % n == 0:
            sg = x.segs[0]
            b.fold(sg.space, sg.length // n)
            return ("pieces", Info(x.axis, x.ndim, (Seg(sg.space, sg.length // n, 1, sg.length // n),)))
        if t in ("chunk", torch.chunk) and isinstance(n, int) and (len(x.segs) > 1 or x.segs[0].chans is not None):
            return chunk_pieces(b, node.name, x, n)   # an interleaved tensor: pieces tied to lose equally
        return b.leave(node.name, "split along channels: its sizes are fixed in forward() (chunk(n) of one "
                       "tensor is pruned)", x)
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
    if ins:       # an op on tensors whose channels are not tracked (already kept) changes nothing
        b.leave(f"{node.name} ({where})", "operation not understood by the dependency graph", *ins)
    return None
