"""Step ``share``: layers the user names share one weight tensor, stored once in the artifact.

Recipe (two same-shaped residual-block convolutions tied, then fine-tuned together)::

    steps:
      - share:    {groups: [[blocks.1.conv, blocks.2.conv, blocks.3.conv]]}
      - finetune: {epochs: 5, lr: 1.0e-3}

Python::

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.context import Context
    >>> from nnsqueeze.steps.share import Share
    >>> ctx = Context(progress=False); ctx.report.begin_step("share", {})
    >>> net = Share(Share.Config(groups=[["0", "1"]])).run(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), ctx)
    >>> net[0].weight is net[1].weight
    True

What it does: for every group (two or more Linear/Conv1d/Conv2d layers of the same type and
weight shape) the first layer keeps a ``weight`` Parameter set to the mean of the group's weights
(the single tensor closest to all of them in squared error) and the others use that very
Parameter, so fine-tuning afterwards sums the gradients of every use into it. With ``bias: true``
the biases are tied the same way. Each following layer's class becomes ``Shared<Layer>`` (same
forward maths); its ``pack_state`` drops the tied tensors from ``model.safetensors`` (stored once,
under the first layer's name) and ``unpack_state`` points them back, so ``nsq.load`` reproduces the
model exactly. Layers with a ``weight_mask`` (pruned) are refused: share first, prune afterwards.
``cluster`` skips every layer of a shared group (reported: clustering one user would untie it), and
clustered layers cannot be shared (they are no longer plain layers).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from ..errors import ModelError
from ..quant.protocol import Packable
from ..quant.swap import swap_class
from ..registry import STEPS
from .base import Step, StepConfig, recorded_module

SUPPORTED: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)


class ShareConfig(StepConfig):
    groups: list[list[str]] = Field(description="groups of exact layer names; each group shares one weight")
    bias: bool = Field(False, description="tie the biases too")

    @field_validator("groups")
    @classmethod
    def _groups(cls, v: list[list[str]]) -> list[list[str]]:
        names = [n for g in v for n in g]
        if not v or any(len(g) < 2 for g in v):
            raise ValueError("give at least one group of two or more layer names")
        if len(set(names)) != len(names):
            raise ValueError("a layer may appear in one group only, once")
        return v

    @model_validator(mode="after")
    def _no_targets(self) -> "ShareConfig":
        if self.targets or self.ignore:
            raise ValueError("share names its layers in groups; targets/ignore do not apply")
        return self


class SharedMixin(Packable):
    """A layer whose ``weight`` (and maybe ``bias``) is another layer's Parameter (``shared_from_``).
    Only :class:`~nnsqueeze.quant.protocol.Packable` (tied tensors stored once): it holds no codes
    or qparams, so it is not a QuantizedModule."""

    shared_from_: dict[str, str]  # own tensor name -> the state-dict key it is stored under

    def pack_state(self, sd: dict[str, torch.Tensor], prefix: str) -> None:
        for attr in self.shared_from_:
            sd.pop(prefix + attr, None)

    def unpack_state(self, sd: dict[str, torch.Tensor], prefix: str) -> None:
        for attr, key in self.shared_from_.items():
            if key in sd and prefix + attr not in sd:
                sd[prefix + attr] = sd[key]

    def pack(self) -> dict[str, torch.Tensor]:
        """Refused: the tied tensors are stored under the leader's keys, outside this layer."""
        raise ModelError(type(self).__name__, f"its {', '.join(self.shared_from_)} are stored under "
                         f"{', '.join(self.shared_from_.values())}, another layer's keys",
                         fix="pack the whole model's state dict (nnsqueeze.artifact.pack_state)")

    def unpack(self, packed: Any) -> None:
        self.pack()  # the same refusal


# __module__ given: ABCMeta (Packable's metaclass) would otherwise name the creating frame's module, abc
_CLASSES: dict[type, type] = {b: type(f"Shared{b.__name__}", (SharedMixin, b), {"__module__": __name__})
                              for b in SUPPORTED}


def _tie(leader: nn.Module, leader_name: str, m: nn.Module, bias: bool) -> None:
    m.weight = leader.weight
    tied = {"weight": f"{leader_name}.weight"}
    if bias and m.bias is not None:
        m.bias = leader.bias
        tied["bias"] = f"{leader_name}.bias"
    swap_class(m, _CLASSES[type(m)])
    m.shared_from_ = tied


@STEPS.register("share")
class Share(Step):
    needs_float = True
    Config = ShareConfig
    default_targets: ClassVar[list[str]] = []

    def __init__(self, config: ShareConfig, index: int = 0):
        super().__init__(config, index)
        self.groups_: list[list[str]] = []

    def _group(self, model: nn.Module, names: list[str], where: str) -> list[nn.Module]:
        mods = []
        for n in names:
            try:
                m = model.get_submodule(n)
            except AttributeError:
                raise ModelError(where, f"no module named {n!r}",
                                 fix="use exact names from model.named_modules()") from None
            if type(m) not in SUPPORTED or not isinstance(getattr(m, "weight", None), nn.Parameter):
                raise ModelError(f"{where}: {n}", f"{type(m).__name__} is not a plain Linear/Conv1d/Conv2d layer",
                                 fix="name layers that have not been replaced by an earlier step")
            if hasattr(m, "weight_mask"):
                raise ModelError(f"{where}: {n}", "the layer is pruned (weight_mask)", fix="share before pruning")
            mods.append(m)
        first = mods[0]
        for n, m in zip(names[1:], mods[1:]):
            if type(m) is not type(first) or m.weight.shape != first.weight.shape:
                raise ModelError(f"{where}: {n}", f"{type(m).__name__}{tuple(m.weight.shape)} differs from "
                                 f"{names[0]}: {type(first).__name__}{tuple(first.weight.shape)}",
                                 fix="group layers of the same type and weight shape")
            if self.config.bias and (m.bias is None) != (first.bias is None):
                raise ModelError(f"{where}: {n}", "some layers of the group have a bias and some not",
                                 fix="set bias: false")
        return mods

    @torch.no_grad()
    def run(self, model: nn.Module, ctx: Any) -> nn.Module:
        c: ShareConfig = self.config
        before = after = 0
        for gi, names in enumerate(c.groups):
            mods = self._group(model, names, f"{self.where}.groups[{gi}]")
            lead = mods[0]
            spread = float(torch.stack([m.weight for m in mods]).std(0).mean()) if len(mods) > 1 else 0.0
            lead.weight.copy_(torch.stack([m.weight for m in mods]).mean(0))
            if c.bias and lead.bias is not None:
                lead.bias.copy_(torch.stack([m.bias for m in mods]).mean(0))
            for m in mods[1:]:
                _tie(lead, names[0], m, c.bias)
            n = lead.weight.numel()
            before, after = before + n * len(mods), after + n
            self.groups_.append(list(names))
            ctx.report.layer(names[0], shared_by=len(mods), weights=n, mean_std_across_group=round(spread, 6))
        ctx.report.step(groups=len(self.groups_), weights_before=before, weights_after=after,
                        ratio=round(before / max(1, after), 3))
        return model

    def record(self) -> dict[str, Any]:
        return {"groups": [list(g) for g in self.groups_]}

    @classmethod
    def rebuild(cls, model: nn.Module, config: ShareConfig, record: dict[str, Any]) -> nn.Module:
        for names in record.get("groups", []):
            mods = [recorded_module(model, n, SUPPORTED, "share record") for n in names]
            for m in mods[1:]:
                _tie(mods[0], names[0], m, config.bias)
        return model
