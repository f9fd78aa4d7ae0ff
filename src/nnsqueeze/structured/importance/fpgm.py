"""FPGM (He et al. 2019): channels close to the geometric median of their layer are redundant.

A channel's score is the sum of its Euclidean distances to all other channels of the same layer
(the filters are the producer's ``out`` rows), summed over the group's producers::

    >>> import torch
    >>> from nnsqueeze.structured.importance import Part
    >>> from nnsqueeze.structured.importance.fpgm import score
    >>> score([Part("conv", "out", torch.tensor([[0.0], [1.0], [3.0]]))])
    tensor([4., 3., 5.])
"""

from __future__ import annotations

import torch


def score(parts: list) -> torch.Tensor:
    rows = [p.data.double() for p in parts if p.role == "out" and p.kind in ("conv", "linear", "embedding")]
    rows = rows or [p.data.double() for p in parts]
    return sum(torch.cdist(r, r).sum(1) for r in rows).float()
