"""Step ``structured-prune``: remove whole channels / neurons so the model becomes smaller and dense.

Recipe (iterative prune -> fine-tune: each step removes a fraction of what is left)::

    steps:
      - structured-prune: {ratio: 0.3, importance: l2, round_to: 8,
                           overrides: {"re:features\\\\.0": 0.1}, ignore: [classifier.0]}
      - finetune: {steps: 500, lr: 1.0e-3}
      - structured-prune: {macs: 0.3, importance: fpgm, scope: global}   # <= 30% of the MACs left
      - finetune: {steps: 1000, lr: 1.0e-3}

Python::

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.context import Context
    >>> from nnsqueeze.steps.channel_prune import StructuredPrune
    >>> x = torch.randn(4, 3)
    >>> ctx = Context(example_inputs=x, progress=False); ctx.report.begin_step("structured-prune", {})
    >>> m = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 2))
    >>> StructuredPrune(StructuredPrune.Config(ratio=0.5)).run(m, ctx)[0]
    Linear(in_features=3, out_features=8, bias=True)

How: :func:`nnsqueeze.structured.graph.build_graph` traces the model (``ctx.example_inputs``) into
groups of coupled layer dimensions; an importance criterion (``l1``, ``l2``, ``fpgm``, ``bn-scale``,
``taylor`` (training batches), ``apoz``/``energy`` (calibration batches)) scores each group's
channels; the lowest go from every member at once (:mod:`nnsqueeze.structured.pruners`). Targets:
exactly one of ``ratio`` (fraction of channels removed: per group with ``scope: layer``, ranked
across groups with ``scope: global``), ``params`` or ``macs`` (an absolute budget if > 1, else a
fraction of the current model's; found by bisection on the global ratio). A group is pruned when
all its Conv/Linear/Embedding output layers are selected by ``targets`` and none of its layers is
ignored; groups the graph cannot prove safe are left intact and listed as skipped with the reason.

``graph`` (``auto``): where ``torch.fx`` cannot trace the model, the graph comes from ``torch.export``
(:mod:`nnsqueeze.structured.xgraph`; attention cores give key/value-head groups), and where that fails
too, from module patterns; each fallback is noted. Module patterns (Hugging Face transformers that
neither traces, or ``graph: fx``): :mod:`nnsqueeze.structured.hf` finds
BERT-like and LLaMA-like attention blocks (one channel = one key/value head with its query heads)
and feed-forward blocks (neurons; LLaMA's gate and up projections together) by their Linear layout;
``head_ratio`` (else ``ratio``) applies to the heads; the modules' ``num_attention_heads`` /
``all_head_size`` / ``intermediate_size`` attributes follow the new widths. The residual stream (embeddings, norms, the
heads' inputs) is kept and listed as skipped unless ``hidden`` (opt-in) gives the fraction of hidden
channels removed from all of it at once (:mod:`nnsqueeze.structured.hidden`; torchvision's ViT and Swin,
one stream per Swin stage: :mod:`nnsqueeze.structured.hidden_attn`; ``ratio`` may then be left out: heads
and FFN stay whole). Norms then normalize over the kept channels: distill after.

Record: the kept indices of every shrunk layer dimension, in order, and the shape attributes set
on Hugging Face modules; ``rebuild`` replays them on a fresh model without data, so ``nsq.load``
restores the pruned shapes and then loads the weights.
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ..errors import DataError, ModelError, RecipeError
from ..registry import STEPS
from ..structured import allocate
from ..structured.heads import head_parts, head_types, num_heads, prune_heads, unsupported_reason
from ..structured.collect import accumulate_grads, activation_parts, activations, taylor_parts, weight_parts
from ..structured.graph import DependencyGraph, Group, build_graph
from ..structured import hf, hidden, hidden_attn
from ..structured.hf import HFGraph, hf_graph, set_attrs, sync_attrs
from ..structured.xgraph import build_export_graph
from ..structured.importance import CRITERIA, NEEDS, Part
from ..structured.macs import count
from ..structured.pruners import dim_size, shrink
from ..targets import pattern_matches
from .base import Step, StepConfig, record_indices
from ..targets import set_module

LAYERS = (nn.modules.conv._ConvNd, nn.Linear, nn.Embedding)


_Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]   # a `hidden` fraction


class StructuredPruneConfig(StepConfig):
    importance: Literal["l1", "l2", "fpgm", "bn-scale", "taylor", "apoz", "energy"] = "l2"
    ratio: float | None = Field(None, ge=0.0, lt=1.0, description="fraction of channels removed")
    params: float | None = Field(None, gt=0.0, description="parameter budget: count if > 1, else fraction")
    macs: float | None = Field(None, gt=0.0, description="MACs budget per sample: count if > 1, else fraction")
    scope: Literal["layer", "global"] = "layer"
    round_to: int = Field(1, ge=1, description="kept channels are a multiple of this (when wider)")
    min_channels: int = Field(1, ge=1)
    max_ratio: float = Field(0.9, gt=0.0, lt=1.0, description="most any group may lose (global / budgets)")
    overrides: dict[str, float] = Field(default_factory=dict,
                                        description="layer pattern -> ratio for the groups it produces")
    batches: int = Field(4, ge=1, description="data batches for taylor / apoz / energy")
    head_ratio: float | None = Field(None, ge=0.0, lt=1.0, description="fraction of attention heads removed "
                                     "(nn.MultiheadAttention; Hugging Face blocks: key/value head groups); "
                                     "default: `ratio`, or none with a budget")
    norms: Literal["keep", "prune"] = Field("keep", description="prune: channels normalized by a LayerNorm over "
                                            "the channel axis are pruned with its weight and bias (it then "
                                            "normalizes over the kept ones: not equal to zeroing them, fine-tune "
                                            "after), and so are per-channel parameters on them (layer scale, "
                                            "position embeddings); keep: such channels are left whole")
    hidden: _Fraction | Annotated[list[_Fraction], Field(min_length=1)] | None = Field(
        None, description="Hugging Face BERT/LLaMA-like models, torchvision's ViT and Swin (per stage): fraction "
        "of the hidden size (residual stream: embeddings, norms, every block's input and output, the heads' inputs) "
        "removed, in [0, 1); a list gives one fraction per stream in model order (Swin: one per stage, e.g. "
        "[0.25, 0.25, 0.5, 0.5]); default: kept whole")
    graph: Literal["auto", "fx", "export"] = Field("auto", description="how the dependency graph is built: fx "
                                                   "(torch.fx), export (torch.export, non-strict), auto (torch.fx, "
                                                   "then torch.export for models fx cannot trace); Hugging Face "
                                                   "module patterns when neither traces the model")

    @model_validator(mode="after")
    def _one_target(self) -> "StructuredPruneConfig":
        given = [k for k in ("ratio", "params", "macs") if getattr(self, k) is not None]
        if not given and self.hidden is not None:
            self.ratio = 0.0            # hidden size only: heads and FFN neurons stay whole
        elif len(given) != 1:
            raise ValueError(f"give exactly one of ratio, params, macs (got {given or 'none'})")
        for k, v in self.overrides.items():
            if not 0.0 <= v < 1.0:
                raise ValueError(f"overrides[{k!r}] = {v} must be in [0, 1)")
        return self


def _group_layers(model: nn.Module, g: Group) -> list[str]:
    """The group's output layers, an attention's own (``out_proj``, ``proj``) named by it (what targets select)."""
    out = set()
    for m in g.members:
        if m.role == "out" and isinstance(model.get_submodule(m.module), LAYERS):
            parent = m.module.rpartition(".")[0]
            out.add(parent if parent and isinstance(model.get_submodule(parent), head_types()) else m.module)
    return sorted(out)


def keep_indices(model: nn.Module, groups: list[Group], pruned: list[torch.Tensor]) -> list[tuple[str, str, list[int]]]:
    """(layer, role, kept indices) for every layer dimension that loses something."""
    removed: dict[tuple[str, str], set[int]] = {}
    for g, idx in zip(groups, pruned):
        if idx.numel() == 0:
            continue
        for mb in g.members:
            pos = torch.tensor(mb.positions(g.size)).reshape(g.size, mb.expand)[idx].flatten().tolist()
            removed.setdefault((mb.module, mb.role), set()).update(pos)
    out = []
    for (name, role), gone in removed.items():
        n = dim_size(model.get_submodule(name), role)
        out.append((name, role, [i for i in range(n) if i not in gone]))
    return out


def apply(model: nn.Module, plan: list[tuple[str, str, list[int]]], where: str = "structured-prune") -> nn.Module:
    for name, role, keep in plan:
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise ModelError(f"{where}: {name}", "layer not found in the model",
                             fix="load onto the same architecture that was compressed") from None
        n = dim_size(mod, role)
        if len(set(keep)) != len(keep):  # repeated indices would grow the layer, not shrink it
            raise ModelError(f"{where}: {name}", "kept indices repeat", fix="load onto the same architecture "
                             "that was compressed")
        if keep and (max(keep) >= n or min(keep) < 0):
            raise ModelError(f"{where}: {name}", f"kept index {max(keep)} outside its {role} dimension of {n}",
                             fix="load onto the same architecture that was compressed")
        shrink(mod, role, torch.tensor(keep, dtype=torch.long))
    return model


@STEPS.register("structured-prune")
class StructuredPrune(Step):
    needs_float = True
    Config = StructuredPruneConfig
    default_targets: ClassVar[list[str]] = ["Conv1d", "Conv2d", "Conv3d", "Linear", "Embedding",
                                            "MultiheadAttention", "PrunedMultiheadAttention",
                                            "ShiftedWindowAttention", "ShiftedWindowAttentionV2",
                                            "PrunedWindowAttention", "RelativePositionalMultiHeadAttention",
                                            "PrunedRelativeAttention"]
    trains: ClassVar[bool] = False

    def __init__(self, config: StructuredPruneConfig, index: int = 0):
        super().__init__(config, index)
        self.plan_: list[tuple[str, str, list[int]]] = []
        self.heads_: dict[str, list[int]] = {}
        self.attrs_: dict[str, dict[str, int]] = {}
        self._blocks: list = []     # Hugging Face blocks of the current run (heads / FFN)
        self._head_groups: set[int] = set()
        self._planned: list[Group] = []
        self._ties: list[list[dict[int, dict[int, int]]]] = []   # graph ties, by index into _planned
        self._restored = 0
        self._streams: list[hidden.Stream] = []   # residual streams (`hidden`): one, or one per Swin stage
        self._hidden_fracs: list[float] = []      # the `hidden` fraction of each stream
        self.hidden_: dict[str, Any] = {}
        self.graph_ = ""            # where the last run's groups came from: fx | export | patterns

    # ---- pieces ---------------------------------------------------------------------------------

    def _graph(self, model: nn.Module, example: Any, ctx: Any) -> DependencyGraph:
        """The dependency graph from torch.fx and/or torch.export (``graph``); for models neither can trace,
        the Hugging Face block patterns. Which one was used, and why a fallback happened, is logged."""
        norms, order = self.config.norms == "prune", {"auto": ("fx", "export"), "fx": ("fx",),
                                                      "export": ("export",)}[self.config.graph]
        attn = self.config.hidden is not None and hidden_attn.has_attention(model)   # else Hugging Face patterns
        if self.config.hidden is not None and not attn:  # the stream is found through the module patterns' blocks
            if self.config.graph != "auto":
                raise RecipeError(f"{self.where}.graph", f"hidden-size pruning uses the Hugging Face module "
                                  f"patterns, not a graph: `graph: {self.config.graph}` cannot apply",
                                  fix="leave `graph` at auto with `hidden`, or drop `hidden`")
            order = ()
        graph, failed = None, []
        for kind in order:
            try:
                graph = build_graph(model, example, norms=norms) if kind == "fx" else \
                    build_export_graph(model, example, norms=norms)
                self.graph_ = kind
                break
            except ModelError as e:
                if "cannot trace" not in str(e) and "cannot export" not in str(e):
                    raise
                failed.append(e)
        if graph is None:  # neither traced (a fallback), or `hidden` went straight to the patterns (logged below)
            graph = hf_graph(model)
            self.graph_ = "patterns"
            if failed and not graph.groups:
                raise ModelError(self.where, "; ".join(f.problem for f in failed) + "; and no Hugging Face attention "
                                 "/ feed-forward block was recognised", fix=failed[-1].fix) from None
            if failed:
                ctx.fallback(self.registered_name, "; ".join(f.problem for f in failed) + ": groups from Hugging "
                             f"Face module patterns ({sum(b.kind == 'heads' for b in graph.blocks)} attention blocks "
                             f"by KV-head groups, {sum(b.kind == 'ffn' for b in graph.blocks)} feed-forward blocks "
                             "by neurons)")
        elif failed:
            ctx.fallback(self.registered_name, f"{failed[0].problem}: the dependency graph is built from "
                         f"torch.{self.graph_}")
        ctx.log.info("structured-prune: dependency graph from %s", {"fx": "torch.fx", "export": "torch.export",
                                                                    "patterns": "Hugging Face module patterns"}
                     [self.graph_])
        self._blocks = graph.blocks if isinstance(graph, HFGraph) else []
        self._head_groups = {id(b.group) for b in self._blocks if b.kind == "heads"}
        self._streams = []
        if self.config.hidden is not None:
            where = f"{self.where}.hidden"
            if attn:   # attention-layer models (torchvision's ViT, Swin): the streams beside the traced graph
                self._streams = hidden_attn.find_streams(model, example, where, len(graph.groups))
            elif not self._blocks:
                raise ModelError(where, "hidden-size pruning is for Hugging Face transformers whose attention "
                                 "blocks are recognised by module patterns, and for models built on "
                                 "nn.MultiheadAttention or torchvision's window attention (ViT, Swin); this model "
                                 "is neither",
                                 fix="leave `hidden` unset; `norms: prune` prunes LayerNorm-coupled channels of "
                                 "traced models")
            else:
                self._streams = [hidden.find_stream(model, graph, example, where)]
            c = self.config
            self._hidden_fracs = hidden.fractions(c.hidden, self._streams, where)
            for s, frac in zip(self._streams, self._hidden_fracs):
                hidden.kept_width(s, frac, c.round_to, c.min_channels, where)
            hidden.attach(graph, self._streams, where, {n for n, _ in model.named_modules()})
        return graph

    def _apply(self, model: nn.Module, plan: list[tuple[str, str, list[int]]]) -> dict[str, dict[str, int]]:
        streams = bool(hidden.split_plan(plan, self._streams)[1])
        if streams:   # attention layers on a stream take the pruned forms whose width follows the weights
            hidden.prepare(model, [a for s in self._streams for a in s.attention], self.where)
        apply(model, plan, self.where)
        attrs = sync_attrs(model, self._blocks)
        if streams:
            more, self.hidden_ = hidden.finish(model, self._streams)
            attrs.update(more)
        return attrs

    def _groups(self, model: nn.Module, graph: DependencyGraph, ctx: Any, sel: Any) -> list[Group]:
        chosen = set(sel.names)
        ignored = {n for n, _ in sel.skipped}
        name = self.registered_name
        for layer, reason in graph.skipped.items():
            ctx.skip(name, layer, reason)
        for layers, reason in graph.frozen:
            ctx.skip(name, layers, f"channels kept: {reason}")
        out = []
        for g in graph.groups:
            layers = _group_layers(model, g)
            if any(m.module in ignored for m in g.members):
                ctx.skip(name, ", ".join(layers), "channels kept: a coupled layer is ignored by the recipe")
            elif not layers or not all(n in chosen for n in layers):
                ctx.skip(name, ", ".join(layers), "channels kept: not all coupled layers are targeted")
            else:
                out.append(g)
        pos = {g.id: i for i, g in enumerate(out)}
        self._ties = [[{pos[gid]: chans for gid, chans in piece.items() if gid in pos} for piece in tie]
                      for tie in graph.ties]
        return out

    def _scores(self, model: nn.Module, groups: list[Group], ctx: Any) -> list[torch.Tensor]:
        c, crit = self.config, CRITERIA[self.config.importance]
        need = NEEDS.get(c.importance)
        if need == "gradients":
            data = ctx.train_data if ctx.train_data is not None else ctx.calib_data
            accumulate_grads(model, data or [], c.batches, ctx.loss_fn, f"{self.where}.importance")
            scores = [crit(taylor_parts(model, g)) for g in groups]
            model.zero_grad(set_to_none=True)
            return scores
        if need == "activations":
            data = ctx.calib_data if ctx.calib_data is not None else ctx.train_data
            streams = {id(s.group): s for s in self._streams}
            names = sorted({m.module for g in groups if id(g) not in streams for m in g.members if m.role == "out"
                            and isinstance(model.get_submodule(m.module), LAYERS)})
            names += [n for g in groups if id(g) in streams for n in streams[id(g)].norms]
            acts = activations(model, names, data or [], c.batches, f"{self.where}.importance")
            return [crit(hidden.activation_parts(streams[id(g)], acts) if id(g) in streams else
                         activation_parts(g, acts)) for g in groups]
        return [crit(weight_parts(model, g)) for g in groups]

    def _fixed(self, model: nn.Module, groups: list[Group]) -> list[float | None]:
        out: list[float | None] = []
        for g in groups:
            frac = [f for s, f in zip(self._streams, self._hidden_fracs) if g is s.group]
            if frac:
                out.append(frac[0])
                continue
            hit = [r for p, r in self.config.overrides.items()
                   for n in _group_layers(model, g) if pattern_matches(p, n, model.get_submodule(n))]
            if not hit and id(g) in self._head_groups and self.config.head_ratio is not None:
                hit = [self.config.head_ratio]
            out.append(min(hit) if hit else None)
        return out

    def _plan(self, scores: list[torch.Tensor], fixed: list[float | None], ratio: float,
              scope: str) -> list[torch.Tensor]:
        c = self.config
        rounds = [1 if id(g) in self._head_groups else c.round_to for g in self._planned]  # heads: no rounding
        if scope == "global":
            plan = allocate.global_plan(scores, ratio, fixed, c.max_ratio, rounds, c.min_channels)
        else:
            plan = allocate.layer_plan(scores, [ratio if f is None else f for f in fixed], rounds, c.min_channels)
        plan, self._restored = allocate.enforce_ties(plan, scores, self._ties)
        return plan

    def _search(self, model, groups, scores, fixed, example, budget: float, key: str, ctx: Any) -> float:
        """Smallest global ratio whose pruned model fits ``budget`` (bisection, 14 rounds)."""
        def cost(r: float) -> int:
            trial = copy.deepcopy(model)
            self._apply(trial, keep_indices(model, groups, self._plan(scores, fixed, r, "global")))
            cnt = count(trial, example)
            return cnt.total_macs if key == "macs" else cnt.total_params
        lo, hi = 0.0, self.config.max_ratio
        if cost(hi) > budget:
            ctx.fallback(self.registered_name, f"{key} budget {budget:,.0f} is out of reach with max_ratio {hi} "
                         "(channels that must be kept are listed as skipped); pruned at max_ratio")
            return hi
        for _ in range(14):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if cost(mid) <= budget else (mid, hi)
        return hi

    # ---- step -----------------------------------------------------------------------------------

    def run(self, model: nn.Module, ctx: Any) -> nn.Module:
        c = self.config
        example = ctx.example_inputs
        if example is None:
            raise DataError(f"{self.where}", "structured pruning traces the model and needs example inputs",
                            fix="pass example_inputs=... or calib_data=... to compress()")
        before = count(model, example)
        sel = self.select(model, ctx, supported=LAYERS + head_types())
        groups = self._groups(model, self._graph(model, example, ctx), ctx, sel)
        self._planned = groups
        heads = self._prune_heads(model, sel, ctx)
        if not groups:
            if not heads:
                ctx.fallback(self.registered_name, "no prunable channel group; the model is unchanged")
            ctx.report.step(groups=0, heads_removed=heads)
            return model
        scores = self._scores(model, groups, ctx)
        fixed = self._fixed(model, groups)
        if c.ratio is not None:
            ratio, scope = c.ratio, c.scope
        else:
            key = "macs" if c.macs is not None else "params"
            want = getattr(c, key)
            base = before.total_macs if key == "macs" else before.total_params
            budget = want if want > 1 else want * base
            ratio, scope = self._search(model, groups, scores, fixed, example, budget, key, ctx), "global"
        pruned = self._plan(scores, fixed, ratio, scope)
        if self._restored:
            ctx.fallback(self.registered_name, f"{self._restored} channels kept so that the pieces of each chunk "
                         "of a shuffled tensor stay equal")
        self.plan_ = keep_indices(model, groups, pruned)
        base, stream = hidden.split_plan(self.plan_, self._streams)   # the stream has no zeroing equivalent
        # module patterns and the exported graph's concrete sizes are assumptions: checked below
        check = self._blocks or (self.graph_ == "export" and c.norms == "keep")
        ref = hf.outputs(model, example, base) if check else None
        self.attrs_ = self._apply(model, base)
        if ref is not None:  # prove this removal equals zeroing the removed channels' consumer columns
            by = "module patterns" if self.graph_ == "patterns" else "the torch.export graph"
            bad, err = hf.check_removal(ref, model, example, by, [b.owner for b in self._blocks], self.where)
            if err is not None:
                ctx.report.step(pattern_check_deviation=bad, pattern_check_float_error=err)
        if stream:
            self.attrs_.update(self._apply(model, stream))
            ctx.report.step(hidden_before=self._streams[0].width, hidden_after=self.hidden_["hidden_size"])
            if len(self._streams) > 1:
                ctx.report.step(hidden_widths=[[s.width, w] for s, w in zip(self._streams, self.hidden_["widths"])])
        try:
            after = count(model, example)
        except Exception as e:  # a bug in the graph, never the user's fault: say so loudly
            raise ModelError(self.where, f"the pruned model no longer runs ({type(e).__name__}: {e})",
                             fix="report this model; meanwhile `ignore` the layers named above") from e
        for name, fig in before.per_layer.items():
            a = after.per_layer.get(name, {"macs": 0, "params": 0})
            if a != fig:
                ctx.report.layer(name, macs_before=fig["macs"], macs_after=a["macs"],
                                 params_before=fig["params"], params_after=a["params"])
        heads += self._report_hf_heads(model, groups, pruned, ctx)
        channels = sum(g.size for g in groups)
        removed = sum(int(p.numel()) for p in pruned)
        ctx.report.step(groups=len(groups), graph=self.graph_, heads_removed=heads, channels=channels,
                        channels_removed=removed,
                        ratio=round(ratio, 4),
                        scope=scope, importance=c.importance, params_before=before.total_params,
                        params_after=after.total_params, macs_before=before.total_macs, macs_after=after.total_macs,
                        macs_reduction=round(before.total_macs / max(1, after.total_macs), 3))
        ctx.log.info("structured-prune: %d/%d channels removed in %d groups; MACs %d -> %d, params %d -> %d",
                     removed, channels, len(groups), before.total_macs, after.total_macs,
                     before.total_params, after.total_params)
        return model

    def _report_hf_heads(self, model: nn.Module, groups: list[Group], pruned: list[torch.Tensor], ctx: Any) -> int:
        """Per Hugging Face attention block: query / key-value heads before and after; returns query heads removed."""
        gone = {id(g): int(p.numel()) for g, p in zip(groups, pruned)}
        removed = 0
        for b in self._blocks:
            if b.kind != "heads" or id(b.group) not in gone:
                continue
            kv = b.group.size
            q = model.get_submodule(b.q).out_features // b.head_dim   # after shrinking
            rep = q // max(1, kv - gone[id(b.group)])
            ctx.report.layer(b.owner, heads_before=kv * rep, heads_after=q, kv_heads_before=kv,
                             kv_heads_after=kv - gone[id(b.group)])
            removed += kv * rep - q
        return removed

    def _prune_heads(self, model: nn.Module, sel: Any, ctx: Any) -> int:
        """Remove attention heads in place (before the channel plan is applied); returns heads removed."""
        c = self.config
        ratio = c.head_ratio if c.head_ratio is not None else (c.ratio or 0.0)
        crit = c.importance if c.importance in ("l1", "l2", "fpgm") else "l2"
        removed = 0
        kinds = head_types()
        for name, mod in sel.layers:
            if not isinstance(mod, kinds):
                continue
            reason = unsupported_reason(mod)
            if reason:
                ctx.skip(self.registered_name, name, f"heads kept: {reason}")
                continue
            r = min([v for p, v in c.overrides.items() if pattern_matches(p, name, mod)] or [ratio])
            n = num_heads(mod)
            gone = allocate.lowest(CRITERIA[crit]([Part("linear", "out", t) for t in head_parts(mod)]),
                                   allocate.keep_count(n, r, 1, c.min_channels))
            if gone.numel() == 0:
                continue
            if crit != c.importance:
                ctx.fallback(self.registered_name, f"{name}: heads ranked by l2 ({c.importance} is for channels)")
            keep = [i for i in range(n) if i not in set(gone.tolist())]
            set_module(model, name, prune_heads(mod, keep))
            self.heads_[name] = keep
            removed += n - len(keep)
            ctx.report.layer(name, heads_before=n, heads_after=len(keep))
        return removed

    def record(self) -> dict[str, Any]:
        rec = {"shrink": [[n, r, k] for n, r, k in self.plan_], "heads": dict(self.heads_), "attrs": dict(self.attrs_)}
        return rec | ({"hidden": self.hidden_} if self.hidden_ else {})

    @classmethod
    def rebuild(cls, model: nn.Module, config: StructuredPruneConfig, record: dict[str, Any]) -> nn.Module:
        """Replay the recorded head removal and shrinking on a fresh model; the weights come from the artifact."""
        for name, keep in record.get("heads", {}).items():
            try:
                mod = model.get_submodule(name)
            except AttributeError:
                raise ModelError(f"structured-prune record: {name}", "attention layer not found",
                                 fix="load onto the same architecture that was compressed") from None
            if not isinstance(mod, head_types()):
                raise ModelError(f"structured-prune record: {name}", f"{type(mod).__name__} is not an attention layer",
                                 fix="load onto the same architecture that was compressed")
            set_module(model, name, prune_heads(mod, record_indices(keep, num_heads(mod),
                                                                    f"structured-prune record: heads: {name}")))
        hidden.prepare(model, list(record.get("hidden", {}).get("attention", [])))
        apply(model, [(n, r, list(k)) for n, r, k in record.get("shrink", [])], "structured-prune record")
        try:
            set_attrs(model, record.get("attrs", {}))
            hidden.replay(model, record.get("hidden", {}))
        except AttributeError as e:
            raise ModelError("structured-prune record", f"module of a recorded shape attribute not found ({e})",
                             fix="load onto the same architecture that was compressed") from None
        return model

