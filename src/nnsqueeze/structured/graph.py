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

``chunk(n)`` along channels folds the same way (the pieces stay equal). A channel shuffle
(``view -> transpose -> view``) links the channels every group must share and interleaves them;
``chunk`` of such a tensor *ties* its pieces to lose equally many channels (:mod:`.permute`). The
spaces are resolved channel by channel (:mod:`.resolve`). Anything the graph cannot
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

from typing import Any

from torch import nn

from ..errors import ModelError
from .attention import ATTENTION
from .maxvit_attention import relative_types
from .rules import function_rule, module_rule
# The channel spaces and their union-find are shared with the per-op rules, so they sit below both
# (structured/spaces.py); re-exported here, where callers have always found the graph's types.
from .resolve import resolve
from .spaces import Builder, DependencyGraph, Group, Info, Member, Seg, Split, infos, node_shape

__all__ = ["Seg", "Member", "Group", "Info", "DependencyGraph", "build_graph", "walk"]


def _trace(model: nn.Module, example_inputs: Any):
    import torch.fx
    from torch.fx.passes.shape_prop import ShapeProp

    class _Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:   # attention whose heads are pruned inside
            return isinstance(m, ATTENTION + leaves) or super().is_leaf_module(m, qualname)

    leaves = relative_types()

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


def build_graph(model: nn.Module, example_inputs: Any, norms: bool = False) -> DependencyGraph:
    """Trace ``model`` on ``example_inputs`` and return its prunable channel groups.

    ``norms``: a LayerNorm over the channel axis (a module, or a LayerNorm subclass calling
    ``F.layer_norm`` such as torchvision's ``LayerNorm2d``) follows its channels instead of freezing
    them, and so do parameters multiplied into or added to them along that axis (ConvNeXt's
    ``layer_scale``, position embeddings): pruned, they lose the same entries.
    """
    return resolve(walk(model, _trace(model, example_inputs).graph.nodes, norms))


def walk(model: nn.Module, nodes: Any, norms: bool = False) -> Builder:
    """Apply the per-operation rules to the nodes of a torch-level fx graph (``call_module`` for the
    layers, torch functions and tensor methods otherwise, ``tensor_meta`` shapes); the channel spaces
    are left unresolved (:func:`~.resolve.resolve`). :mod:`.xgraph` feeds it a ``torch.export`` graph
    translated to this form."""
    nodes = list(nodes)
    b = Builder(model, norms)
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
    for node in nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in nodes:
        shape = node_shape(node)
        args = [get(a) for a in node.args]
        ins = [i for a in args for i in infos(a)]
        kw = {k: get(v) for k, v in node.kwargs.items()}
        ins += [i for v in kw.values() for i in infos(v)]
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
        elif node.op == "call_module" and any(isinstance(a, Split) for a in args):
            b.leave(node.target, "input is a channel axis split into groups; its channels are kept", *ins)
        elif node.op == "call_module":
            out = module_rule(b, node.target, mods[node.target], ins[0] if ins else None, ins, shape, node)
        else:
            out = function_rule(b, node, where, args, ins, shape)
        env[node.name] = out

    return b
