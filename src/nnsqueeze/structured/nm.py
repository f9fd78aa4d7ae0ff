"""N:M semi-structured masks: keep the ``n`` largest-|w| weights in every ``m`` consecutive ones.

Groups run along a layer's reduction dimension (``weight.reshape(out, -1)``: input features for
Linear, ``in_channels x kernel`` for Conv in PyTorch's layout), the layout 2:4 sparse kernels use
for Linear. Pure math, no module walking::

    >>> import torch
    >>> from nnsqueeze.structured.nm import nm_mask
    >>> nm_mask(torch.tensor([[0.1, -3.0, 2.0, 0.5, 1.0, 1.0, -1.0, 0.0]]), 2, 4).int()
    tensor([[0, 1, 1, 0, 1, 1, 0, 0]], dtype=torch.int32)
"""

from __future__ import annotations

import torch


def nm_mask(weight: torch.Tensor, n: int, m: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask shaped like ``weight``; ``keep`` (an existing mask) is respected: never revived.

    Ties go to the earlier weight. Raises ``ValueError`` if the reduction size is not a multiple of ``m``.
    """
    rows = weight.shape[0]
    flat = weight.detach().reshape(rows, -1)
    if flat.shape[1] % m:
        raise ValueError(f"reduction size {flat.shape[1]} is not a multiple of {m}")
    score = flat.abs().double()
    if keep is not None:
        score = torch.where(keep.reshape(rows, -1), score, torch.full_like(score, -1.0))
    g = score.reshape(rows, -1, m)
    top = torch.topk(g - 1e-12 * torch.arange(m, dtype=g.dtype, device=g.device), n, dim=-1).indices
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, top, True).reshape(weight.shape)
    return mask if keep is None else mask & keep
