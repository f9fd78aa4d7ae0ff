"""SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights before W8A8.

For a Linear ``y = x W^T`` the per-input-channel scale ``s_j = max|x_j|^alpha / max|W_:,j|^(1-alpha)``
turns it into ``y = (x / s) (W * s)^T``: mathematically the same output, but the activation's
outlier channels shrink (easier per-tensor int8) while the weights grow a little (per-channel int8
absorbs it). ``1/s`` is folded into the op that produces ``x`` (the preceding LayerNorm/RMSNorm),
``s`` into every Linear that reads ``x`` (q/k/v share one ``s``: their weights are pooled).

Pure tensor math::

    >>> import torch
    >>> from nnsqueeze.llm.smoothquant import smooth_scales, smooth_weight, smooth_activation
    >>> x = torch.randn(64, 8, dtype=torch.float64); x[:, 2] *= 50
    >>> w = torch.randn(4, 8, dtype=torch.float64)
    >>> s = smooth_scales(x.abs().amax(0), [w], alpha=0.5)
    >>> torch.allclose(smooth_activation(x, s) @ smooth_weight(w, s).T, x @ w.T)
    True
"""

from __future__ import annotations

import torch

# The statistics, the scale formula and the fold are pure math shared with the CNN path
# (quant/equalize.py) and quantize-dynamic, so they live in the ops layer; re-exported here, where the
# LLM steps and the docs have always found them.
from ..ops.equalize import SMOOTH_EPS as EPS
from ..ops.equalize import AbsMaxAccumulator, fold_scales, smooth_scales

__all__ = ["EPS", "AbsMaxAccumulator", "smooth_scales", "smooth_weight", "smooth_activation"]

Tensor = torch.Tensor


def smooth_weight(w: Tensor, s: Tensor) -> Tensor:
    """``W * s`` (each input column ``j`` times ``s_j``), computed in float64, in ``w``'s dtype
    (:func:`nnsqueeze.ops.equalize.fold_scales` with no producer)."""
    return fold_scales(s, [], [w])[1][0]


def smooth_activation(x: Tensor, s: Tensor) -> Tensor:
    """``x / s`` along the last dimension (what the folded preceding op now produces)."""
    return x / s.to(x.dtype)
