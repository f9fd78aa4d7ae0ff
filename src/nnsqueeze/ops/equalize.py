"""Cross-layer scaling between two consecutive layers: cross-layer equalization (CLE) and the
SmoothQuant migration, as pure tensor math.

For ``y = L2(relu(L1(x)))`` and any positive per-channel ``s`` (one per output channel of L1 =
input channel of L2), ``relu(z / s) = relu(z) / s``, so dividing L1's output channel ``i`` (weight
row and bias) by ``s_i`` and multiplying L2's input channel ``i`` by ``s_i`` leaves ``y`` unchanged
in exact arithmetic (:func:`fold_scales`, the one implementation of that fold: CLE, the
``smoothquant`` step and ``quantize-dynamic``'s in-layer smoothing all use it). Only the choice of
``s`` differs:

- CLE (Nagel et al. 2019, "Data-free quantization"): ``s_i = sqrt(r1_i / r2_i)`` with ``r1_i`` the
  range (absmax) of L1's output channel ``i`` and ``r2_i`` that of L2's input channel ``i``; both
  become ``sqrt(r1_i r2_i)``, which balances per-channel weight ranges (helps per-tensor grids and
  channels with tiny ranges);
- SmoothQuant (Xiao et al. 2023): ``s_i = max|a_i|**alpha / max|W2_:,i|**(1-alpha)`` with ``a`` the
  activation entering L2: outlier activation channels shrink, the weights absorb them
  (:func:`smooth_scales`, also what :mod:`nnsqueeze.llm.smoothquant` uses for a norm feeding Linears).

Weights are (C_out, C_in, *k) (conv) or (C_out, C_in) (linear); groups must be 1. ::

    >>> import torch
    >>> from nnsqueeze.ops.equalize import cle_scales, fold_scales
    >>> w1, b1, w2 = torch.randn(4, 3), torch.randn(4), torch.randn(5, 4)
    >>> s = cle_scales(w1, w2)
    >>> (v1, c1), (v2,) = fold_scales(s, [w1, b1], [w2])
    >>> x = torch.randn(7, 3)
    >>> torch.allclose(torch.relu(x @ v1.T + c1) @ v2.T, torch.relu(x @ w1.T + b1) @ w2.T, atol=1e-5)
    True
    >>> torch.allclose(v1.abs().amax(1), v2.abs().amax(0), rtol=1e-5)
    True
"""

from __future__ import annotations

from typing import Sequence

import torch

Tensor = torch.Tensor

EPS = 1e-8
SMOOTH_EPS = 1e-5  # SmoothQuant's floor for both maxima: a dead channel must not give s = 0 or inf


def out_channel_absmax(w: Tensor) -> Tensor:
    """``max |w|`` per output channel (dim 0), (C_out,)."""
    return w.detach().reshape(w.shape[0], -1).abs().amax(1)


def in_channel_absmax(w: Tensor) -> Tensor:
    """``max |w|`` per input channel (dim 1), (C_in,)."""
    return w.detach().transpose(0, 1).reshape(w.shape[1], -1).abs().amax(1)


def cle_scales(w1: Tensor, w2: Tensor) -> Tensor:
    """CLE scales ``sqrt(r1 / r2)`` (float64); channels where either range is 0 get ``s = 1``."""
    r1, r2 = out_channel_absmax(w1).double(), in_channel_absmax(w2).double()
    if r1.shape != r2.shape:
        raise ValueError(f"L1 has {r1.numel()} output channels but L2 reads {r2.numel()} input channels")
    ok = (r1 > EPS) & (r2 > EPS)
    return torch.where(ok, torch.sqrt(r1 / r2.clamp(min=EPS)), torch.ones_like(r1))


class AbsMaxAccumulator:
    """Running per-channel ``max |x_j|`` over all calibration tokens (float64, (C,)): the activation
    statistic of SmoothQuant. The channels are ``axis`` of each input (-1: a Linear's features, 1: a
    conv's channels); every other axis counts as tokens. ::

        >>> acc = AbsMaxAccumulator(2, axis=1)
        >>> acc.add(torch.tensor([[[1.0, -5.0], [2.0, 0.5]]])); acc.absmax, acc.tokens
        (tensor([5., 2.], dtype=torch.float64), 2)
    """

    def __init__(self, columns: int, device: torch.device | str = "cpu", axis: int = -1):
        self.absmax = torch.zeros(columns, dtype=torch.float64, device=device)
        self.tokens = 0
        self.axis = axis

    def add(self, x: Tensor) -> None:
        x = x.detach().movedim(self.axis, -1)
        x = x.reshape(-1, x.shape[-1])                                   # (tokens, C)
        self.absmax = torch.maximum(self.absmax, x.abs().amax(0).to(self.absmax.device, torch.float64))
        self.tokens += x.shape[0]


def smooth_scales(act_absmax: Tensor, weights: list[Tensor], alpha: float = 0.5) -> Tensor:
    """SmoothQuant scales ``s`` (in,) for activations with per-channel ``act_absmax`` (in,) feeding
    ``weights`` (each (out_k, in)); same dtype as ``act_absmax`` (float64 for the accumulator's)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    cols = act_absmax.shape[0]
    if not weights or any(w.shape[1] != cols for w in weights):
        raise ValueError(f"smooth_scales: every weight must have {cols} input columns")
    w_absmax = torch.stack([w.detach().abs().amax(0).to(act_absmax.dtype) for w in weights]).amax(0)
    a = act_absmax.clamp(min=SMOOTH_EPS)
    return (a ** alpha / w_absmax.clamp(min=SMOOTH_EPS) ** (1 - alpha)).clamp(min=SMOOTH_EPS)


def smoothquant_scales(act_absmax: Tensor, w2: Tensor, alpha: float = 0.5) -> Tensor:
    """SmoothQuant scales for L2's input channels (float64): :func:`smooth_scales` on L2's weight
    read as (C_out * k, C_in) columns."""
    cols = w2.detach().transpose(0, 1).reshape(w2.shape[1], -1).T   # (C_out * k, C_in)
    return smooth_scales(act_absmax.double(), [cols.double()], alpha=alpha)


def fold_scales(s: Tensor, producer: Sequence[Tensor | None],
                consumers: Sequence[Tensor]) -> tuple[list[Tensor | None], list[Tensor]]:
    """Fold per-channel scales ``s`` (C,) between an op and the layers that read its output: every
    ``producer`` tensor is divided by ``s`` along dim 0 (the op's output rows: a weight (C, ...), a
    bias or a norm's weight (C,)) and every ``consumers`` weight multiplied by ``s`` along dim 1 (its
    input columns: (out, C, *k)). ``consumer(producer(x))`` is unchanged in exact arithmetic.

    The one implementation of the fold behind CLE and SmoothQuant (``quantize``'s ``equalize``, the
    ``smoothquant`` step, and ``quantize-dynamic``'s in-layer smoothing, whose producer is the
    layer's own input multiplier). Computed in float64 and returned in each tensor's own dtype; a
    ``None`` producer (a missing bias) stays ``None``. ::

        >>> import torch
        >>> w1, b1, w2 = torch.randn(4, 3), torch.randn(4), torch.randn(5, 4)
        >>> (v1, c1), (v2,) = fold_scales(torch.tensor([2.0, 0.5, 1.0, 4.0]), [w1, b1], [w2])
        >>> torch.equal(c1 * torch.tensor([2.0, 0.5, 1.0, 4.0]), b1), v2.shape
        (True, torch.Size([5, 4]))
    """
    s64 = s.detach().double().reshape(-1)
    if (s64 <= 0).any() or not torch.isfinite(s64).all():
        raise ValueError("scales must be positive and finite")
    c = s64.numel()
    if any(t is not None and (t.dim() < 1 or t.shape[0] != c) for t in producer) or \
            any(t.dim() < 2 or t.shape[1] != c for t in consumers):
        raise ValueError(f"fold_scales: producers need {c} rows (dim 0) and consumers {c} columns (dim 1)")

    def div(t: Tensor | None) -> Tensor | None:
        if t is None:
            return None
        return (t.detach().double() / s64.reshape(-1, *([1] * (t.dim() - 1)))).to(t.dtype)

    def mul(t: Tensor) -> Tensor:
        return (t.detach().double() * s64.reshape(1, -1, *([1] * (t.dim() - 2)))).to(t.dtype)

    return [div(t) for t in producer], [mul(t) for t in consumers]

