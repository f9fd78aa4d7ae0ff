"""Steps ``rtn`` and ``gptq``: weight-only round-to-nearest and GPTQ for causal LMs, block by block.

The result is simulated in the float weights (each targeted Linear holds its fake-quantized weight);
packing into int4/int8 storage is a separate concern. Recipe::

    steps:
      - gptq: {bits: 4, group_size: 128, symmetric: true, act_order: true, damp_percent: 0.01,
               samples: 128, ignore: ["re:.*\\\\.mlp\\\\.down_proj"]}
      - rtn:  {bits: 8, group_size: null}          # no calibration data needed

Per layer the report gets ``error`` (relative output error ``||X dW^T|| / ||X W^T||`` on the
calibration tokens), ``rtn_error`` (the same for round-to-nearest, for comparison), the scheme and
the dampening used; the step figures include peak RSS. A layer pruned before (``weight_mask``)
keeps its zeros: GPTQ quantizes around them. Default targets: every Linear inside the
decoder blocks (``lm_head`` stays float, listed as skipped).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from ..llm.gptq import HessianAccumulator, gptq_quantize
from ..llm.rtn import rtn_quantize
from ..llm.sequential import get_weight, set_weight
from ..ops.quant import sqnr_db
from ..registry import STEPS
from ._llm import LLMStep, QuantFields, QuantScheme, relative_error


class RTNConfig(QuantScheme):
    pass


class GPTQConfig(QuantFields):
    damp_percent: float = Field(0.01, gt=0.0, le=1.0, description="dampening, fraction of mean(diag H)")
    act_order: bool = Field(False, description="quantize columns by decreasing Hessian diagonal")
    block_size: int = Field(128, ge=1, description="columns per lazy-update block")
    max_damp_percent: float = Field(10.0, gt=0.0, description="give up (HessianError) past this dampening")


def _mask_oi(mod) -> torch.Tensor | None:
    """A pruned layer's ``weight_mask`` as (out, in), or None: GPTQ must keep its zeros."""
    m = getattr(mod, "weight_mask", None)
    if not isinstance(m, torch.Tensor):
        return None
    return m.T if type(mod).__name__ == "Conv1D" else m


def _scheme(c: QuantScheme) -> dict[str, Any]:
    return {"bits": c.bits, "group_size": c.group_size, "symmetric": c.symmetric}


@STEPS.register("rtn")
class RTN(LLMStep):
    """Round-to-nearest, group-wise; uses no data (the report gets the weight SQNR per layer)."""

    Config = RTNConfig

    def run(self, model, ctx):
        c = self.config
        self.layers_ = []
        for name, mod in self.block_layers(model, ctx):
            w = get_weight(mod)
            q = rtn_quantize(w, c.bits, c.group_size, c.symmetric).weight
            set_weight(mod, q)
            ctx.report.layer(name, method="rtn", weight_sqnr_db=round(sqnr_db(w, q), 3), **_scheme(c))
            self.layers_.append(name)
        return model

    def record(self):
        return {"layers": self.layers_, **_scheme(self.config)}


@STEPS.register("gptq")
class GPTQ(LLMStep):
    Config = GPTQConfig

    def run(self, model, ctx):
        c = self.config
        layers = self.block_layers(model, ctx)
        self.layers_ = [n for n, _ in layers]

        def apply(name, mod, acc):
            w = get_weight(mod)
            r = gptq_quantize(w, acc.hessian, c.bits, c.group_size, c.symmetric, c.damp_percent, c.act_order,
                              c.block_size, c.max_damp_percent, on_note=lambda s: ctx.fallback("gptq", s),
                              where=f"{self.where}: {name}", mask=_mask_oi(mod))
            set_weight(mod, r.weight)
            rtn = rtn_quantize(w, c.bits, c.group_size, c.symmetric).weight
            return {"method": "gptq", **_scheme(c), "damp_percent": r.damp_percent,
                    "error": round(relative_error(w, r.weight, acc.hessian), 6),
                    "rtn_error": round(relative_error(w, rtn, acc.hessian), 6)}

        self.figures_ = self.calibrate(model, ctx, layers,
                                       lambda n, m: HessianAccumulator(get_weight(m).shape[1], m.weight.device), apply)
        return model

    def record(self):
        return {"layers": self.layers_, **_scheme(self.config)}
