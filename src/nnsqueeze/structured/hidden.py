"""Hidden-size (residual stream) pruning for Hugging Face transformers: one group for the whole stream.

The residual stream of a BERT-like or LLaMA-like model is one channel space shared by every block:
the embeddings write it (word, position, token-type: their columns), every attention output
projection and FFN down projection adds to it (their rows and bias), every LayerNorm / RMSNorm
normalizes it (weight and bias entries), and q/k/v, the FFN up/gate projections and the heads
(pooler, classifier, LM head) read it (their input columns). Removing hidden channel ``c`` removes
index ``c`` from all of them at once; a LM head tied to the word embeddings stays tied.

:func:`find_stream` builds that group from the attention / FFN blocks that :mod:`.hf` recognised,
then *proves* it on the example inputs, on a copy of the model: the writers' entries of a random
half ``S`` of the channels are set to zero (embedding columns, output-projection rows, norm weights
and biases), and forward pre-hooks check that every norm and every reader then sees exactly zero in
``S``. A norm whose input is not zero there is not on the stream (left alone and reported); a block
projection that reads non-zero there breaks the pattern (``ModelError``); a Linear of the stream's
width outside the blocks is a reader only when its input is zero in ``S`` and not elsewhere (so a
classifier reading the pooler's output keeps its width). A writer that was not found leaves the
stream non-zero in ``S``, and the check fails.

Math caveat: a norm over the pruned stream takes its mean / variance (RMS) over the kept channels
only, so the model's outputs change even when the removed channels carry little; follow the step
with distillation (as Minitron does). The head size is not touched: q/k/v keep their out-features.

    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from nnsqueeze.structured.hf import hf_graph
    >>> from nnsqueeze.structured.hidden import find_stream
    >>> cfg = LlamaConfig(vocab_size=40, hidden_size=15, intermediate_size=20, num_hidden_layers=1,
    ...                   num_attention_heads=3, num_key_value_heads=1, head_dim=6, tie_word_embeddings=True)
    >>> _ = torch.manual_seed(0)
    >>> lm = LlamaForCausalLM(cfg).eval()
    >>> s = find_stream(lm, hf_graph(lm), torch.randint(0, 40, (1, 5)))
    >>> s.width, s.heads, s.ties
    (15, 3, [('lm_head', 'model.embed_tokens')])
    >>> s.norms
    ['model.layers.0.input_layernorm', 'model.layers.0.post_attention_layernorm', 'model.norm']
    >>> sorted({m.role for m in s.group.members})
    ['in', 'out', 'param:weight:0']
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..data import call_model
from ..errors import ModelError, RecipeError
from . import allocate
from .attention import PrunedMultiheadAttention
from .graph import Group, Member
from .heads import head_types, prune_heads
from .hf import HFGraph
from .importance import Part
from .macs import eval_mode
from .pruners import dim_size, param_role
from .window_attention import PrunedWindowAttention


@dataclass
class Stream:
    """The residual stream's group and what must follow its width after shrinking."""
    width: int
    group: Group
    head_dim: int
    heads: int = 1                                             # the kept width must be a multiple of it
    norms: list[str] = field(default_factory=list)             # stream norms (activation importance)
    ties: list[tuple[str, str]] = field(default_factory=list)  # (Linear, Embedding) sharing one weight
    configs: list[str] = field(default_factory=list)           # modules owning a distinct `config`
    skipped: dict[str, str] = field(default_factory=dict)      # width-H layers left alone, with why
    attention: list[str] = field(default_factory=list)         # nn.MultiheadAttention layers on the stream
    attrs: tuple[str, ...] = ("hidden_size",)                  # int module attributes that follow the width


def _is_norm(mod: nn.Module, width: int) -> bool:
    params = list(mod.parameters(recurse=False))
    return ("norm" in type(mod).__name__.lower() and bool(params) and not any(True for _ in mod.children())
            and all(p.dim() == 1 and p.shape[0] == width for p in params))


def _norm_members(name: str, mod: nn.Module, where: str) -> list[Member]:
    if isinstance(mod, nn.LayerNorm):
        return [Member(name, "out", 0, 1)]
    if hasattr(mod, "normalized_shape"):
        raise ModelError(where, f"{name} ({type(mod).__name__}) keeps a normalized_shape that hidden pruning "
                         "cannot update", fix="leave `hidden` unset for this model")
    return [Member(name, f"param:{p}:0", 0, 1) for p, _ in mod.named_parameters(recurse=False)]


def _configs(model: nn.Module) -> list[tuple[str, Any]]:
    seen: dict[int, tuple[str, Any]] = {}
    for name, mod in model.named_modules():
        cfg = getattr(mod, "config", None)
        if isinstance(getattr(cfg, "hidden_size", None), int) and id(cfg) not in seen:
            seen[id(cfg)] = (name, cfg)
    return list(seen.values())


@torch.no_grad()
def set_entries(mod: nn.Module, role: str, chans: torch.Tensor, value: float = 0.0) -> None:
    """Set what ``mod`` writes to stream channels ``chans``: a Conv/Linear's output rows and bias (``out``),
    an Embedding's columns, a norm's weight and bias, or a ``param:ATTR:DIM`` slice. A non-zero ``value``
    (a tag) makes those channels constant: the rows read nothing and the bias holds ``value`` (a layer
    without bias: every weight of the row does)."""
    pr = param_role(mod, role)
    if pr is not None:
        getattr(mod, pr[0]).index_fill_(pr[1], chans, value)
    elif isinstance(mod, nn.Embedding):
        mod.weight[:, chans] = value
    elif isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)) and role == "out":
        bias = getattr(mod, "bias", None)
        mod.weight[chans] = value if bias is None else 0.0
        if bias is not None:
            bias[chans] = value
    else:   # a norm: every own parameter is per channel
        for p in mod.parameters(recurse=False):
            p[chans] = value


@torch.no_grad()
def probe(model: nn.Module, example: Any, width: int, chans: torch.Tensor, zero: list[tuple],
          watch: list, tags: dict[tuple[str, str], int] | None = None) -> dict[str, torch.Tensor]:
    """Run a copy of ``model`` whose ``zero`` members ``(module, role[, positions])`` write zeros to stream
    channels ``chans`` (or to their own ``positions``); the ``tags`` members write 1.0 to their one channel
    instead. Per watched module (a name, or ``(name, width)`` for an input of another width) that ran: the
    largest |input| of each channel, over every tensor argument of that width."""
    m = copy.deepcopy(model)
    for name, role, *pos in zero:
        set_entries(m.get_submodule(name), role, pos[0] if pos else chans)
    for (name, role), c in (tags or {}).items():
        set_entries(m.get_submodule(name), role, torch.tensor([c]), 1.0)
    seen: dict[str, torch.Tensor] = {}

    def hook(name: str, w: int):
        def fn(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            for x in list(args) + list(kwargs.values()):
                if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[-1] == w:
                    top = x.detach().abs().reshape(-1, w).amax(0).double()
                    seen[name] = torch.maximum(seen[name], top) if name in seen else top
        return fn

    pairs = [(n, width) if isinstance(n, str) else n for n in watch]
    hooks = [m.get_submodule(n).register_forward_pre_hook(hook(n, w), with_kwargs=True) for n, w in pairs]
    try:
        with eval_mode(m):
            call_model(m, example)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _probe(model: nn.Module, example: Any, chans: torch.Tensor, embeddings: list[str], writers: list[str],
           norms: list[str], watch: list[str]) -> dict[str, tuple[float, float]]:
    """On a copy with the writers' ``chans`` entries zeroed: per watched module, the largest |input|
    in ``chans`` and outside them (modules that did not run are absent)."""
    width = model.get_submodule(embeddings[0]).embedding_dim
    rest = torch.ones(width, dtype=torch.bool)
    rest[chans] = False
    zero = [(n, "out") for n in embeddings + writers] + [(n, "norm") for n in norms]
    return {n: (float(v[chans].max()), float(v[rest].max()) if rest.any() else 0.0)
            for n, v in probe(model, example, width, chans, zero, watch).items()}


def find_stream(model: nn.Module, graph: HFGraph, example: Any, where: str = "structured-prune.hidden") -> Stream:
    """The residual-stream group of a model whose blocks :func:`~.hf.hf_graph` recognised, checked on
    ``example`` (see the module docstring); raises ``ModelError`` when the layout does not hold."""
    fix = "leave `hidden` unset for this model (heads and FFN neurons still prune)"
    heads = [b for b in graph.blocks if b.kind == "heads"]
    if not heads:
        raise ModelError(where, "hidden pruning needs recognised Hugging Face attention blocks; none found", fix=fix)
    readers = [m.module for b in graph.blocks for m in b.group.members if m.role == "out"]
    writers = [m.module for b in graph.blocks for m in b.group.members if m.role == "in"]
    mods = dict(model.named_modules())
    configs = _configs(model)
    widths = {cfg.hidden_size for _, cfg in configs} | {mods[n].in_features for n in readers}
    widths |= {mods[n].out_features for n in writers}
    if len(widths) != 1:
        raise ModelError(where, f"the blocks and configs disagree on the hidden size ({sorted(widths)})", fix=fix)
    width = widths.pop()
    if width < 2:
        raise ModelError(where, f"hidden size {width} has nothing to prune", fix=fix)
    embeddings = [n for n, m in mods.items() if isinstance(m, nn.Embedding) and m.embedding_dim == width]
    if not embeddings:
        raise ModelError(where, f"no embedding of width {width} writes the residual stream", fix=fix)
    norms = [n for n, m in mods.items() if _is_norm(m, width)]
    block = set(readers) | set(writers)
    extra = [n for n, m in mods.items() if isinstance(m, nn.Linear) and m.in_features == width and n not in block]
    chans = torch.sort(torch.randperm(width, generator=torch.Generator().manual_seed(0))[: width // 2]).values
    seen = _probe(model, example, chans, embeddings, writers, norms, norms + readers + extra)
    skipped: dict[str, str] = {}
    on = [n for n in norms if n in seen and seen[n][0] == 0.0]
    for n in norms:
        if n not in on:
            skipped[n] = "hidden width kept: " + ("did not run on the example inputs" if n not in seen else
                                                  "its input is not the residual stream")
    if on != norms:
        seen = _probe(model, example, chans, embeddings, writers, on, on + readers + extra)
        if any(seen.get(n, (1.0, 0.0))[0] != 0.0 for n in on):
            raise ModelError(where, "the residual stream's norms could not be told apart", fix=fix)
    bad = [n for n in readers if seen.get(n, (1.0, 0.0))[0] != 0.0]
    if bad or not on:
        raise ModelError(where, f"the residual stream is not what the block layout suggests ({len(bad)} block "
                         f"inputs, e.g. {bad[:2]}, are not the stream, or a writer was not recognised)", fix=fix)
    heads_in = [n for n in extra if n in seen and seen[n][0] == 0.0 and seen[n][1] > 0.0]
    for n in extra:
        if n not in heads_in:
            skipped[n] = "hidden width kept: " + ("did not run on the example inputs" if n not in seen else
                                                  "its input is not the residual stream")
    emb_w = {id(mods[e].weight): e for e in embeddings}
    ties = [(n, emb_w[id(m.weight)]) for n, m in mods.items() if isinstance(m, nn.Linear) and id(m.weight) in emb_w]
    for lin, _ in ties:
        if lin not in heads_in:
            raise ModelError(where, f"{lin} shares its weight with an embedding but does not read the stream",
                             fix=fix)
    tied = {lin for lin, _ in ties}
    members = [Member(n, "out", 0, 1) for n in embeddings + writers]
    members += [mb for n in on for mb in _norm_members(n, mods[n], where)]
    members += [Member(n, "in", 0, 1) for n in readers + heads_in if n not in tied]
    n_heads = {int(getattr(cfg, "num_attention_heads", 1) or 1) for _, cfg in configs} or {1}
    return Stream(width, Group(len(graph.groups), width, members), heads[0].head_dim, max(n_heads), on, ties,
                  [n for n, _ in configs], skipped)


def fractions(hidden: float | list[float], streams: list[Stream],
              where: str = "structured-prune.hidden") -> list[float]:
    """The `hidden` fraction of each stream: one number for all, or a list with one per stream (in model order)."""
    if not isinstance(hidden, list):
        return [float(hidden)] * len(streams)
    if len(hidden) != len(streams):
        raise RecipeError(where, f"{len(hidden)} fractions for this model's {len(streams)} residual stream(s), of "
                          f"widths {[s.width for s in streams]}",
                          fix="give one fraction per stream, in model order, or one number for all")
    return [float(v) for v in hidden]


def kept_width(stream: Stream, ratio: float, round_to: int, min_channels: int,
               where: str = "structured-prune.hidden") -> int:
    """The stream's kept width for ``hidden: ratio``; ``RecipeError`` when that width does not fit."""
    kept = allocate.keep_count(stream.width, ratio, round_to, min_channels)
    fix = "use a `hidden` ratio that keeps 2 or more channels and removes at least one"
    if kept == stream.width and ratio > 0:
        raise RecipeError(where, f"hidden: {ratio} removes none of the {stream.width} hidden channels (round_to="
                          f"{round_to}, min_channels={min_channels})", fix=fix)
    if kept < 2:
        raise RecipeError(where, f"hidden: {ratio} keeps {kept} of {stream.width} hidden channels: a LayerNorm over "
                          "one channel outputs its bias whatever the input", fix=fix)
    if kept % stream.heads:
        ok = [k for k in range(stream.heads, stream.width + 1, stream.heads) if k % round_to == 0 or k == stream.width]
        near = min(ok, key=lambda k: abs(k - kept)) if ok else stream.width
        raise RecipeError(where, f"hidden: {ratio} keeps {kept} of {stream.width} hidden channels, not a multiple of "
                          f"num_attention_heads={stream.heads} (transformers requires hidden_size % "
                          f"num_attention_heads == 0; head_dim stays {stream.head_dim})",
                          fix=f"use hidden: {(stream.width - near) / stream.width:.4f} (keeps {near})")
    return kept


def attach(graph: Any, streams: list[Stream], where: str = "structured-prune.hidden",
           modules: set[str] | None = None) -> None:
    """Add the streams' groups to ``graph``; they are no longer frozen, their layers no longer skipped (nor the
    graph nodes, not in ``modules``, that froze them)."""
    mine = {(m.module, m.role) for s in streams for m in s.group.members}
    clash = [(m.module, m.role) for g in graph.groups for m in g.members if (m.module, m.role) in mine]
    if clash:
        raise ModelError(where, f"{clash[0][0]} ({clash[0][1]}) is both on a residual stream and in another channel "
                         "group", fix="leave `hidden` unset for this model")
    writers = {m.module for s in streams for m in s.group.members if m.role == "out"}
    gone = [f for f in graph.frozen if f[0].startswith("hidden size") or set(f[0].split(", ")) <= writers]
    graph.frozen = [f for f in graph.frozen if f not in gone]
    for s in streams:
        graph.groups.append(s.group)
        graph.skipped.update(s.skipped)
    # graph nodes (not modules) that froze a space: kept only where a remaining frozen space cites them
    cited = {f[1].split(":")[0] for f in graph.frozen}
    nodes = {n for n in graph.skipped if modules is not None and n not in modules and n not in cited}
    for n in {m for m, _ in mine} | {lin for s in streams for lin, _ in s.ties} | \
            {a for s in streams for a in s.attention} | nodes:
        graph.skipped.pop(n, None)


def activation_parts(stream: Stream, acts: dict[str, torch.Tensor]) -> list[Part]:
    """The stream norms' outputs, one row per hidden channel (Minitron ranks embedding channels so)."""
    return [Part("activation", "out", acts[n]) for n in stream.norms]


def split_plan(plan: list[tuple[str, str, list[int]]], streams: list[Stream]) -> tuple[list, list]:
    """(the heads / FFN entries, the streams' entries) of a plan."""
    own = {(m.module, m.role) for s in streams for m in s.group.members}
    return [e for e in plan if (e[0], e[1]) not in own], [e for e in plan if (e[0], e[1]) in own]


def prepare(model: nn.Module, names: list[str], where: str = "structured-prune record") -> None:
    """Before the stream is shrunk: the attention layers ``names`` (``nn.MultiheadAttention``, torchvision's
    window attention) become their pruned forms with every head, whose stream width follows the weights."""
    for name in names:
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise ModelError(f"{where}: {name}", "attention layer not found",
                             fix="load onto the same architecture that was compressed") from None
        if isinstance(mod, (PrunedMultiheadAttention, PrunedWindowAttention)):
            continue
        if not isinstance(mod, head_types()):
            raise ModelError(f"{where}: {name}", f"{type(mod).__name__} is not an attention layer",
                             fix="load onto the same architecture that was compressed")
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, prune_heads(mod, list(range(mod.num_heads))))


def finish(model: nn.Module, streams: list[Stream]) -> tuple[dict[str, dict[str, int]], dict[str, Any]]:
    """After the streams' dims were shrunk: retie, set the width attributes (``hidden_size``; torchvision's
    ViT: ``hidden_dim``) and configs. Returns (module attributes set, the record :func:`replay` needs)."""
    attrs: dict[str, dict[str, int]] = {}
    widths = []
    for stream in streams:
        first = stream.group.members[0]
        width = dim_size(model.get_submodule(first.module), first.role)
        widths.append(width)
        for n, m in model.named_modules():
            for a in stream.attrs:
                if type(getattr(m, a, None)) is int and getattr(m, a) == stream.width:
                    attrs.setdefault(n, {})[a] = width
    for n, values in attrs.items():
        for a, v in values.items():
            setattr(model.get_submodule(n), a, v)
    s0 = streams[0]
    record = {"hidden_size": widths[0], "ties": [list(t) for t in s0.ties], "configs": list(s0.configs)}
    attention = [a for s in streams for a in s.attention]
    record |= ({"attention": attention} if attention else {}) | ({"widths": widths} if len(streams) > 1 else {})
    replay(model, record)
    return attrs, record


def replay(model: nn.Module, record: dict[str, Any]) -> None:
    """Tie the recorded LM heads to their (shrunk) embeddings and set ``config.hidden_size``."""
    for lin, emb in record.get("ties", []):
        head, e = model.get_submodule(lin), model.get_submodule(emb)
        if not isinstance(head, nn.Linear) or not isinstance(e, nn.Embedding):
            raise ModelError(f"structured-prune record: {lin}", "recorded tie is not a Linear and an Embedding",
                             fix="load onto the same architecture that was compressed")
        head.weight, head.in_features = e.weight, e.embedding_dim
    for name in record.get("configs", []):
        model.get_submodule(name).config.hidden_size = int(record["hidden_size"])
