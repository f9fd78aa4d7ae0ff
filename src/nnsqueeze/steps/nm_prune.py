"""Step ``nm-prune``: N:M semi-structured sparsity (2:4 by default) for runtimes with sparse kernels.

Recipe::

    steps:
      - structured-prune: {ratio: 0.3}
      - nm-prune: {n: 2, m: 4, targets: [Linear]}
      - finetune: {steps: 500, lr: 1.0e-4}     # masks are kept through fine-tuning

Python::

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.context import Context
    >>> from nnsqueeze.steps.nm_prune import NMPrune
    >>> ctx = Context(progress=False); ctx.report.begin_step("nm-prune", {})
    >>> m = NMPrune(NMPrune.Config()).run(nn.Sequential(nn.Linear(8, 4)), ctx)
    >>> int(m[0].weight_mask.sum()), ctx.report.steps[-1]["figures"]["sparsity"]
    (16, 0.5)

Masks are the ``prune`` step's bool ``weight_mask`` buffers (see :mod:`nnsqueeze.steps.prune`):
``finetune`` keeps masked weights at zero, an existing mask is never revived, export sees real
zeros. Layers whose reduction size (``weight.reshape(out, -1).shape[1]``) is not a multiple of
``m`` are skipped with the reason. ONNX has no N:M format: the exported weights are dense with
zeros in the N:M pattern, for TensorRT or other runtimes to exploit.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field, model_validator
from torch import nn

from ..registry import STEPS
from ..structured.nm import nm_mask
from .base import Step, StepConfig
from .prune import MASK, SUPPORTED, Prune, ensure_mask


class NMPruneConfig(StepConfig):
    n: int = Field(2, ge=1, description="weights kept per group")
    m: int = Field(4, ge=2, description="group size")

    @model_validator(mode="after")
    def _n_below_m(self) -> "NMPruneConfig":
        if self.n >= self.m:
            raise ValueError(f"n ({self.n}) must be smaller than m ({self.m})")
        return self


@STEPS.register("nm-prune")
class NMPrune(Step):
    needs_float = True
    Config = NMPruneConfig
    default_targets: ClassVar[list[str]] = ["Linear", "Conv1d", "Conv2d"]
    trains: ClassVar[bool] = False

    def __init__(self, config: NMPruneConfig, index: int = 0):
        super().__init__(config, index)
        self.layers_: list[str] = []

    @torch.no_grad()
    def run(self, model: nn.Module, ctx: Any) -> nn.Module:
        c = self.config
        zeros = total = 0
        for name, mod in self.select(model, ctx, supported=SUPPORTED).layers:
            red = mod.weight[0].numel()
            if red % c.m:
                ctx.skip(self.registered_name, name, f"reduction size {red} is not a multiple of {c.m}")
                continue
            old = ensure_mask(mod)
            old.copy_(nm_mask(mod.weight, c.n, c.m, old))
            mod.weight.mul_(old.to(mod.weight.dtype))
            self.layers_.append(name)
            zeros += old.numel() - int(old.sum())
            total += old.numel()
            ctx.report.layer(name, sparsity=round(1 - float(old.float().mean()), 6), pattern=f"{c.n}:{c.m}")
        ctx.report.step(pattern=f"{c.n}:{c.m}", layers=len(self.layers_), sparsity=round(zeros / max(1, total), 6))
        return model

    def record(self) -> dict[str, Any]:
        return {"layers": list(self.layers_), "mask": MASK, "mask_dtype": "bool"}

    @classmethod
    def rebuild(cls, model: nn.Module, config: NMPruneConfig, record: dict[str, Any]) -> nn.Module:
        return Prune.rebuild(model, config, record)  # zero bool masks; the artifact fills them
