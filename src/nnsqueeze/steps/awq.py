"""Step ``awq``: activation-aware weight quantization for causal LMs, block by block.

Per targeted Linear, searches the AWQ exponent ``alpha`` (scales ``mean|x|^alpha``) on a grid and
keeps the simulated weight ``Q(W * s) / s`` (see :mod:`nnsqueeze.llm.awq`). Recipe::

    steps:
      - awq: {bits: 4, group_size: 128, n_grid: 20, samples: 128}

Report per layer: ``alpha``, ``error`` and ``rtn_error`` (relative output errors on the calibration
tokens; ``error <= rtn_error`` by construction). The scale search is per Linear (not shared by
q/k/v) and AWQ's clipping search is not done.

``pack: true`` (default false) stores each layer as a :class:`~nnsqueeze.llm.packed.PackedLinear`
holding the int4/int8 codes of ``Q(W * s)`` plus an ``input_scale_`` ``s``: the layer computes
``(x / s) @ Q(W * s).T`` (equal to the simulated ``x @ (Q(W * s) / s).T`` up to float rounding),
``nsq.load`` rebuilds it bit-identically, and ONNX export emits ``Div`` + ``MatMulNBits``::

    steps:
      - awq: {bits: 4, group_size: 128, pack: true}

``share_scales: true`` (default false) gives the Linears that read the same input one exponent
(q/k/v; gate/up; searched on their summed error) and, under grouped-query attention, ``o_proj`` scales
averaged over the query heads that share a kv head: the scales then fold into the op before them as
AutoAWQ does for LLaMA (the open-format exports need this, see :mod:`nnsqueeze.export.awq_fold`)::

    steps:
      - awq: {bits: 4, group_size: 128, pack: true, share_scales: true, scale_dtype: fp16}

``fold: true`` (needs ``share_scales: true``, ``pack: false``) makes AWQ a transform for the quantizer
that follows (llm-compressor's ``AWQModifier`` then ``GPTQModifier``): the scales are searched as
above, then each Linear keeps the *float* weight ``W * s`` and the ``1 / s`` folds into the norm or
Linear before it (:mod:`nnsqueeze.llm.awq_fold`); the model computes the same function (to float
rounding) and the next step quantizes ``W * s`` on the scaled inputs' statistics::

    steps:
      - awq: {bits: 4, group_size: 64, share_scales: true, fold: true}
      - gptq: {bits: 4, group_size: 64, act_order: true}
"""

from __future__ import annotations

from pydantic import Field, model_validator
from torch import nn

import torch

from ..llm.awq import AWQAccumulator, awq_search, shared_alpha, siblings
from ..llm.awq_fold import attention_heads, fold_scales_
from ..llm.packed import PackedLinear, add_input_scale_
from ..ops.rtn import rtn_quantize
from ..llm.sequential import get_weight, set_weight
from ..quant.convert import convert, weight_only_args
from ..registry import STEPS
from .base import recorded_module
from ._llm import LLMStep, QuantFields, note_groups, relative_errors
from .rtn import check_pack, to_weight_only, pack_layers, recorded_scheme, scheme_dict, note_kernel


class AWQConfig(QuantFields):
    n_grid: int = Field(20, ge=1, le=200, description="alpha candidates: 0, 1/n, ..., (n-1)/n")
    pack: bool = Field(False, description="store PackedLinear modules: the codes of Q(W * s) and an input_scale_ "
                       "s (bits 4/8, group_size a power of two >= 16 or null); false: simulated float weights")
    share_scales: bool = Field(False, description="one scale for the Linears reading the same input (q/k/v, "
                               "gate/up) and GQA-consistent o_proj scales, so that they fold into the previous op "
                               "(needed by the open-format exports)")
    fold: bool = Field(False, description="leave float weights W * s with 1 / s folded into the op before each "
                       "layer (no quantization): AWQ as a transform for a following rtn/gptq step; needs "
                       "share_scales: true and pack: false")

    _pack_ok = model_validator(mode="after")(check_pack)

    @model_validator(mode="after")
    def _fold_ok(self):
        if self.fold and (self.pack or not self.share_scales):
            raise ValueError("fold: true needs share_scales: true (scales that fold into the previous op) and "
                             f"pack: false (it quantizes nothing), got share_scales: {self.share_scales}, "
                             f"pack: {self.pack}")
        return self


@STEPS.register("awq")
class AWQ(LLMStep):
    needs_float = True
    trainable_after = False
    Config = AWQConfig

    @property
    def quantizes(self) -> bool:  # fold: true leaves float layers for the quantizer that follows
        return not self.config.fold

    def run(self, model, ctx):
        c = self.config
        layers = self.block_layers(model, ctx)
        self.layers_ = [n for n, _ in layers]
        note_groups(ctx, "awq", c, layers)

        packs, scales = {}, {}

        alphas: dict[str, float] = {}
        chosen = {n for n, _ in layers}

        def apply(name, mod, acc):
            w = get_weight(mod)
            g = c.group_for(w.shape[1])
            mean, alpha = acc.abs_mean, None
            if c.share_scales:
                mean = gqa_mean(model, name, mean)
                group = [n for n in siblings(name) if n in chosen]
                if len(group) > 1:
                    if name not in alphas:   # the first of the group searches for all (same input, same stats)
                        a = shared_alpha([get_weight(model.get_submodule(n)) for n in group], mean, acc.hessian,
                                         c.bits, g, c.symmetric, c.n_grid, c.scale_dtype,
                                         full_range=c.full_range)
                        alphas.update(dict.fromkeys(group, a))
                    alpha = alphas[name]
            r = awq_search(w, mean, acc.hessian, c.bits, g, c.symmetric, c.n_grid, c.scale_dtype, alpha,
                           unsigned=True, full_range=c.full_range)  # zero points in the packed layout
            if c.fold:
                scales[name] = r.scales   # folded at the end of the block, the weights stay float
            else:
                set_weight(mod, r.weight)
            if c.pack:
                packs[name], scales[name] = (r.scaled_weight, r.scale, r.zero_point), r.scales
            rtn = rtn_quantize(w, c.bits, g, c.symmetric, full_range=c.full_range).weight
            err, rtn_err = relative_errors(w, [r.weight, rtn], acc.hessian)
            return {"method": "awq", **scheme_dict(c, w.shape[1]), "alpha": r.alpha, "error": round(err, 6),
                    "rtn_error": round(rtn_err, 6)}

        def on_block(i, block):  # pack as soon as a block is done (see gptq); the next block sees the packed layers
            if c.fold:
                fold_scales_(model, scales, getattr(model, "config", None))
                scales.clear()
            if packs:
                pack_layers(model, packs, c, self.where)
                for name, s in scales.items():
                    add_input_scale_(model.get_submodule(name), s)
                packs.clear()
                scales.clear()

        self.figures_ = self.calibrate(model, ctx, layers,
                                       lambda n, m: AWQAccumulator(get_weight(m).shape[1], m.weight.device),
                                       apply, on_block=on_block)
        if c.pack:
            note_kernel(ctx, "awq")
        return model

    def record(self):
        fold = {"fold": True} if self.config.fold else {}
        return {"layers": self.layers_, **scheme_dict(self.config), "pack": self.config.pack,
                "scale_dtype": self.config.scale_dtype, "share_scales": self.config.share_scales, **fold}

    @classmethod
    def rebuild(cls, model: nn.Module, config, record):
        if not record.get("pack"):
            return model  # simulated float weights: nothing structural
        c = recorded_scheme(record)
        for name in record.get("layers", []):
            mod = recorded_module(model, name, (nn.Module,), "awq record")
            if not isinstance(mod, PackedLinear):
                mod = to_weight_only(model, name, mod, c, "awq record")
                mod = convert(mod, weight_only_args(c.bits, c.group_for(mod.in_features), c.symmetric, c.full_range))
            add_input_scale_(mod)  # the stored scales are loaded with the weights
        return model


def gqa_mean(model: nn.Module, name: str, mean: torch.Tensor) -> torch.Tensor:
    """``o_proj``'s mean |x| averaged over the query heads sharing a kv head (repeated back), so its
    scales fold into ``v_proj``'s rows; other layers, or no GQA: unchanged."""
    heads, kv = attention_heads(getattr(model, "config", None))
    if not name.endswith("self_attn.o_proj") or not heads or kv == heads or mean.shape[0] % heads:
        return mean
    hd = mean.shape[0] // heads
    m = mean.reshape(kv, heads // kv, hd).mean(1, keepdim=True)
    return m.expand(kv, heads // kv, hd).reshape(-1).contiguous()
