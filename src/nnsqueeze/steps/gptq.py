"""Step ``gptq``: GPTQ for causal LMs, block by block (the packing it shares with ``rtn`` and ``awq``:
:mod:`nnsqueeze.steps.rtn`).

With ``pack: true`` (default) every quantized layer becomes a
:class:`~nnsqueeze.llm.packed.PackedLinear` holding exactly GPTQ's codes, group scales and zero points
(returned in the stored layout of :mod:`nnsqueeze.ops.rtn`); ``pack: false`` keeps the simulated
float weights. Packing needs ``bits`` 4 or 8 and ``group_size`` a power of two >= 16 or null. Recipe::

    steps:
      - gptq: {bits: 4, group_size: 128, symmetric: true, act_order: true, damp_percent: 0.01,
               samples: 128, ignore: ["re:.*\\\\.mlp\\\\.down_proj"]}
      - gptq: {bits: 4, group_size: 128, clip: {method: mse, grid: 20, min_ratio: 0.5}}

``clip``: per group, the clipped range with the least squared quantization error, each column
weighted by the Hessian diagonal unless ``weighted: false`` (:mod:`nnsqueeze.ops.rtn`). Off by default.

Per layer the report gets ``error`` (relative output error ``||X dW^T|| / ||X W^T||`` on the
calibration tokens), ``rtn_error`` (the same for round-to-nearest, for comparison), the scheme and
the dampening used; the step figures include peak RSS. A layer pruned before (``weight_mask``)
keeps its zeros: GPTQ quantizes around them. Default targets: every Linear inside the decoder
blocks (``lm_head`` stays float, listed as skipped).
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

from ..llm.gptq import HessianAccumulator, gptq_quantize
from ..llm.sequential import get_weight, set_weight
from ..ops.rtn import rtn_quantize
from ..registry import STEPS
from ._llm import ClipConfig, QuantFields, note_groups, relative_errors
from .rtn import CLIP_FIELD, PACK_FIELD, check_pack, clip_args, pack_layers, scheme_dict, WeightQuantStep, note_kernel


class GPTQConfig(QuantFields):
    pack: bool = PACK_FIELD
    clip: ClipConfig | None = CLIP_FIELD
    damp_percent: float = Field(0.01, gt=0.0, le=1.0, description="dampening, fraction of mean(diag H)")
    act_order: bool = Field(False, description="quantize columns by decreasing Hessian diagonal")
    block_size: int = Field(128, ge=1, description="columns per lazy-update block")
    max_damp_percent: float = Field(10.0, gt=0.0, description="give up (HessianError) past this dampening")

    _pack_ok = model_validator(mode="after")(check_pack)


def _mask_oi(mod) -> torch.Tensor | None:
    """A pruned layer's ``weight_mask`` as (out, in), or None: GPTQ must keep its zeros."""
    m = getattr(mod, "weight_mask", None)
    if not isinstance(m, torch.Tensor):
        return None
    return m.T if type(mod).__name__ == "Conv1D" else m


@STEPS.register("gptq")
class GPTQ(WeightQuantStep):
    needs_float = True
    quantizes = True
    trainable_after = False
    Config = GPTQConfig

    def run(self, model, ctx):
        c = self.config
        layers = self.block_layers(model, ctx)
        self.layers_ = [n for n, _ in layers]
        note_groups(ctx, "gptq", c, layers)
        packs = {}

        def apply(name, mod, acc):
            w = get_weight(mod)
            g = c.group_for(w.shape[1])
            r = gptq_quantize(w, acc.hessian, c.bits, g, c.symmetric, c.damp_percent, c.act_order,
                              c.block_size, c.max_damp_percent, on_note=lambda s: ctx.fallback("gptq", s),
                              where=f"{self.where}: {name}", mask=_mask_oi(mod), scale_dtype=c.scale_dtype,
                              clip_weighted=c.clip is None or c.clip.weighted is not False, unsigned=True,
                              full_range=c.full_range,
                              **clip_args(c.clip))
            set_weight(mod, r.weight)
            if c.pack:
                packs[name] = (r.weight, r.scale, r.zero_point)
            rtn = rtn_quantize(w, c.bits, g, c.symmetric, full_range=c.full_range).weight
            err, rtn_err = relative_errors(w, [rtn], acc.hessian, known=[r.quad_error])
            return {"method": "gptq", **scheme_dict(c, w.shape[1]), "damp_percent": r.damp_percent,
                    "error": round(err, 6), "rtn_error": round(rtn_err, 6)}

        def on_block(i, block):
            # Pack this block's layers now (their float copies in `packs` are freed): the next
            # block's inputs come from the packed layers, whose dequantized weights equal the
            # simulated ones exactly, and an offloaded block goes back to disk already packed.
            if c.pack and packs:
                pack_layers(model, packs, c, self.where)
                packs.clear()

        self.figures_ = self.calibrate(model, ctx, layers,
                                       lambda n, m: HessianAccumulator(get_weight(m).shape[1], m.weight.device), apply,
                                       on_block=on_block)
        if c.pack:
            note_kernel(ctx, "gptq")
        return model
