"""Wanda (Sun et al., 2023): prune by ``|W_ij| * ||X_j||_2``, per output row, with no weight update.

The score multiplies each weight by the L2 norm of its input channel over all calibration tokens,
so weights that meet large activations survive even when small. Comparison group: each output row
(the paper's finding: per-output beats per-layer for LLMs). Pure tensor math; the norms come from
:class:`InputNormAccumulator`::

    >>> import torch
    >>> from nnsqueeze.llm.wanda import InputNormAccumulator, wanda_prune
    >>> acc = InputNormAccumulator(12); acc.add(torch.randn(64, 12))
    >>> r = wanda_prune(torch.randn(5, 12), acc.norms, sparsity=0.5)
    >>> r.mask.sum(1).tolist()                   # exactly half of each row kept
    [6, 6, 6, 6, 6]
    >>> r = wanda_prune(torch.randn(5, 12), acc.norms, prune_n=2, prune_m=4)
    >>> int(r.mask.reshape(5, 3, 4).sum(-1).unique())
    2

With all-ones norms this is magnitude pruning per row (the baseline in the tests). Masks: ``True``
= keep; ``prune_n`` of every ``prune_m`` consecutive inputs of a row are pruned (2:4 keeps 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ModelError

Tensor = torch.Tensor


class InputNormAccumulator:
    """Running sum of squares of every input channel; ``norms`` = its square root (float64, (in,))."""

    def __init__(self, columns: int, device: torch.device | str = "cpu"):
        self.sumsq = torch.zeros(columns, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.sumsq.device, torch.float64)
        self.sumsq += (x * x).sum(0)
        self.tokens += x.shape[0]

    @property
    def norms(self) -> Tensor:
        return self.sumsq.sqrt()


@dataclass
class WandaResult:
    weight: Tensor   # (out, in) float32 with exact zeros where pruned
    mask: Tensor     # (out, in) bool, True = kept


def wanda_scores(w: Tensor, norms: Tensor) -> Tensor:
    """``|W| * ||X_j||`` (out, in), float64."""
    return w.detach().abs().to(torch.float64) * norms.to(torch.float64).unsqueeze(0)


@torch.no_grad()
def wanda_prune(w: Tensor, norms: Tensor, sparsity: float = 0.5, prune_n: int = 0, prune_m: int = 0,
                where: str = "wanda") -> WandaResult:
    """Prune ``w`` (out, in): ``round(sparsity * in)`` lowest scores per row, or N:M per row."""
    rows, cols = w.shape
    if norms.shape != (cols,):
        raise ValueError(f"wanda_prune: {cols} input features but {tuple(norms.shape)} norms")
    scores = wanda_scores(w, norms.to(w.device))
    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)
    if prune_m > 0:
        if not 0 < prune_n < prune_m:
            raise ModelError(where, f"N:M needs 0 < N < M, got {prune_n}:{prune_m}", fix="use e.g. 2:4")
        if cols % prune_m:
            raise ModelError(where, f"{cols} input features are not a multiple of M={prune_m}",
                             fix="ignore this layer or use unstructured sparsity")
        seg = scores.reshape(rows, cols // prune_m, prune_m)
        idx = torch.argsort(seg, dim=2, stable=True)[..., :prune_n]
        pruned = torch.zeros_like(seg, dtype=torch.bool).scatter_(2, idx, True).reshape(rows, cols)
    else:
        if not 0.0 <= sparsity < 1.0:
            raise ModelError(where, f"sparsity must be in [0, 1), got {sparsity}", fix="use e.g. 0.5")
        k = int(round(sparsity * cols))
        if k:
            idx = torch.argsort(scores, dim=1, stable=True)[:, :k]
            pruned.scatter_(1, idx, True)
    out = w.detach().to(torch.float32).clone()
    out[pruned] = 0.0
    return WandaResult(out, ~pruned)
