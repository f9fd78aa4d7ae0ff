"""First-order Taylor (Molchanov et al. 2019): |sum over a channel's weights of w * dL/dw|.

The step accumulates gradients over a few training batches and hands the products ``w * grad`` as
parts of kind ``taylor``; the score is the absolute value of their sum per channel::

    >>> import torch
    >>> from nnsqueeze.structured.importance import Part
    >>> from nnsqueeze.structured.importance.taylor import score
    >>> score([Part("taylor", "out", torch.tensor([[1.0, -3.0], [0.5, 0.5]]))])
    tensor([2., 1.])
"""

from __future__ import annotations

import torch


def score(parts: list) -> torch.Tensor:
    ts = [p.data.double().sum(1) for p in parts if p.kind == "taylor"]
    if not ts:
        raise ValueError("taylor importance needs 'taylor' parts (weight x gradient)")
    return sum(ts).abs().float()
