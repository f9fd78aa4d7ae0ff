"""L2 magnitude: the Euclidean norm of all weights of a channel across the group (group lasso norm).

    >>> import torch
    >>> from nnsqueeze.structured.importance import Part
    >>> from nnsqueeze.structured.importance.l2 import score
    >>> score([Part("conv", "out", torch.tensor([[3.0, -4.0]])), Part("linear", "in", torch.tensor([[0.0]]))])
    tensor([5.])
"""

from __future__ import annotations

import torch


def score(parts: list) -> torch.Tensor:
    return sum(p.data.double().pow(2).sum(1) for p in parts if p.kind != "activation").sqrt().float()
