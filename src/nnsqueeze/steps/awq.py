"""Step ``awq``: activation-aware weight quantization for causal LMs, block by block.

Per targeted Linear, searches the AWQ exponent ``alpha`` (scales ``mean|x|^alpha``) on a grid and
keeps the simulated weight ``Q(W * s) / s`` (see :mod:`nnsqueeze.llm.awq`). Recipe::

    steps:
      - awq: {bits: 4, group_size: 128, n_grid: 20, samples: 128}

Report per layer: ``alpha``, ``error`` and ``rtn_error`` (relative output errors on the calibration
tokens; ``error <= rtn_error`` by construction). The scale search is per Linear (not shared by
q/k/v) and AWQ's clipping search is not done: both matter once weights are packed.
"""

from __future__ import annotations

from pydantic import Field

from ..llm.awq import AWQAccumulator, awq_search
from ..llm.rtn import rtn_quantize
from ..llm.sequential import get_weight, set_weight
from ..registry import STEPS
from ._llm import LLMStep, QuantFields, relative_error
from .gptq import _scheme


class AWQConfig(QuantFields):
    n_grid: int = Field(20, ge=1, le=200, description="alpha candidates: 0, 1/n, ..., (n-1)/n")


@STEPS.register("awq")
class AWQ(LLMStep):
    Config = AWQConfig

    def run(self, model, ctx):
        c = self.config
        layers = self.block_layers(model, ctx)
        self.layers_ = [n for n, _ in layers]

        def apply(name, mod, acc):
            w = get_weight(mod)
            r = awq_search(w, acc.abs_mean, acc.hessian, c.bits, c.group_size, c.symmetric, c.n_grid)
            set_weight(mod, r.weight)
            return {"method": "awq", **_scheme(c), "alpha": r.alpha,
                    "error": round(relative_error(w, r.weight, acc.hessian), 6),
                    "rtn_error": round(relative_error(w, rtn_quantize(w, c.bits, c.group_size, c.symmetric).weight, acc.hessian), 6)}

        self.figures_ = self.calibrate(model, ctx, layers, lambda n, m: AWQAccumulator(get_weight(m).shape[1], m.weight.device),
                                       apply)
        return model

    def record(self):
        return {"layers": self.layers_, **_scheme(self.config)}
