"""AWQ (Lin et al., 2023): activation-aware weight quantization by per-input-channel scaling.

Weights that meet large activations matter most. AWQ multiplies input channel ``j`` of ``W`` by
``s_j = mean|x_j| ** alpha`` before round-to-nearest and divides it back afterwards (in deployment
the ``1/s`` is folded into the previous op), so salient channels get a finer effective grid. ``alpha``
is searched over ``[0, 1)`` on a grid, minimizing the layer's output error. ``alpha = 0`` is plain RTN
and is always on the grid, so AWQ's error is never above RTN's on the calibration data.

Pure tensor math. The output error of a weight change ``D`` is ``||X D^T||^2 = n/2 * tr(D H D^T)``
with ``H = 2/n X^T X`` (GPTQ's Hessian), so the search needs no stored activations::

    >>> import torch
    >>> from nnsqueeze.llm.awq import AWQAccumulator, awq_search
    >>> x = torch.randn(512, 16); x[:, 3] *= 30                  # an outlier channel
    >>> acc = AWQAccumulator(16); acc.add(x)
    >>> r = awq_search(torch.randn(8, 16), acc.abs_mean, acc.hessian, bits=4, group_size=8)
    >>> r.error <= r.rtn_error, r.scales.shape
    (True, torch.Size([16]))

Returned: ``scales`` (in,), ``scaled_weight`` = ``Q(W * s)`` (what a packed artifact stores, with the
group scales/zero points of that quantization) and ``weight`` = ``Q(W * s) / s`` (the float weight
that simulates it). Left out here: AWQ's weight-clipping search, and searching one scale shared by
the Linears that read the same input (q/k/v) so that it can be folded into the preceding norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.rtn import rtn_quantize
from .gptq import HessianAccumulator

Tensor = torch.Tensor


class AWQAccumulator(HessianAccumulator):
    """GPTQ's Hessian plus the running mean of ``|x_j|`` per input channel (float64, (in,))."""

    def __init__(self, columns: int, device: torch.device | str = "cpu"):
        super().__init__(columns, device)
        self._abs_sum = torch.zeros(columns, dtype=torch.float64, device=device)

    def add(self, x: Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1]).to(self._abs_sum.device, torch.float64)
        self._abs_sum += x2.abs().sum(0)
        super().add(x2)

    @property
    def abs_mean(self) -> Tensor:
        return self._abs_sum / max(1, self.tokens)


@dataclass
class AWQResult:
    weight: Tensor          # (out, in) float32: Q(W * s) / s, the simulated weight
    scaled_weight: Tensor   # (out, in) float32: Q(W * s), on the grid of scale / zero_point
    scale: Tensor           # (out, n_groups) group scales of Q(W * s)
    zero_point: Tensor      # (out, n_groups)
    scales: Tensor          # (in,) float32 per-input-channel AWQ scales s
    alpha: float            # best exponent found
    error: float            # tr(D H D^T) of the result (proportional to ||X D^T||^2)
    rtn_error: float        # the same for plain RTN (alpha = 0)


def quadratic_error(w: Tensor, w_hat: Tensor, hessian: Tensor) -> float:
    """``tr(D H D^T)`` with ``D = w - w_hat``: ``2/n ||X D^T||_F^2`` (float64)."""
    d = (w.double() - w_hat.double())
    return float(((d @ hessian.double()) * d).sum())


@torch.no_grad()
def awq_search(w: Tensor, abs_mean: Tensor, hessian: Tensor, bits: int = 4, group_size: int | None = 128,
               symmetric: bool = True, n_grid: int = 20, scale_dtype: str = "fp32",
               alpha: float | None = None, unsigned: bool = False, full_range: bool = False) -> AWQResult:
    """Search ``alpha`` in ``{0, 1/n_grid, ..., (n_grid-1)/n_grid}``; see the module docstring.
    ``alpha`` given: use that exponent (found by :func:`shared_alpha` for layers sharing an input).
    ``unsigned``: scale / zero point in the packed storage layout (:mod:`nnsqueeze.ops.rtn`);
    ``full_range``: the symmetric grid on the full signed range (same module)."""
    cols = w.shape[1]
    if abs_mean.shape != (cols,) or hessian.shape != (cols, cols):
        raise ValueError(f"awq_search: weight {tuple(w.shape)}, abs_mean {tuple(abs_mean.shape)}, "
                         f"Hessian {tuple(hessian.shape)} do not match")
    w32 = w.detach().to(torch.float32)
    # Dead channels (never active) would get s = 0: floor at a tiny fraction of the largest mean.
    a = abs_mean.to(torch.float64).clamp(min=max(float(abs_mean.max()) * 1e-6, 1e-12))
    best = None
    rtn_error = None
    forced = alpha is not None   # k == 0 (plain RTN) still runs, for rtn_error
    grid = [k / n_grid for k in range(n_grid)] if not forced else [0.0, float(alpha)]
    for k, alpha in enumerate(grid):
        s = a ** alpha
        s = (s / (s.max() * s.min()).sqrt()).to(torch.float32)   # centre the scales around 1 (reference)
        r = rtn_quantize(w32 * s, bits, group_size, symmetric, scale_dtype, unsigned=unsigned, full_range=full_range)
        w_eff = r.weight / s
        err = quadratic_error(w32, w_eff, hessian)
        if k == 0:
            rtn_error = err
        if best is None or err < best[0] or (forced and k == len(grid) - 1):
            best = (err, alpha, s, r, w_eff)
    err, alpha, s, r, w_eff = best
    return AWQResult(w_eff, r.weight, r.scale, r.zero_point, s, alpha, err, rtn_error)


def awq_scales(abs_mean: Tensor, alpha: float) -> Tensor:
    """The AWQ input scales ``mean|x|^alpha`` (centred around 1) that :func:`awq_search` uses."""
    a = abs_mean.to(torch.float64).clamp(min=max(float(abs_mean.max()) * 1e-6, 1e-12))
    s = a ** alpha
    return (s / (s.max() * s.min()).sqrt()).to(torch.float32)


@torch.no_grad()
def shared_alpha(ws: list[Tensor], abs_mean: Tensor, hessian: Tensor, bits: int = 4, group_size: int | None = 128,
                 symmetric: bool = True, n_grid: int = 20, scale_dtype: str = "fp32",
                 full_range: bool = False) -> float:
    """The one ``alpha`` minimizing the summed output error of Linears that read the same input
    (q/k/v, gate/up): their scales are then equal and fold into the op before them (AutoAWQ's way)."""
    best = None
    for k in range(n_grid):
        alpha = k / n_grid
        s = awq_scales(abs_mean, alpha)
        err = 0.0
        for w in ws:
            w32 = w.detach().to(torch.float32)
            q = rtn_quantize(w32 * s, bits, group_size, symmetric, scale_dtype, full_range=full_range).weight
            err += quadratic_error(w32, q / s, hessian)
        if best is None or err < best[0]:
            best = (err, alpha)
    return best[1]


SHARED = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))


def siblings(name: str) -> list[str]:
    """The Linears of ``name``'s block that read the same input as it (itself included)."""
    for group in SHARED:
        for member in group:
            if name.endswith("." + member):
                base = name[: -len(member)]
                return [base + m for m in group]
    return [name]
