"""Truncated SVD and Tucker-2: closed-form reconstruction errors, rank rules."""

from __future__ import annotations

import pytest
import torch

from nnsqueeze.ops.svd import (rank_for_budget, rank_for_energy, truncated_svd, tucker2, tucker2_params,
                               tucker2_ranks_for_budget, tucker2_reconstruct)


@pytest.mark.parametrize("shape,rank", [((20, 12), 1), ((20, 12), 5), ((12, 30), 11), ((8, 8), 8)])
def test_svd_error_equals_discarded_singular_values(shape, rank):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    b, a = truncated_svd(w, rank)
    assert b.shape == (shape[0], rank) and a.shape == (rank, shape[1])
    s = torch.linalg.svdvals(w)
    err2 = float(((w - b @ a) ** 2).sum())
    assert err2 == pytest.approx(float((s[rank:] ** 2).sum()), abs=1e-9)


def test_svd_exact_on_low_rank_matrix():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 3, generator=g) @ torch.randn(3, 10, generator=g)
    b, a = truncated_svd(w, 3)
    assert torch.allclose(b @ a, w, atol=1e-5)
    with pytest.raises(ValueError, match="rank"):
        truncated_svd(w, 11)


def test_rank_rules():
    s = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14
    assert [rank_for_energy(s, e) for e in (0.5, 9 / 14, 0.9, 13 / 14, 0.99, 1.0)] == [1, 1, 2, 2, 3, 3]
    assert rank_for_budget(100, 100, 0.5) == 25            # 25 * 200 = 5000 = 0.5 * 10000
    assert rank_for_budget(4, 4, 0.01) is None and tucker2_ranks_for_budget(7, 1, 3, 0.5) is None
    r_out, r_in = tucker2_ranks_for_budget(64, 32, 3, 0.5)
    assert tucker2_params(64, 32, 3, r_out, r_in) <= 0.5 * 64 * 32 * 3
    assert tucker2_params(64, 32, 3, r_out + 1, round((r_out + 1) / 2)) > 0.5 * 64 * 32 * 3


@pytest.mark.parametrize("shape", [(12, 6, 3), (8, 5, 3, 3)])
def test_tucker2_full_rank_is_exact_and_truncation_bounded(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    u_out, core, u_in = tucker2(w, shape[0], shape[1]) if shape[0] <= w[0].numel() else (None, None, None)
    assert torch.allclose(tucker2_reconstruct(u_out, core, u_in), w, atol=1e-10)
    # HOSVD: the error is at most the sum of the discarded energies of the two unfoldings
    r_out, r_in = shape[0] // 2, shape[1] // 2
    err2 = float(((w - tucker2_reconstruct(*tucker2(w, r_out, r_in))) ** 2).sum())
    s0 = torch.linalg.svdvals(w.reshape(shape[0], -1))
    s1 = torch.linalg.svdvals(w.movedim(1, 0).reshape(shape[1], -1))
    bound = float((s0[r_out:] ** 2).sum() + (s1[r_in:] ** 2).sum())
    assert 0 < err2 <= bound + 1e-9


@pytest.mark.parametrize("shape,rank", [((5, 3, 3, 4), 4), ((7, 2, 3, 3), 1), ((4, 6, 5, 1), 3)])
def test_spatial_error_equals_discarded_singular_values(shape, rank):
    from nnsqueeze.ops.svd import spatial_matrix, spatial_reconstruct, spatial_svd
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    v, h = spatial_svd(w, rank)
    o, i, kh, kw = shape
    assert v.shape == (rank, i, kh, 1) and h.shape == (o, rank, 1, kw)
    s = torch.linalg.svdvals(spatial_matrix(w))
    err2 = float(((w - spatial_reconstruct(v, h)) ** 2).sum())
    assert err2 == pytest.approx(float((s[rank:] ** 2).sum()), abs=1e-9)


def test_spatial_full_rank_convs_equal_the_kernel():
    # (kh x 1) then (1 x kw) with stride/padding/dilation split per axis == the original conv (float64)
    import torch.nn.functional as F
    from nnsqueeze.ops.svd import spatial_svd
    g = torch.Generator().manual_seed(3)
    w = torch.randn(5, 3, 3, 4, generator=g, dtype=torch.float64)
    x = torch.randn(2, 3, 11, 13, generator=g, dtype=torch.float64)
    v, h = spatial_svd(w, 9)   # full rank: min(I*kh, O*kw) = min(9, 20)
    want = F.conv2d(x, w, stride=(2, 3), padding=(1, 2), dilation=(2, 1))
    got = F.conv2d(F.conv2d(x, v, stride=(2, 1), padding=(1, 0), dilation=(2, 1)), h, stride=(1, 3),
                   padding=(0, 2), dilation=(1, 1))
    assert torch.allclose(got, want, atol=1e-10)
