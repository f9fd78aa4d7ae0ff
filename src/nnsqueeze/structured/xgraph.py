"""The channel dependency graph from ``torch.export`` (non-strict): the aten graph, read back as layers.

``torch.export.export(model, args, strict=False)`` runs the model's own Python and records the aten
operations, so it sees through what ``torch.fx`` cannot trace (Hugging Face models: kwargs plumbing,
caches, data-dependent branches on sizes). Its graph is translated node by node into the torch-level
form the rules of :mod:`.rules` read (:func:`~.graph.walk`):

- a layer op (``aten.conv*``, ``linear``, ``embedding``, ``batch_norm``, ``layer_norm``,
  ``group_norm``) becomes a ``call_module`` of the module its node ran in (the last entry of the
  node's ``nn_module_stack``) when that module is of the layer's type and the op reads its own
  ``weight`` (the parameter placeholder's name in the graph signature); anything else (``F.linear``
  on a computed weight) stays a function and is treated like one;
- the other parameters and buffers become ``get_attr`` of their names (layer scale, RMSNorm weights);
- elementwise, pooling, reduction, reshape, permute, ``cat``, ``split`` and indexing ops become the
  torch functions or tensor methods the rules know; unknown ops stay unknown (they freeze channels).

**Attention heads.** An attention core (``aten.scaled_dot_product_attention``, or ``matmul ->
softmax -> matmul``) whose query, key and value each come from one Linear through reshapes,
transposes, RoPE (``mul``/``neg``/``slice``/``cat``), a KV cache ``cat`` and the grouped-query
``expand``, and whose output reaches one Linear through reshapes only, is one group of key/value
heads (:class:`Core`): q/k/v rows and the output projection's columns, each a whole head (and the
query heads that read it). Its intermediate nodes are taken out of the channel rules. The step keeps
checking such a removal against the original with the heads' columns zeroed (``hf.mismatch``).

What the exported graph cannot see: Python attributes the modules keep about their widths
(``num_attention_heads``, ``intermediate_size``); they are updated by the Hugging Face module
patterns (:func:`~.hf.sync_attrs`), matched to the groups found here. Sizes in the exported graph
are concrete, so a reshape that keeps the channel count is accepted only when it wrote ``-1`` there
or is a ``flatten``; a hard-coded count then fails the pruned model's run, which the step checks.
``split``/``chunk`` along channels appear as ``split`` with fixed sizes and freeze their channels.
::

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.structured.xgraph import build_export_graph
    >>> m = nn.Sequential(nn.Conv1d(1, 8, 3), nn.BatchNorm1d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6, 4))
    >>> g = build_export_graph(m.eval(), torch.randn(2, 1, 8))
    >>> [(grp.size, sorted({(mb.module, mb.role, mb.expand) for mb in grp.members})) for grp in g.groups]
    [(8, [('0', 'out', 1), ('1', 'out', 1), ('4', 'in', 6)])]
"""

from __future__ import annotations

import operator
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from .attention import ATTENTION
from .graph import walk
from .hf import Block, HFGraph, hf_graph
from .macs import eval_mode
from .resolve import resolve
from .spaces import Member
from .xattn import Core, find_cores

aten = torch.ops.aten

UNARY = {"relu", "relu_", "hardtanh", "hardtanh_", "gelu", "silu", "silu_", "sigmoid", "sigmoid_", "tanh",
         "tanh_", "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "leaky_relu", "leaky_relu_", "elu",
         "elu_", "mish", "softplus", "dropout", "dropout_", "feature_dropout", "alpha_dropout", "neg", "abs", "exp",
         "clone", "alias", "detach", "detach_", "to", "_to_copy", "lift_fresh_copy", "erf", "rsqrt", "sqrt",
         "reciprocal", "square"}
BINARY = {"add": operator.add, "add_": operator.add, "sub": operator.sub, "sub_": operator.sub,
          "mul": operator.mul, "mul_": operator.mul, "div": operator.truediv, "div_": operator.truediv,
          "maximum": torch.maximum, "minimum": torch.minimum}
POOLS = {"max_pool1d": F.max_pool1d, "max_pool2d": F.max_pool2d, "max_pool3d": F.max_pool3d,
         "avg_pool1d": F.avg_pool1d, "avg_pool2d": F.avg_pool2d, "avg_pool3d": F.avg_pool3d,
         "adaptive_avg_pool1d": F.adaptive_avg_pool1d, "adaptive_avg_pool2d": F.adaptive_avg_pool2d,
         "adaptive_avg_pool3d": F.adaptive_avg_pool3d, "adaptive_max_pool1d": F.adaptive_max_pool1d,
         "adaptive_max_pool2d": F.adaptive_max_pool2d, "max_pool2d_with_indices": F.max_pool2d,
         "max_pool3d_with_indices": F.max_pool3d}
TUPLE_OPS = {"max_pool2d_with_indices", "max_pool3d_with_indices", "adaptive_max_pool1d", "adaptive_max_pool2d",
             "_native_batch_norm_legit_no_training", "native_layer_norm", "native_group_norm"}
REDUCE = {"mean": torch.mean, "sum": torch.sum, "amax": torch.amax}
LAYER_OPS = {"conv1d": nn.modules.conv._ConvNd, "conv2d": nn.modules.conv._ConvNd, "conv3d": nn.modules.conv._ConvNd,
             "convolution": nn.modules.conv._ConvNd, "linear": nn.Linear, "embedding": nn.Embedding,
             "batch_norm": nn.modules.batchnorm._BatchNorm,
             "_native_batch_norm_legit_no_training": nn.modules.batchnorm._BatchNorm,
             "layer_norm": nn.LayerNorm, "native_layer_norm": nn.LayerNorm, "group_norm": nn.GroupNorm,
             "native_group_norm": nn.GroupNorm}
INT_MAX = 2 ** 62


def _op(node: Any) -> str:
    """``aten.view.default`` -> ``view``."""
    t = node.target
    return t._schema.name.split("::")[-1] if hasattr(t, "_schema") else ""


def export_program(model: nn.Module, example_inputs: Any) -> Any:
    """``torch.export.export(model, ..., strict=False)`` in eval mode; a :class:`ModelError` if it fails."""
    args, kwargs = (example_inputs, {}) if isinstance(example_inputs, tuple) else \
        ((), dict(example_inputs)) if isinstance(example_inputs, dict) else ((example_inputs,), {})
    # A Hugging Face model returns its KV cache (a DynamicCache torch.export cannot flatten) unless
    # told not to; the cache is no part of the computation the channel rules read.
    configs = [m.config for m in model.modules() if getattr(getattr(m, "config", None), "use_cache", False) is True]
    try:
        for c in configs:
            c.use_cache = False
        with eval_mode(model), torch.no_grad():
            return torch.export.export(model, args, kwargs, strict=False)
    except Exception as e:
        raise ModelError(type(model).__name__, f"torch.export cannot export the model ({type(e).__name__}: "
                         f"{str(e)[:200]})", fix="structured pruning needs a model torch.export (non-strict) or "
                         "torch.fx can trace; set `graph: fx` to use torch.fx") from None
    finally:
        for c in configs:
            c.use_cache = True


class _Translator:
    """Builds the torch-level fx graph the rules read from an exported program's aten graph."""

    def __init__(self, model: nn.Module, ep: Any, skip: set[Any]):
        self.model, self.ep, self.skip = model, ep, skip
        sig = ep.graph_signature
        self.names = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
        self.params = set(sig.inputs_to_parameters.values())
        self.g = torch.fx.Graph()
        self.env: dict[Any, Any] = {}

    def _meta(self, new: Any, old: Any) -> Any:
        val = old.meta.get("val")
        if isinstance(val, torch.Tensor):
            new.meta["tensor_meta"] = SimpleNamespace(shape=tuple(int(d) for d in val.shape))
        return new

    def _arg(self, a: Any) -> Any:
        if isinstance(a, torch.fx.Node):
            return self.env.get(a)
        if isinstance(a, (list, tuple)):
            return type(a)(self._arg(x) for x in a)
        return a

    def _emit(self, old: Any, op: str, target: Any, args: tuple, kwargs: dict | None = None) -> Any:
        new = self.g.create_node(op, target, tuple(self._arg(a) for a in args), kwargs or {}, name=old.name)
        return self._meta(new, old)

    def _layer(self, node: Any, kind: str) -> str | None:
        """The module a layer op ran as (its own ``weight`` read by it), or None (a functional call)."""
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return None
        path = list(stack.values())[-1][0]
        try:
            mod = self.model.get_submodule(path)
        except AttributeError:
            return None
        if not isinstance(mod, LAYER_OPS[kind]) or isinstance(mod, ATTENTION):
            return None
        w = node.args[0] if kind == "embedding" else node.args[1] if kind in ("conv1d", "conv2d", "conv3d", "linear",
                                                                            "convolution") else \
            node.args[2] if kind in ("layer_norm", "native_layer_norm", "group_norm", "native_group_norm") else \
            node.args[1]
        if kind in ("batch_norm", "_native_batch_norm_legit_no_training") and w is None:
            w = node.args[3]  # no affine: its running mean
        fqn = self.names.get(w.name) if isinstance(w, torch.fx.Node) else None
        if fqn is None:
            return None
        try:
            t = self.model.get_parameter(fqn) if fqn in self.params else self.model.get_buffer(fqn)
        except AttributeError:
            return None
        own = getattr(mod, "weight", None) if getattr(mod, "weight", None) is not None else \
            getattr(mod, "running_mean", None)
        return path if t is own else None

    def node(self, n: Any) -> None:
        if n in self.skip:
            self.env[n] = None
            return
        if n.op == "placeholder":
            fqn = self.names.get(n.name)
            self.env[n] = self._meta(self.g.get_attr(fqn) if fqn else self.g.placeholder(n.name), n)
            return
        if n.op == "output":
            self.g.output(self._arg(n.args[0]))
            return
        op = _op(n)
        if n.target is operator.getitem:
            src = n.args[0]
            if _op(src) in TUPLE_OPS and n.args[1] == 0:
                self.env[n] = self.env.get(src)   # the op's main output (the others are indices / stats)
                return
            self.env[n] = self._emit(n, "call_function", operator.getitem, n.args)
            return
        if op.startswith("_assert") or op.startswith("sym_constrain"):
            self.env[n] = None
            return
        if op in LAYER_OPS:
            path = self._layer(n, op)
            if path is not None:
                x = n.args[1] if op == "embedding" else n.args[0]
                self.env[n] = self._emit(n, "call_module", path, (x,))
                return
            if op in ("layer_norm", "native_layer_norm"):
                w = n.args[2] if len(n.args) > 2 else None
                self.env[n] = self._emit(n, "call_function", F.layer_norm, (n.args[0], n.args[1], w))
                return
        elif op == "contiguous":   # a method call, as the channel-shuffle chain (permute.py) expects
            self.env[n] = self._emit(n, "call_method", "contiguous", (n.args[0],))
            return
        elif op in UNARY or (op == "pow" and not isinstance(n.args[1], torch.fx.Node)):   # pow(x, 2): elementwise
            self.env[n] = self._emit(n, "call_function", torch.relu, (n.args[0],))
            return
        elif op in BINARY:
            self.env[n] = self._emit(n, "call_function", BINARY[op], n.args[:2])
            return
        elif op in POOLS:
            self.env[n] = self._emit(n, "call_function", POOLS[op], (n.args[0],))
            return
        elif op in REDUCE and len(n.args) > 1:
            self.env[n] = self._emit(n, "call_function", REDUCE[op], n.args[:3])
            return
        elif op in ("view", "reshape", "_unsafe_view"):
            self.env[n] = self._emit(n, "call_method", "view", (n.args[0], list(n.args[1])))
            return
        elif op == "flatten" and (len(n.args) < 3 or n.args[2] in (-1, len(n.args[0].meta["val"].shape) - 1)):
            self.env[n] = self._emit(n, "call_function", torch.flatten, n.args[:2])
            return
        elif op in ("transpose", "permute"):
            self.env[n] = self._emit(n, "call_method", op, n.args)
            return
        elif op == "unsqueeze":
            self.env[n] = self._emit(n, "call_function", torch.unsqueeze, n.args)
            return
        elif op in ("cat", "concat"):
            self.env[n] = self._emit(n, "call_function", torch.cat, (list(n.args[0]), *n.args[1:]))
            return
        elif op in ("split", "split_with_sizes"):
            self.env[n] = self._emit(n, "call_function", torch.split, n.args)
            return
        elif op == "chunk":
            self.env[n] = self._emit(n, "call_function", torch.chunk, n.args)
            return
        elif op == "slice":
            dim, start = n.args[1] if len(n.args) > 1 else 0, n.args[2] if len(n.args) > 2 else None
            end, step = n.args[3] if len(n.args) > 3 else None, n.args[4] if len(n.args) > 4 else 1
            full = start in (None, 0) and (end is None or end >= INT_MAX) and step == 1
            index = (slice(None),) * (dim % n.args[0].meta["val"].dim()) + \
                (slice(None) if full else slice(start, end, step),)
            self.env[n] = self._emit(n, "call_function", operator.getitem, (n.args[0], index))
            return
        elif op == "select":
            index = (slice(None),) * (n.args[1] % n.args[0].meta["val"].dim()) + (n.args[2],)
            self.env[n] = self._emit(n, "call_function", operator.getitem, (n.args[0], index))
            return
        # anything else: kept as the aten op (the rules do not know it: it freezes what flows in)
        self.env[n] = self._emit(n, "call_function", n.target, n.args, {})


def _heads(b: Any, cores: list[Core]) -> None:
    """Replace the q/k/v row spaces of every attention core with one space of key/value heads."""
    rows = {(c.q, "out") for c in cores} | {(c.k, "out") for c in cores} | {(c.v, "out") for c in cores}
    for s, members in enumerate(b.members):
        b.members[s] = [m for m in members if (m.module, m.role) not in rows]
    for c in cores:
        s = b.new(c.kv, c.owner)
        b.members[s] = [Member(c.q, "out", 0, c.d * c.rep), Member(c.k, "out", 0, c.d),
                        Member(c.v, "out", 0, c.dv), Member(c.o, "in", 0, c.dv * c.rep)]


def _ffn_blocks(model: nn.Module, g: HFGraph) -> None:
    """Hugging Face feed-forward blocks whose neurons are exactly a group here: their ``intermediate_size``
    follows the pruned width (module attributes are invisible to the graph)."""
    pat = hf_graph(model)
    by_members = {frozenset((m.module, m.role, m.expand) for m in grp.members): grp for grp in g.groups}
    for blk in pat.blocks:
        if blk.kind != "ffn":
            continue
        grp = by_members.get(frozenset((m.module, m.role, m.expand) for m in blk.group.members))
        if grp is not None:
            g.blocks.append(Block("ffn", blk.owner, grp, up=blk.up))


def build_export_graph(model: nn.Module, example_inputs: Any, norms: bool = False, program: Any = None) -> HFGraph:
    """The prunable channel groups of ``model`` from its ``torch.export`` graph (``program``: an already
    exported program of it); attention cores give key/value-head groups (``blocks``)."""
    ep = program if program is not None else export_program(model, example_inputs)
    gm = ep.graph_module
    cores, inner, rejected = find_cores(model, ep)
    tr = _Translator(model, ep, inner)
    for n in gm.graph.nodes:
        tr.node(n)
    b = walk(model, tr.g.nodes, norms)
    _heads(b, cores)
    for owner, reason in rejected:
        b.skipped.setdefault(owner, f"attention heads kept: {reason}")
    dg = resolve(b)
    g = HFGraph(groups=dg.groups, frozen=dg.frozen, skipped=dg.skipped, ties=dg.ties)
    for c in cores:
        grp = next((grp for grp in g.groups if any(m.module == c.q and m.role == "out" for m in grp.members)), None)
        if grp is not None:
            g.blocks.append(Block("heads", c.owner, grp, q=c.q, k=c.k, head_dim=c.d))
    _ffn_blocks(model, g)
    return g
