"""L1 magnitude: the sum of |w| over every weight that belongs to a channel, across the group.

    >>> import torch
    >>> from nnsqueeze.structured.importance import Part
    >>> from nnsqueeze.structured.importance.l1 import score
    >>> score([Part("conv", "out", torch.tensor([[3.0, -4.0]])), Part("linear", "in", torch.tensor([[1.0]]))])
    tensor([8.])
"""

from __future__ import annotations

import torch


def score(parts: list) -> torch.Tensor:
    return sum(p.data.double().abs().sum(1) for p in parts if p.kind != "activation").float()
