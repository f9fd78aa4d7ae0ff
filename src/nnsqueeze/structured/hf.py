"""Channel groups for Hugging Face transformer blocks, found by module patterns instead of tracing.

``torch.fx`` cannot trace ``transformers`` models (data-dependent control flow, kwargs plumbing),
so for them the dependency graph is built from the *Linear layout* of known block shapes:

- **self-attention heads** (BERT/RoBERTa/MiniLM-like: a module with ``query``/``key``/``value``
  Linears whose parent has ``output.dense``; LLaMA/Mistral/Qwen-like: ``q_proj``/``k_proj``/
  ``v_proj``/``o_proj`` siblings). One channel = one *KV group*: a key/value head together with the
  ``num_attention_heads // num_key_value_heads`` query heads that read it (plain multi-head
  attention is the case of one query head per group). Members: q rows, k rows, v rows (``out``) and
  the output projection's columns (``in``), each with ``expand`` = the rows/columns of one group;
- **feed-forward neurons**: ``intermediate.dense`` -> ``output.dense`` (BERT-like),
  ``gate_proj`` & ``up_proj`` -> ``down_proj`` (LLaMA-like, gate and up coupled), ``fc1`` -> ``fc2``.

A candidate is accepted only when the shapes agree (q/k/v read the same width, the output
projection reads ``q.out_features`` columns, ``head_dim`` divides them, the FFN's down projection
reads the up projection's outputs and writes its inputs' width); otherwise it is reported with the
reason and left intact. The residual stream (``hidden_size``: embeddings, LayerNorm/RMSNorm, every
block's output) is never pruned. After shrinking, :func:`sync_attrs` updates the shape attributes
the modules keep (``num_attention_heads``, ``all_head_size``, ``num_heads``, ``num_key_value_heads``,
``intermediate_size``); the forward passes of ``transformers`` 5.x reshape with ``-1`` heads, so the
pruned model keeps its interface and exports to ONNX. Because patterns are assumptions, the step
checks them: the pruned model's outputs on the example inputs must equal the original's with the
removed channels' consumer columns zeroed (:func:`outputs`, :func:`mismatch`), else it raises
``ModelError``; a deviation that is float rounding (deep float32 models with large activations,
such as SmolLM2-135M's 30 blocks) is told apart by :func:`float_error`. The groups of a one-layer
BERT (FFN neurons, then KV-head groups)::

    >>> from transformers import BertConfig, BertModel
    >>> from nnsqueeze.structured.hf import hf_graph
    >>> cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
    ...                  intermediate_size=48)
    >>> g = hf_graph(BertModel(cfg))
    >>> [(grp.size, len(grp.members)) for grp in g.groups]
    [(48, 2), (4, 4)]
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..data import call_model
from ..errors import ModelError
from .graph import DependencyGraph, Group, Member
from .macs import eval_mode

log = logging.getLogger("nnsqueeze")

#: attribute names that hold a head count / width on attention modules, and the FFN width
HEAD_ATTRS = ("num_attention_heads", "num_heads")
KV_ATTRS = ("num_key_value_heads", "num_kv_heads")
FFN_ATTRS = ("intermediate_size",)


@dataclass
class Block:
    """One recognised block: its group and how to refresh its shape attributes after shrinking."""
    kind: str                      # "heads" | "ffn"
    owner: str                     # module whose attributes describe the block
    group: Group
    q: str = ""                    # heads: the query Linear and the head size
    k: str = ""
    head_dim: int = 0
    up: str = ""                   # ffn: the Linear whose out_features is the FFN width


@dataclass
class HFGraph(DependencyGraph):
    blocks: list[Block] = field(default_factory=list)


def _linear(mods: dict[str, nn.Module], name: str) -> nn.Linear | None:
    m = mods.get(name)
    return m if isinstance(m, nn.Linear) else None


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _attention(g: HFGraph, mods: dict[str, nn.Module], name: str, mod: nn.Module) -> None:
    if all(_linear(mods, _join(name, n)) for n in ("query", "key", "value")):
        q, k, v = (_join(name, n) for n in ("query", "key", "value"))
        o = _join(_parent(name), "output", "dense")
    elif all(_linear(mods, _join(name, n)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        q, k, v, o = (_join(name, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    else:
        return
    d = getattr(mod, "attention_head_size", None) or getattr(mod, "head_dim", None)
    lq, lk, lv, lo = (_linear(mods, n) for n in (q, k, v, o))
    why = None
    if not isinstance(d, int) or d <= 0:
        why = "head size unknown (no attention_head_size / head_dim attribute)"
    elif lo is None:
        why = f"no output projection {o}"
    elif lk.out_features != lv.out_features or lo.in_features != lq.out_features:
        why = "q/k/v/output projection widths do not agree"
    elif lq.out_features % d or lk.out_features % d or (lq.out_features // d) % (lk.out_features // d):
        why = f"projection widths are not whole heads of {d}"
    if why:
        g.skipped[name] = f"attention heads kept: {why}"
        return
    kv = lk.out_features // d
    rep = lq.out_features // d // kv              # query heads per key/value head
    groups_attr = getattr(mod, "num_key_value_groups", rep)
    if groups_attr != rep:
        g.skipped[name] = f"attention heads kept: num_key_value_groups={groups_attr} != {rep} from the shapes"
        return
    members = [Member(q, "out", 0, d * rep), Member(k, "out", 0, d), Member(v, "out", 0, d),
               Member(o, "in", 0, d * rep)]
    grp = Group(len(g.groups), kv, members)
    g.groups.append(grp)
    g.blocks.append(Block("heads", name, grp, q=q, k=k, head_dim=d))


def _ffn(g: HFGraph, mods: dict[str, nn.Module], name: str, mod: nn.Module) -> None:
    for ups, down in ((("intermediate.dense",), "output.dense"), (("gate_proj", "up_proj"), "down_proj"),
                      (("fc1",), "fc2")):
        lups = [_linear(mods, _join(name, u)) for u in ups]
        ldown = _linear(mods, _join(name, down))
        if not all(lups) or ldown is None:
            continue
        n = lups[0].out_features
        if any(u.out_features != n or u.in_features != ldown.out_features for u in lups) or ldown.in_features != n:
            g.skipped[_join(name, down)] = "feed-forward neurons kept: up/down projection widths do not agree"
            return
        members = [Member(_join(name, u), "out", 0, 1) for u in ups] + [Member(_join(name, down), "in", 0, 1)]
        grp = Group(len(g.groups), n, members)
        g.groups.append(grp)
        g.blocks.append(Block("ffn", name, grp, up=_join(name, ups[0])))
        return


def hf_graph(model: nn.Module) -> HFGraph:
    """Attention-head and FFN-neuron groups of every recognised block in ``model``."""
    g = HFGraph()
    mods = dict(model.named_modules())
    for name, mod in mods.items():
        _attention(g, mods, name, mod)
        _ffn(g, mods, name, mod)
    used = {m.module for grp in g.groups for m in grp.members}
    left = [n for n, m in mods.items() if isinstance(m, nn.Linear) and n not in used]
    for n in left:
        g.skipped.setdefault(n, "not part of a recognised attention or feed-forward block (output width kept)")
    if g.groups:
        g.frozen.append(("hidden size (embeddings, norms, residual stream)",
                         "the residual stream is shared by every block; only heads and FFN neurons are pruned"))
    return g


def sync_attrs(model: nn.Module, blocks: list[Block]) -> dict[str, dict[str, int]]:
    """Set the shape attributes of every block's owner from its (shrunk) Linears; returns what was set."""
    out: dict[str, dict[str, int]] = {}
    for b in blocks:
        owner = model.get_submodule(b.owner)
        new: dict[str, int] = {}
        if b.kind == "heads":
            q, k = model.get_submodule(b.q), model.get_submodule(b.k)
            new.update({a: q.out_features // b.head_dim for a in HEAD_ATTRS if hasattr(owner, a)})
            new.update({a: k.out_features // b.head_dim for a in KV_ATTRS if hasattr(owner, a)})
            if hasattr(owner, "all_head_size"):
                new["all_head_size"] = q.out_features
        else:
            new.update({a: model.get_submodule(b.up).out_features for a in FFN_ATTRS if hasattr(owner, a)})
        changed = {a: v for a, v in new.items() if getattr(owner, a) != v}
        for a, v in changed.items():
            setattr(owner, a, v)
        if changed:
            out[b.owner] = changed
    return out


def set_attrs(model: nn.Module, attrs: dict[str, dict[str, int]]) -> None:
    """Replay :func:`sync_attrs`' result on a fresh model."""
    for name, values in attrs.items():
        owner = model.get_submodule(name)
        for a, v in values.items():
            setattr(owner, a, int(v))


def _tensors(out: object) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out.detach().float()]
    if isinstance(out, dict):  # ModelOutput is a dict
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensors(v)]
    return []


@torch.no_grad()
def outputs(model: nn.Module, example: object, zero: list[tuple[str, str, list[int]]] = ()) -> list[torch.Tensor]:
    """The model's output tensors on ``example`` in eval mode; with ``zero``, as if the input columns
    outside each ``in`` entry's kept indices were zero (set, run, restored in place: no model copy)."""
    saved = []
    for name, role, keep in zero:
        if role != "in":
            continue
        w = model.get_submodule(name).weight
        drop = torch.tensor(sorted(set(range(w.shape[1])) - set(keep)), dtype=torch.long, device=w.device)
        saved.append((w, drop, w[:, drop].clone()))
        w[:, drop] = 0
    try:
        with eval_mode(model):
            return _tensors(call_model(model, example))
    finally:
        for w, drop, cols in saved:
            w[:, drop] = cols


def mismatch(ref: list[torch.Tensor], got: list[torch.Tensor], rtol: float = 1e-4) -> float | None:
    """Largest deviation relative to the output scale if above ``rtol`` (or if the outputs differ in
    structure), else None: a recognised block whose removal was not what the pattern assumed."""
    if len(ref) != len(got) or any(a.shape != b.shape for a, b in zip(ref, got)):
        return float("inf")
    worst = max([float((a - b).abs().max() / (1 + a.abs().max())) for a, b in zip(ref, got) if a.numel()] or [0.0])
    return worst if worst > rtol else None


def _double(obj: object) -> object:
    if isinstance(obj, torch.Tensor):
        return obj.double() if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _double(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_double(v) for v in obj)
    return obj


def float_error(model: nn.Module, example: object, got: list[torch.Tensor]) -> float:
    """How far ``got`` (``model``'s outputs on ``example`` in its own dtype) is from the same model run
    in float64 on a copy, relative to the output scale as in :func:`mismatch`: the rounding a float32
    forward carries. A pattern check comparing two float32 forwards (the pruned model and the zeroed
    original) sees up to about twice this from rounding alone, while a wrong pattern deviates by far
    more (a removed channel that mattered moves the outputs by a large fraction of their scale)."""
    exact = outputs(copy.deepcopy(model).double(), _double(example))
    return mismatch(exact, got, rtol=0.0) or 0.0


ROUNDING = 4.0  # a deviation up to this many times the pruned model's own float error is rounding


def deviation(ref: list[torch.Tensor], model: nn.Module, example: object) -> tuple[float | None, float | None]:
    """The pattern check: ``(mismatch, float error)`` of ``model``'s outputs on ``example`` against
    ``ref`` (the zeroed original's). The float error (:func:`float_error`) is measured only where it
    decides something: a finite mismatch of a model that is not float64. The check compares two
    float32 forwards, so a mismatch up to :data:`ROUNDING` times the error (2x margin) is rounding."""
    got = outputs(model, example)
    bad = mismatch(ref, got)
    if bad is None or bad == float("inf") or next(model.parameters()).dtype == torch.float64:
        return bad, None
    return bad, float_error(model, example, got)



def check_removal(ref: list[torch.Tensor], model: nn.Module, example: object, by: str, owners: list[str],
                  where: str) -> tuple[float | None, float | None]:
    """Run the pattern check (:func:`deviation`) on the pruned ``model``; ``by`` names what found the groups,
    ``owners`` the recognised blocks. Raises :class:`ModelError` when the model no longer runs or its outputs
    moved beyond the removed channels; a deviation within :data:`ROUNDING` times its float error is accepted
    (logged). Returns ``(deviation, float error)`` for the report."""
    try:
        bad, err = deviation(ref, model, example)
    except Exception as e:
        raise ModelError(where, f"the model pruned by {by} no longer runs ({type(e).__name__}: {str(e)[:200]}): a "
                         "block does not work the way its layout suggests, or a reshape has a channel count fixed "
                         "in forward()", fix="`ignore` its layers, or set `graph: fx`") from e
    if err is not None and bad <= ROUNDING * err:
        log.info("%s: the %s check deviates by %.2e of the output scale, within float rounding (the pruned model's "
                 "float32 forward is %.2e from its float64 one): accepted", where, by, bad, err)
    elif bad is not None:
        raise ModelError(where, f"pruning the groups found by {by} changed the outputs beyond the removed channels "
                         f"(relative deviation {bad:.2e}): a block does not work the way its layout suggests",
                         fix=f"`ignore` its layers (blocks: {', '.join(owners)[:300] or 'none'}), or set `graph: fx`")
    return bad, err
