"""Step ``sparsegpt``: one-shot pruning of causal LMs with weight reconstruction, block by block.

The kept weights absorb the pruned ones' contribution through the inverse Hessian
(:mod:`nnsqueeze.llm.sparsegpt`); ``wanda`` (:mod:`nnsqueeze.steps.wanda`) is the update-free
alternative. It leaves a bool ``weight_mask`` buffer (``True`` = keep) like ``prune``, so a later ``finetune`` keeps
the zeros. Recipe::

    steps:
      - sparsegpt: {sparsity: 0.5, samples: 128}
      - sparsegpt: {pattern: "2:4"}    # 2 nonzeros in every 4 consecutive inputs of a row

Report per layer: ``sparsity`` and ``error`` (relative output error on the calibration tokens).
A layer that already has a mask keeps its zeros (the new mask is intersected with the old one).
"""

from __future__ import annotations

from pydantic import Field

from ..llm.gptq import HessianAccumulator
from ..llm.sequential import get_weight
from ..llm.sparsegpt import sparsegpt_prune
from ..registry import STEPS
from ._llm import PruneStep, SparsityFields, relative_error, set_masked


class SparseGPTConfig(SparsityFields):
    damp_percent: float = Field(0.01, gt=0.0, le=1.0)
    block_size: int = Field(128, ge=1)
    max_damp_percent: float = Field(10.0, gt=0.0)


@STEPS.register("sparsegpt")
class SparseGPT(PruneStep):
    needs_float = True
    Config = SparseGPTConfig

    def run(self, model, ctx):
        c = self.config
        n, m = c.prune_nm()
        layers = self.block_layers(model, ctx)
        self.layers_ = [name for name, _ in layers]

        def apply(name, mod, acc):
            w = get_weight(mod)
            r = sparsegpt_prune(w, acc.hessian, c.sparsity, n, m, c.damp_percent, c.block_size,
                                c.max_damp_percent, on_note=lambda s: ctx.fallback("sparsegpt", s),
                                where=f"{self.where}: {name}")
            keep = set_masked(mod, r.weight, r.mask)
            return {"method": "sparsegpt", "pattern": c.pattern, "damp_percent": r.damp_percent,
                    "sparsity": round(1 - float(keep.float().mean()), 6),
                    "error": round(relative_error(w, get_weight(mod), acc.hessian), 6)}

        self.figures_ = self.calibrate(model, ctx, layers,
                                       lambda nm, mod: HessianAccumulator(get_weight(mod).shape[1], mod.weight.device),
                                       apply)
        return model
