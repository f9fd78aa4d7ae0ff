"""GPTQ (Frantar et al., 2022): quantize a Linear weight column by column, pushing each column's
rounding error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's
reconstruction loss ``||X W^T - X Q^T||^2``.

Pure tensor math. Inputs: the weight ``W`` (out, in) and the Hessian ``H = 2/n X^T X`` (in, in),
accumulated over calibration tokens with :class:`HessianAccumulator`. Output: the fake-quantized
weight on the same grid as :func:`nnsqueeze.ops.rtn.rtn_quantize`, plus its scales and zero points::

    >>> import torch
    >>> from nnsqueeze.llm.gptq import HessianAccumulator, gptq_quantize
    >>> x = torch.randn(256, 16) @ torch.randn(16, 16)       # correlated inputs (tokens, in)
    >>> acc = HessianAccumulator(16); acc.add(x)
    >>> r = gptq_quantize(torch.randn(8, 16), acc.hessian, bits=4, group_size=8)
    >>> r.weight.shape, r.scale.shape, r.damp_percent
    (torch.Size([8, 16]), torch.Size([8, 2]), 0.01)

Choices (the why):
- dampening: ``H + λ I`` with ``λ = damp_percent * mean(diag H)`` keeps the inverse well conditioned.
  If the Cholesky factorization still fails (H not positive definite: too few tokens, duplicated
  features), ``damp_percent`` is multiplied by 10 (0 becomes 0.001) (up to ``max_damp_percent``), each retry is
  reported through ``on_note``, and :class:`HessianError` is raised if it still fails.
- dead inputs (``H[i, i] == 0``: the channel never fired) get ``H[i, i] = 1`` and a zero weight
  column, as the reference does; they do not influence anything.
- activation order (``act_order=True``) quantizes columns by decreasing ``H[i, i]``. Group scales are
  then *static*: computed once from the un-updated weight over contiguous column groups, so the
  stored layout (contiguous groups) needs no ``g_idx`` permutation. Without act order, a group's
  scale is computed when its first column is reached, from the already-updated weights (reference).
- with ``H = c I`` nothing is propagated (the off-diagonal inverse is 0) and GPTQ equals RTN exactly.
- math in float32 (inverse, updates; ``dtype=torch.float64`` for a reference), as the GPTQ reference
  and llm-compressor do: 1.4-1.6x faster on a CPU. The Hessian is summed in float64 from per-batch
  float32 products. On SmolLM2-135M (BENCHMARKS.md) these float32 roundings alone move W4 g64
  perplexity by about 2%, in either direction: the result is that sensitive to any last-bit change.
  The quantized values are float32 grid values.
- MSE clipping (``clip_grid`` > 1): every group's scale is searched over clipped ranges (see
  :mod:`nnsqueeze.ops.rtn`) before its columns are quantized, each column's squared error weighted
  by ``H[i, i]`` (``clip_weighted``, the layer-output error without cross terms) or not; the error
  feedback then works on that grid.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import NnsqueezeError
from ..ops.rtn import QuantGrid, fake_values

Tensor = torch.Tensor


class HessianError(NnsqueezeError):
    """The layer Hessian is not positive definite even after raising the dampening."""


class HessianAccumulator:
    """Running ``H = 2/n sum_t x_t x_t^T`` over ``n`` tokens (float64; each batch's product in
    float32, as the activations are), fed batch by batch.

    Layers that read the very same input tensor (a block's q/k/v projections, gate/up) share one
    ``x^T x`` product: the last product is kept with a weak reference to its input and that input's
    version counter, and reused when the next ``add`` gets the same, unmodified tensor. The result is
    bit-identical to computing it again (same operands, same operation); it saves 3 of the 7 products
    of a LLaMA block.
    """

    _last: tuple[weakref.ref, int, Tensor] | None = None   # (input, its _version, x^T x as float64)

    def __init__(self, columns: int, device: torch.device | str = "cpu"):
        self.hessian = torch.zeros(columns, columns, dtype=torch.float64, device=device)
        self.tokens = 0

    def _product(self, src: Tensor) -> Tensor:
        last = HessianAccumulator._last
        if (last is not None and last[0]() is src and last[1] == src._version
                and last[2].device == self.hessian.device and last[2].shape == self.hessian.shape):
            return last[2]
        # The product in float32 (3x faster than float64 here; relative error ~3e-7 at 8k tokens, far
        # below the 1% dampening), the running mean in float64.
        x = src.detach().reshape(-1, src.shape[-1]).to(self.hessian.device, torch.float32)
        xtx = (x.T @ x).double()
        HessianAccumulator._last = (weakref.ref(src), src._version, xtx)
        return xtx

    def add(self, x: Tensor) -> None:
        """Add inputs ``x`` (..., in): every leading position is one token."""
        n = x.reshape(-1, x.shape[-1]).shape[0]
        if n == 0:
            return
        xtx = self._product(x)
        # Running mean of 2 x x^T: rescale the old sum so the result never depends on batch order.
        self.hessian *= self.tokens / (self.tokens + n)
        self.tokens += n
        self.hessian += (2.0 / self.tokens) * xtx


@dataclass
class GPTQResult:
    weight: Tensor        # (out, in) fake-quantized weight, float32
    scale: Tensor         # (out, n_groups) float32, contiguous groups of the original column order
    zero_point: Tensor    # (out, n_groups) int32
    perm: Tensor | None   # column order used (act_order), None for the natural order
    damp_percent: float   # dampening actually used (after any retries)
    loss: float           # GPTQ's own estimate of the added loss, sum over columns of err^2 / Hinv_ii
    quad_error: float     # tr((W - Q) H (W - Q)^T) on the undamped H: ||X (W - Q)^T||^2 * 2/n, from `loss`


def inverse_cholesky(h: Tensor, damp_percent: float, max_damp_percent: float,
                      on_note: Callable[[str], None] | None, where: str) -> tuple[Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(H + λI)^-1`` (``U^T U = (H + λI)^-1``), raising λ tenfold
    until it factorizes.

    With ``J`` the order reversal, ``J (H + λI) J = L L^T`` gives ``U = J L^-1 J``: upper triangular
    with a positive diagonal and ``U^T U = J L^-T L^-1 J = (H + λI)^-1``, so it is the unique factor,
    from one Cholesky and one triangular solve (1.6x faster than inverting and factorizing again;
    equal to 5e-15 relative)."""
    mean_diag = float(torch.diagonal(h).mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    p = damp_percent
    while True:
        damped = h + (p * mean_diag) * eye
        lower, info = torch.linalg.cholesky_ex(damped.flip(0, 1))
        if int(info) == 0:
            upper = torch.linalg.solve_triangular(lower, eye, upper=False).flip(0, 1)
            if torch.isfinite(upper).all():
                return upper, p
        nxt = p * 10 if p > 0 else 1e-3  # from no dampening at all, start small
        if nxt > max_damp_percent + 1e-12:
            raise HessianError(where, f"Hessian is not positive definite even with damp_percent={p:g} "
                               f"(mean diagonal {mean_diag:.3g})",
                               fix="give more (and more varied) calibration tokens, raise max_damp_percent, "
                               "or ignore this layer")
        if on_note is not None:
            on_note(f"{where}: Hessian not positive definite with damp_percent={p:g}; retrying with {nxt:g}")
        p = nxt


@torch.no_grad()
def gptq_quantize(w: Tensor, hessian: Tensor, bits: int = 4, group_size: int | None = 128,
                  symmetric: bool = True, damp_percent: float = 0.01, act_order: bool = False,
                  block_size: int = 128, max_damp_percent: float = 10.0,
                  on_note: Callable[[str], None] | None = None, where: str = "gptq",
                  mask: Tensor | None = None, scale_dtype: str = "fp32", clip_grid: int = 1,
                  clip_min: float = 0.5, clip_weighted: bool = True, unsigned: bool = False,
                  full_range: bool = False, dtype: torch.dtype = torch.float32) -> GPTQResult:
    """Quantize ``w`` (out, in) with GPTQ given the layer Hessian (in, in). See the module docstring.

    ``mask`` (out, in) bool, ``True`` = keep: pruned weights stay exactly 0 (a pruned model's zeros
    would otherwise be revived by the error feedback); their drift is compensated like rounding error.
    ``scale_dtype``: scales representable in that type (see :func:`nnsqueeze.ops.rtn.storable_scale`).
    ``unsigned``: scales / zero points in the packed storage layout (:mod:`nnsqueeze.ops.rtn`).
    ``full_range``: the symmetric grid on the full signed range (:mod:`nnsqueeze.ops.rtn`).
    ``dtype``: of the inverse factor and the updates (float32, or float64 for a reference).
    """
    if w.dim() != 2 or hessian.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"gptq_quantize: weight {tuple(w.shape)} and Hessian {tuple(hessian.shape)} do not match")
    if not torch.isfinite(hessian).all():
        raise HessianError(where, "the Hessian has non-finite entries", fix="check the calibration data")
    grid = QuantGrid(bits, group_size, symmetric, scale_dtype, clip_grid, clip_min, unsigned, full_range=full_range)
    rows, cols = w.shape
    W = w.detach().to(dtype).clone()
    H = hessian.detach().to(dtype).clone()
    keep = None if mask is None else mask.to(W.device, torch.bool)
    if keep is not None and keep.shape != W.shape:
        raise ValueError(f"gptq_quantize: mask {tuple(keep.shape)} does not match weight {tuple(W.shape)}")
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    imp = torch.diagonal(H).clone() if clip_weighted else None  # original column order

    groups = grid.groups(cols)
    gsize = groups[0][1] - groups[0][0]
    scale = torch.empty(rows, len(groups), dtype=torch.float32, device=W.device)
    zero = torch.empty(rows, len(groups), dtype=torch.int32, device=W.device)
    perm = None
    if act_order:
        # Static groups: params from the un-updated weight, then columns in decreasing H_ii order.
        for g, (a, b) in enumerate(groups):
            scale[:, g], zero[:, g] = grid.params(W[:, a:b].float(), None if imp is None else imp[a:b])
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
        keep = None if keep is None else keep[:, perm]
    order = perm if perm is not None else torch.arange(cols, device=W.device)
    group_of = (order // gsize).tolist()  # group (original columns) of the column at each position

    U, used = inverse_cholesky(H, damp_percent, max_damp_percent, on_note, where)  # (in, in) upper
    W0, lam = W.clone(), used * float(torch.diagonal(H).mean())   # for quad_error (below)
    QT = torch.zeros(cols, rows, dtype=W.dtype, device=W.device)   # Q transposed: column i is row QT[i]
    qmin, qmax = grid.qmin_qmax
    loss = torch.zeros((), dtype=W.dtype, device=W.device)
    cur_g, sg, zg = -1, None, None
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        # The block transposed, (B, out): column i is the contiguous row T[i] and the columns right of it
        # the contiguous rows T[i:], so each column's update runs on dense memory (1.3-1.5x faster per layer
        # than on the strided (out, B) view). Same products and sums in the same order: the same results.
        T = W[:, i1:i2].T.contiguous()    # (B, out) block being quantized, updated in place
        ErrT = torch.zeros_like(T)        # (B, out) scaled errors, propagated to later blocks at the end
        U1 = U[i1:i2, i1:i2]
        diag = torch.diagonal(U1).tolist()
        for i in range(i2 - i1):
            col, g = i1 + i, group_of[i1 + i]
            if not act_order and col % gsize == 0:
                # Dynamic group params from the current (error-compensated) weights of this group.
                # The group may run past this block: its tail comes from W (not yet updated by this block).
                cur = T[i:i + gsize].T.contiguous()
                if cur.shape[1] < gsize:
                    cur = torch.cat([cur, W[:, i2:i2 + gsize - cur.shape[1]]], 1)
                scale[:, g], zero[:, g] = grid.params(cur.float(), None if imp is None else imp[col:col + cur.shape[1]])
                cur_g = -1
            if g != cur_g:  # (out,) float32 group params, converted once per group, not per column
                cur_g, sg, zg = g, scale[:, g].float(), zero[:, g].float()
            wcol = T[i]
            # grid.fake on one column with the group's float32 params converted once: the per-call
            # overhead of the tiny ops is most of this loop's time
            q = fake_values(wcol.float(), sg, zg, qmin, qmax).to(dtype)
            if keep is not None:
                q = torch.where(keep[:, col], q, torch.zeros_like(q))
            QT[col] = q
            err = (wcol - q) / diag[i]
            # Push this column's error onto the block's remaining columns (row i of the factor).
            T[i:] -= U1[i, i:].unsqueeze(1) * err.unsqueeze(0)
            ErrT[i] = err
        Err1 = ErrT.T.contiguous()        # (out, B)
        loss += (Err1 * Err1).sum() / 2
        # Lazy batch update of all later columns at once: (out, B) @ (B, rest).
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    Q = QT.T
    # Sequential OBS: each column adds err^2 / 2 to 1/2 tr(dW (H + lam I) dW^T), so that sum, less the
    # dampening's share, is the layer's quadratic error on the undamped H, without an (out, in) @ (in, in)
    # product (dead columns: zero in W0 and Q, and in H). Checked against the product in the tests.
    d = (W0 - Q).reshape(-1)
    quad = max(2.0 * float(loss) - lam * float(torch.dot(d, d)), 0.0)
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return GPTQResult(Q.to(torch.float32).contiguous(), scale, zero, perm, used, float(loss), quad)


def output_error(x: Tensor, w: Tensor, w_hat: Tensor) -> float:
    """Layer reconstruction error ``||X W^T - X W_hat^T||_F`` (float64); ``x`` is (tokens, in)."""
    x64 = x.reshape(-1, x.shape[-1]).double()
    return float(torch.linalg.matrix_norm(x64 @ (w.double() - w_hat.double()).T))
