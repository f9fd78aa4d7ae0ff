"""Step ``wanda``: prune causal LMs by ``|W| * ||x||`` per output row, block by block (no weight update).

See :mod:`nnsqueeze.llm.wanda`. Leaves a bool ``weight_mask`` buffer (``True`` = keep) like ``prune``.
Recipe::

    steps:
      - wanda: {sparsity: 0.5, samples: 128}
      - wanda: {pattern: "2:4"}        # 2 nonzeros in every 4 consecutive inputs of a row

Report per layer: ``sparsity`` and, with ``report_error: true`` (default), ``error`` (relative output
error on the calibration tokens; costs an in x in float64 matrix per layer of the current block).
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..llm.gptq import HessianAccumulator
from ..llm.sequential import get_weight
from ..llm.wanda import InputNormAccumulator, wanda_prune
from ..registry import STEPS
from ._llm import PruneStep, SparsityFields, relative_error, set_masked


class WandaConfig(SparsityFields):
    report_error: bool = Field(True, description="also accumulate X^T X to report the output error "
                               "(memory: in^2 float64 per layer of the current block)")


class _Both:
    """Wanda's norms and (optionally) the Hessian, fed from the same hook."""

    def __init__(self, cols: int, hessian: bool, device: torch.device | str = "cpu"):
        self.norms = InputNormAccumulator(cols, device)
        self.h = HessianAccumulator(cols, device) if hessian else None

    def add(self, x):
        self.norms.add(x)
        if self.h is not None:
            self.h.add(x)


@STEPS.register("wanda")
class Wanda(PruneStep):
    needs_float = True
    Config = WandaConfig

    def run(self, model, ctx):
        c = self.config
        n, m = c.prune_nm()
        layers = self.block_layers(model, ctx)
        self.layers_ = [name for name, _ in layers]

        def apply(name, mod, acc):
            w = get_weight(mod)
            r = wanda_prune(w, acc.norms.norms, c.sparsity, n, m, where=f"{self.where}: {name}")
            keep = set_masked(mod, r.weight, r.mask)
            fields = {"method": "wanda", "pattern": c.pattern, "sparsity": round(1 - float(keep.float().mean()), 6)}
            if acc.h is not None:
                fields["error"] = round(relative_error(w, get_weight(mod), acc.h.hessian), 6)
            return fields

        self.figures_ = self.calibrate(model, ctx, layers,
                                       lambda nm, mod: _Both(get_weight(mod).shape[1], c.report_error,
                                                             mod.weight.device),
                                       apply)
        return model
