"""Low-rank factorizations: truncated SVD of a matrix, Tucker-2 of a convolution kernel. Pure torch.

    >>> import torch
    >>> from nnsqueeze.ops.svd import truncated_svd, rank_for_energy
    >>> w = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    >>> b, a = truncated_svd(w, 2)                     # w ~ b @ a, b: (3, 2), a: (2, 3)
    >>> round(float((w - b @ a).norm()), 4)            # = the discarded singular value
    1.0
    >>> rank_for_energy(torch.tensor([3.0, 2.0, 1.0]), 0.9)   # 9 + 4 = 13 of 14: 92.9% >= 90%
    2

``truncated_svd(w, r)`` returns ``b = U_r sqrt(S_r)`` and ``a = sqrt(S_r) V_r^T``; by Eckart-Young
``||w - b a||_F^2`` is the sum of the discarded squared singular values. ``tucker2(w, r_out, r_in)``
factors a kernel ``(O, I, *k)`` as ``u_out (O, r_out)``, ``core (r_out, r_in, *k)``, ``u_in (r_in, I)``
(HOSVD of the two channel unfoldings): a 1x1 conv ``I -> r_in``, the ``k`` conv ``r_in -> r_out``,
and a 1x1 conv ``r_out -> O``.
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor


def truncated_svd(w: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``(b, a)`` with ``b @ a`` the best rank-``rank`` approximation of the 2-D ``w``."""
    if w.dim() != 2:
        raise ValueError(f"truncated_svd needs a matrix, got shape {tuple(w.shape)}")
    if not 1 <= rank <= min(w.shape):
        raise ValueError(f"rank must be in [1, {min(w.shape)}], got {rank}")
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).to(w.dtype), (root[:, None] * vh[:rank]).to(w.dtype)


def singular_values(w: Tensor) -> Tensor:
    return torch.linalg.svdvals(w.double())


def rank_for_energy(s: Tensor, energy: float) -> int:
    """Smallest rank keeping at least ``energy`` of ``sum(s**2)`` (the squared Frobenius norm)."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    e = s.double() ** 2
    total = float(e.sum())
    if total == 0.0:
        return 1
    kept = torch.cumsum(e, 0) / total
    return min(int((kept < energy - 1e-12).sum()) + 1, s.numel())


def rank_for_budget(out_features: int, in_features: int, fraction: float) -> int | None:
    """Largest rank with ``rank * (out + in) <= fraction * out * in``; None when rank 1 does not fit."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    r = min(out_features, in_features,
            int(math.floor(fraction * out_features * in_features / (out_features + in_features))))
    return r if r >= 1 else None


def tucker2_params(o: int, i: int, ksize: int, r_out: int, r_in: int) -> int:
    """Weights of the three convolutions (biases excluded)."""
    return i * r_in + r_in * r_out * ksize + r_out * o


def tucker2_ranks_for_budget(o: int, i: int, ksize: int, fraction: float) -> tuple[int, int] | None:
    """Ranks ``(r_out, r_in) ~ t * (o, i)`` with the largest ``t`` whose parameters fit the budget;
    None when even ``(1, 1)`` does not fit."""
    budget = fraction * o * i * ksize
    best = None
    for r_out in range(1, o + 1):
        r_in = max(1, min(i, round(r_out * i / o)))
        if tucker2_params(o, i, ksize, r_out, r_in) <= budget:
            best = (r_out, r_in)
    return best


def _mode_basis(w: Tensor, mode: int, rank: int) -> Tensor:
    unfold = w.movedim(mode, 0).reshape(w.shape[mode], -1).double()
    u, _, _ = torch.linalg.svd(unfold, full_matrices=False)
    return u[:, :rank]


def tucker2_ranks_for_energy(w: Tensor, energy: float) -> tuple[int, int]:
    """Per-mode ranks keeping ``energy`` of each channel unfolding's squared norm."""
    return (rank_for_energy(singular_values(w.reshape(w.shape[0], -1)), energy),
            rank_for_energy(singular_values(w.movedim(1, 0).reshape(w.shape[1], -1)), energy))


def tucker2(w: Tensor, r_out: int, r_in: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(u_out (O, r_out), core (r_out, r_in, *k), u_in (r_in, I))`` of the kernel ``w (O, I, *k)``."""
    if w.dim() < 3:
        raise ValueError(f"tucker2 needs a conv kernel (O, I, *k), got shape {tuple(w.shape)}")
    o, i = w.shape[:2]
    if not (1 <= r_out <= o and 1 <= r_in <= i):
        raise ValueError(f"ranks ({r_out}, {r_in}) must be in [1, {o}] x [1, {i}]")
    u_out, u_in = _mode_basis(w, 0, r_out), _mode_basis(w, 1, r_in)
    core = torch.einsum("oi...,or,is->rs...", w.double(), u_out, u_in)
    return u_out.to(w.dtype), core.to(w.dtype), u_in.t().contiguous().to(w.dtype)


def tucker2_reconstruct(u_out: Tensor, core: Tensor, u_in: Tensor) -> Tensor:
    return torch.einsum("or,rs...,si->oi...", u_out.double(), core.double(), u_in.double()).to(core.dtype)


# ---- spatial (Jaderberg et al. 2014, scheme 2): (kh x kw) conv -> (kh x 1) conv then (1 x kw) conv ----

def spatial_matrix(w: Tensor) -> Tensor:
    """The kernel ``(O, I, kh, kw)`` unfolded to ``M[(i, y), (o, x)] = w[o, i, y, x]``, shape ``(I*kh, O*kw)``;
    a rank-``r`` factorization of ``M`` is a pair of separable convolutions with ``r`` channels between."""
    if w.dim() != 4:
        raise ValueError(f"spatial decomposition needs a 2-D conv kernel (O, I, kh, kw), got shape {tuple(w.shape)}")
    o, i, kh, kw = w.shape
    return w.permute(1, 2, 0, 3).reshape(i * kh, o * kw)


def spatial_params(o: int, i: int, kh: int, kw: int, rank: int) -> int:
    """Weights of the vertical ``(r, I, kh, 1)`` and horizontal ``(O, r, 1, kw)`` kernels."""
    return rank * (i * kh + o * kw)


def spatial_rank_for_budget(o: int, i: int, kh: int, kw: int, fraction: float) -> int | None:
    """Largest rank whose two kernels keep at most ``fraction`` of ``o*i*kh*kw``; None if rank 1 does not fit."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    r = min(i * kh, o * kw, int(math.floor(fraction * o * i * kh * kw / (i * kh + o * kw))))
    return r if r >= 1 else None


def spatial_svd(w: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``(vertical (r, I, kh, 1), horizontal (O, r, 1, kw))`` with
    ``w[o, i, y, x] ~ sum_r vertical[r, i, y, 0] * horizontal[o, r, 0, x]`` (best in Frobenius norm)."""
    o, i, kh, kw = w.shape if w.dim() == 4 else (0, 0, 0, 0)
    b, a = truncated_svd(spatial_matrix(w), rank)           # b: (I*kh, r), a: (r, O*kw)
    vertical = b.reshape(i, kh, rank).permute(2, 0, 1).unsqueeze(-1)
    horizontal = a.reshape(rank, o, kw).permute(1, 0, 2).unsqueeze(2)
    return vertical.contiguous(), horizontal.contiguous()


def spatial_reconstruct(vertical: Tensor, horizontal: Tensor) -> Tensor:
    return torch.einsum("riy,orx->oiyx", vertical[..., 0].double(), horizontal[:, :, 0].double()).to(vertical.dtype)
