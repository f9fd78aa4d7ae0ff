"""Step ``group-lasso``: sparsity-regularized training before structured pruning.

During the next training step, after every optimizer step, each channel group of the dependency
graph (:mod:`nnsqueeze.structured.graph`) is shrunk by the proximal operator of the group-lasso
penalty: ``w_g <- w_g * max(0, 1 - strength / ||w_g||)`` over all the weights of channel ``g`` in
every coupled layer. Weak channels reach exactly zero, so the ``structured-prune`` that follows
removes them at (almost) no cost::

    steps:
      - group-lasso: {strength: 1.0e-4}
      - finetune: {steps: 1000, lr: 1.0e-3}
      - structured-prune: {ratio: 0.5, importance: l2}
      - finetune: {steps: 500, lr: 1.0e-3}

Python::

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.context import Context
    >>> from nnsqueeze.steps.group_lasso import GroupLasso
    >>> ctx = Context(example_inputs=torch.randn(2, 3), progress=False); ctx.report.begin_step("group-lasso", {})
    >>> m = GroupLasso(GroupLasso.Config(strength=100.0)).run(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), ctx)
    >>> ctx.callbacks[0].on_step_end(m, 0, 1); float(m[0].weight.detach().abs().sum())
    0.0

No structural change: nothing to record or rebuild. The schedule contract is the one of the
``prune`` step (``requires_training``; callbacks called by ``finetune`` with the unwrapped model).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from ..errors import DataError
from ..registry import STEPS
from ..structured.graph import Group
from ..structured.pruners import channel_slices
from .base import Step, StepConfig
from .channel_prune import LAYERS, StructuredPrune


class GroupLassoConfig(StepConfig):
    strength: float = Field(gt=0.0, description="shrinkage of every channel group's norm per optimizer step")


def _rows(model: nn.Module, g: Group) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, index tensor) pairs: the weights of each channel of ``g``, as views to scale."""
    out = []
    for mb in g.members:
        mod = model.get_submodule(mb.module)
        idx = torch.tensor(mb.positions(g.size), dtype=torch.long, device=mod.weight.device)
        for name in ("weight", "bias"):
            p = getattr(mod, name, None)
            if p is None:
                continue
            dim = 1 if (mb.role == "in" and name == "weight") or isinstance(mod, nn.Embedding) else 0
            if mb.role == "in" and name == "bias":
                continue
            out.append((p, dim, idx, mb.expand))
    return out


class GroupLassoCallback:
    def __init__(self, groups: list[Group], strength: float, figures: dict):
        self.groups, self.strength, self.figures, self.done = groups, strength, figures, False

    def on_train_begin(self, model: nn.Module, total: int) -> None:
        pass

    @torch.no_grad()
    def on_step_end(self, model: nn.Module, step: int, total: int) -> None:
        if self.done:
            return
        for g in self.groups:
            norm2 = sum(s.double().pow(2).sum(1) for mb in g.members
                        for s in channel_slices(model.get_submodule(mb.module), mb.role, mb.offset, mb.expand, g.size,
                                              index=mb.index))
            scale = (1 - self.strength / norm2.sqrt().clamp_min(1e-12)).clamp_min(0)
            for p, dim, idx, expand in _rows(model, g):
                f = scale.repeat_interleave(expand).to(p.dtype)
                shape = [1] * p.dim()
                shape[dim] = -1
                p.index_copy_(dim, idx, p.index_select(dim, idx) * f.reshape(shape))

    def on_train_end(self, model: nn.Module) -> None:
        if self.done:
            return
        self.done = True
        zero = 0
        for g in self.groups:
            n2 = sum(s.pow(2).sum(1) for mb in g.members
                     for s in channel_slices(model.get_submodule(mb.module), mb.role, mb.offset, mb.expand, g.size,
                                              index=mb.index))
            zero += int((n2 == 0).sum())
        self.figures["zero_channels"] = zero


@STEPS.register("group-lasso")
class GroupLasso(Step):
    needs_float = True
    Config = GroupLassoConfig
    default_targets: ClassVar[list[str]] = StructuredPrune.default_targets
    trains: ClassVar[bool] = False
    requires_training: ClassVar[bool] = True

    def run(self, model: nn.Module, ctx: Any) -> nn.Module:
        if ctx.example_inputs is None:
            raise DataError(self.where, "group lasso traces the model and needs example inputs",
                            fix="pass example_inputs=... or calib_data=... to compress()")
        sel = self.select(model, ctx, supported=LAYERS)
        helper = StructuredPrune(StructuredPrune.Config(ratio=0.0, targets=self.config.targets,
                                                        ignore=self.config.ignore), self.index)
        helper.registered_name = self.registered_name
        groups = helper._groups(model, helper._graph(model, ctx.example_inputs, ctx), ctx, sel)
        ctx.report.step(groups=len(groups), channels=sum(g.size for g in groups), strength=self.config.strength)
        ctx.callbacks.append(GroupLassoCallback(groups, self.config.strength, ctx.report.steps[-1]["figures"]))
        return model
