"""AdaRound (Nagel et al., ICML 2020): learn, per weight, whether to round down or up, so that the
layer's OUTPUT on calibration data is reconstructed best, instead of rounding each weight to nearest.

Pure tensor math, no module walking. The weight is given as rows ``w`` (R, D) with one scale and
zero point per row (per-channel: R = C_out; per-group: R = C_out * groups); ``fn(w_rows, x)``
computes the layer's output for a batch of inputs with those weights. Each weight's code is
``floor(w / s) + h(V)`` with ``h`` the rectified sigmoid of a free parameter ``V`` (initialized at
the fractional part), trained with Adam on

    ``|| fn(w_soft, x) - y ||^2  +  lam * sum(1 - |2 h(V) - 1| ** beta)``

where the regularizer (off for the first ``warmup`` of the iterations, ``beta`` annealed from 20
to 2) drives every ``h`` to 0 or 1. At the end ``h >= 0.5`` rounds up. The reconstruction error of
the learned codes is then compared with nearest rounding's on ALL the given inputs and the better
codes are returned, so the result is never worse than nearest rounding on that data::

    >>> import torch
    >>> from nnsqueeze.ops.adaround import adaround
    >>> g = torch.Generator().manual_seed(0)
    >>> w = torch.randn(6, 10, generator=g); x = torch.randn(256, 10, generator=g)
    >>> s = w.abs().amax(1) / 7; z = torch.zeros(6, dtype=torch.int32)
    >>> res = adaround(w, s, z, -8, 7, lambda wr, xb: xb @ wr.T, x, x @ w.T, iters=200)
    >>> res.error <= res.nearest_error
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .quant import quantize

Tensor = torch.Tensor

ZETA, GAMMA = 1.1, -0.1  # stretch of the rectified sigmoid (the paper's values)


def rectified_sigmoid(v: Tensor) -> Tensor:
    """``clamp(sigmoid(v) * (zeta - gamma) + gamma, 0, 1)``: reaches exactly 0 and 1."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def init_v(frac: Tensor) -> Tensor:
    """``V`` with ``rectified_sigmoid(V) == frac`` for ``frac`` in (0, 1) (clamped inside)."""
    p = ((frac - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
    return torch.log(p / (1 - p))


@dataclass
class AdaRoundResult:
    codes: Tensor          # (R, D) int32 codes in [qmin, qmax]
    error: float           # reconstruction error (mean squared, float64) of the returned codes
    nearest_error: float   # same for round-to-nearest codes
    learned: bool          # False when nearest rounding was as good or better (its codes returned)
    flipped: float         # fraction of weights whose code differs from nearest rounding


def _dequant(codes: Tensor, s: Tensor, z: Tensor) -> Tensor:
    return (codes.float() - z.float()[:, None]) * s.float()[:, None]


@torch.no_grad()
def reconstruction_error(fn: Callable[[Tensor, Tensor], Tensor], w_rows: Tensor, inputs: Tensor,
                         targets: Tensor, batch: int = 256) -> float:
    """Mean squared difference (float64) between ``fn(w_rows, x)`` and ``targets`` over all inputs."""
    tot, n = 0.0, 0
    for i in range(0, inputs.shape[0], batch):
        y = fn(w_rows, inputs[i:i + batch]).double()
        t = targets[i:i + batch].double()
        tot += float(((y - t) ** 2).sum())
        n += t.numel()
    return tot / max(n, 1)


def adaround(w: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
             fn: Callable[[Tensor, Tensor], Tensor], inputs: Tensor, targets: Tensor, *,
             iters: int = 500, batch: int = 64, lam: float = 0.01, lr: float = 1e-2,
             warmup: float = 0.2, beta: tuple[float, float] = (20.0, 2.0), seed: int = 0,
             mask: Tensor | None = None) -> AdaRoundResult:
    """Learned rounding of ``w`` (R, D) on the grid ``scale`` (R,), ``zero_point`` (R,); see module doc.

    ``inputs`` (N, ...) and ``targets`` (N, ...): calibration inputs of the layer and the outputs
    to reconstruct (usually the float layer's outputs). ``mask`` (R, D) bool: the real weights when
    rows are padded (per-group rows with a partial last group); padding is left out of the rounding
    regularizer and of ``flipped`` (``fn`` drops it from the weight).
    """
    if w.dim() != 2 or scale.shape != (w.shape[0],) or zero_point.shape != (w.shape[0],):
        raise ValueError(f"adaround: w must be (R, D) with (R,) scale/zero_point, got {tuple(w.shape)}, "
                         f"{tuple(scale.shape)}, {tuple(zero_point.shape)}")
    w = w.detach().float()
    s = scale.detach().float()
    z = zero_point.detach().to(torch.int32)
    nearest = quantize(w, s, z, qmin, qmax, axis=0)
    nearest_err = reconstruction_error(fn, _dequant(nearest, s, z), inputs, targets)
    base = torch.floor(w / s[:, None])
    v = init_v(w / s[:, None] - base).requires_grad_(True)
    opt = torch.optim.Adam([v], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n = inputs.shape[0]
    zf, start = z.float()[:, None], int(warmup * iters)
    for it in range(iters):
        idx = torch.randint(0, n, (min(batch, n),), generator=gen)
        h = rectified_sigmoid(v)
        w_soft = (torch.clamp(base + h + zf, qmin, qmax) - zf) * s[:, None]
        out = fn(w_soft, inputs[idx])
        rec = ((out - targets[idx]) ** 2).reshape(out.shape[0], -1).sum(1).mean()
        loss = rec
        if it >= start:
            t = (it - start) / max(iters - start - 1, 1)
            b = beta[1] + 0.5 * (beta[0] - beta[1]) * (1 + torch.cos(torch.tensor(t * torch.pi)))
            reg = 1 - (2 * h - 1).abs() ** b
            loss = rec + lam * (reg if mask is None else reg[mask]).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        codes = torch.clamp(base + (rectified_sigmoid(v) >= 0.5).float() + zf, qmin, qmax).to(torch.int32)
    err = reconstruction_error(fn, _dequant(codes, s, z), inputs, targets)
    diff = codes != nearest
    flipped = float((diff if mask is None else diff[mask]).float().mean())
    if err < nearest_err:
        return AdaRoundResult(codes, err, nearest_err, True, flipped)
    return AdaRoundResult(nearest, nearest_err, nearest_err, False, 0.0)
