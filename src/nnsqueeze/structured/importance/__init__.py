"""Channel importance criteria, one file each; pure tensor math over the channels of one group.

A criterion receives the group's :class:`Part` list (one per layer dimension that follows the
group, each ``(n, d)`` with one row per channel) and returns ``(n,)`` scores, higher = keep::

    >>> import torch
    >>> from nnsqueeze.structured.importance import CRITERIA, Part
    >>> CRITERIA["l1"]([Part("conv", "out", torch.tensor([[1.0, -1.0], [0.5, 0.0]]))])
    tensor([2.0000, 0.5000])

``kind`` is ``conv``/``linear``/``bn``/``embedding`` for weights; the step builds ``taylor`` parts
(weight x gradient) and ``activation`` parts (calibration outputs) for the data-driven criteria.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Part:
    kind: str
    role: str
    data: torch.Tensor  # (n, d)


from . import activation, bn_scale, fpgm, l1, l2, taylor  # noqa: E402

CRITERIA: dict[str, Callable[[list[Part]], torch.Tensor]] = {
    "l1": l1.score, "l2": l2.score, "fpgm": fpgm.score, "bn-scale": bn_scale.score,
    "taylor": taylor.score, "apoz": activation.apoz, "energy": activation.energy,
}
#: criteria that need data: what the step must gather before scoring
NEEDS = {"taylor": "gradients", "apoz": "activations", "energy": "activations"}
