"""ops.sparsity against brute-force references (stable sort) and the Zhu & Gupta closed form."""

from __future__ import annotations

import math

import pytest
import torch

from nnsqueeze.ops.sparsity import (cubic_sparsity, global_magnitude_masks, global_threshold, lowest_k_mask,
                                    magnitude_mask, n_to_prune, sparsity_of)

SHAPES = [(1,), (13,), (3, 5), (7, 1), (5, 3, 3), (2, 3, 3, 3), (11, 4, 1, 2)]
SPARSITIES = [0.0, 0.1, 0.25, 1 / 3, 0.5, 0.6, 0.9, 0.99]


def brute_keep(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Reference: drop the first k entries of a stable ascending argsort (ties -> lower index first)."""
    order = torch.sort(scores.reshape(-1), stable=True).indices
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    keep[order[:k]] = False
    return keep.view(scores.shape)


def test_n_to_prune_is_python_round():
    for n in (1, 2, 3, 7, 10, 37, 1000):
        for s in SPARSITIES + [0.5, 0.05, 1.0]:
            assert n_to_prune(n, s) == round(s * n)
    with pytest.raises(ValueError):
        n_to_prune(10, 1.5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_magnitude_mask_exact_count_and_matches_brute_force(shape, sparsity):
    g = torch.Generator().manual_seed(hash((shape, sparsity)) % 2**31)
    w = torch.randn(shape, generator=g)
    keep = magnitude_mask(w, sparsity)
    assert keep.dtype == torch.bool and keep.shape == w.shape
    assert int((~keep).sum()) == round(sparsity * w.numel())
    assert torch.equal(keep, brute_keep(w.abs(), round(sparsity * w.numel())))
    if 0 < (~keep).sum() < w.numel():  # every pruned |w| is <= every kept |w|
        assert w.abs()[~keep].max() <= w.abs()[keep].min()


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.77])
def test_heavy_ties_are_broken_by_index(sparsity):
    # Only 4 distinct magnitudes in 257 entries: the cut always falls inside a block of ties.
    g = torch.Generator().manual_seed(3)
    w = torch.randint(-3, 4, (257,), generator=g).float()
    keep = magnitude_mask(w, sparsity)
    k = round(sparsity * 257)
    assert int((~keep).sum()) == k
    assert torch.equal(keep, brute_keep(w.abs(), k))
    assert torch.equal(magnitude_mask(torch.zeros(4, 5), 0.5).flatten(), torch.arange(20) >= 10)


def test_extremes_and_errors():
    w = torch.randn(3, 4)
    assert magnitude_mask(w, 0.0).all()
    assert not lowest_k_mask(w, 12).any()
    with pytest.raises(ValueError):
        lowest_k_mask(w, 13)
    with pytest.raises(ValueError):
        lowest_k_mask(torch.tensor([1.0, float("nan")]), 1)


def test_existing_mask_is_never_revived():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(6, 7, generator=g)
    old = magnitude_mask(torch.randn(6, 7, generator=g), 0.5)  # unrelated to |w|
    new = magnitude_mask(w, 0.7, old)
    assert not (new & ~old).any()
    assert int((~new).sum()) == round(0.7 * 42)
    # Lower target than already pruned: nothing comes back, count stays.
    assert torch.equal(magnitude_mask(w, 0.2, old), old)


@pytest.mark.parametrize("sparsity", [0.0, 0.2, 0.5, 0.6, 0.95])
def test_global_masks_exact_and_match_concatenated_brute_force(sparsity):
    g = torch.Generator().manual_seed(7)
    ws = [torch.randn(s, generator=g) * scale for s, scale in
          [((7, 3), 1.0), ((13,), 0.1), ((5, 2, 3), 3.0), ((1, 1), 1.0)]]
    keeps = global_magnitude_masks(ws, sparsity)
    total = sum(w.numel() for w in ws)
    assert sum(int((~k).sum()) for k in keeps) == round(sparsity * total)
    ref = brute_keep(torch.cat([w.abs().flatten() for w in ws]), round(sparsity * total))
    assert torch.equal(torch.cat([k.flatten() for k in keeps]), ref)
    for w, k in zip(ws, keeps):
        assert k.shape == w.shape and k.dtype == torch.bool
    t = global_threshold(ws, sparsity)
    all_w = torch.cat([w.abs().flatten() for w in ws])
    if sparsity > 0:
        assert t == torch.sort(all_w).values[round(sparsity * total) - 1].item()
        pruned = torch.cat([w.abs()[~k] for w, k in zip(ws, keeps)])
        kept = torch.cat([w.abs()[k] for w, k in zip(ws, keeps)])
        assert pruned.max() <= t <= kept.min()
    else:
        assert t == -math.inf


def test_global_ties_across_tensors_and_half_precision():
    a = torch.ones(5, dtype=torch.float16)
    b = torch.ones(4, dtype=torch.bfloat16)
    ka, kb = global_magnitude_masks([a, b], 6 / 9)
    # Ties go in concatenation order: all of a, then the first of b.
    assert not ka.any() and torch.equal(kb, torch.tensor([False, True, True, True]))
    assert sparsity_of(torch.cat([ka, kb])) == pytest.approx(6 / 9)


def zhu_gupta(t, s_i, s_f, t0, n, dt):
    """Closed form, valid at the update points t = t0 + j*dt, j = 0..n."""
    return s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3


@pytest.mark.parametrize("s_i,s_f,t0,n,dt", [(0.0, 0.6, 0, 10, 1), (0.1, 0.9, 7, 5, 4), (0.0, 0.5, 3, 3, 13)])
def test_cubic_schedule_closed_form(s_i, s_f, t0, n, dt):
    end = t0 + n * dt
    for j in range(n + 1):
        t = t0 + j * dt
        assert cubic_sparsity(t, s_f, s_i, t0, end, dt) == pytest.approx(zhu_gupta(t, s_i, s_f, t0, n, dt))
        for off in range(1, dt):  # holds between update points
            if t + off < end:
                assert cubic_sparsity(t + off, s_f, s_i, t0, end, dt) == cubic_sparsity(t, s_f, s_i, t0, end, dt)
    assert cubic_sparsity(t0 - 1, s_f, s_i, t0, end, dt) == s_i if t0 > 0 else True
    assert cubic_sparsity(end, s_f, s_i, t0, end, dt) == s_f
    assert cubic_sparsity(end + 100, s_f, s_i, t0, end, dt) == s_f
    values = [cubic_sparsity(t, s_f, s_i, t0, end, dt) for t in range(end + 3)]
    assert all(a <= b for a, b in zip(values, values[1:]))  # never decreases
    with pytest.raises(ValueError):
        cubic_sparsity(0, s_f, s_i, t0, end, 0)


def test_cubic_schedule_end_not_a_multiple_of_frequency():
    # end - begin = 10, dt = 4: updates at 0, 4, 8, and the target exactly at 10.
    vals = [cubic_sparsity(t, 0.8, 0.0, 0, 10, 4) for t in range(12)]
    assert vals[0] == vals[3] == 0.0
    assert vals[4] == pytest.approx(0.8 - 0.8 * 0.6 ** 3)
    assert vals[9] == pytest.approx(0.8 - 0.8 * 0.2 ** 3)
    assert vals[10] == vals[11] == 0.8
