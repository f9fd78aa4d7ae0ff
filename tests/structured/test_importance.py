"""Importance criteria and channel allocation against independent float64 / loop references."""

from __future__ import annotations

import torch

from nnsqueeze.structured.allocate import global_plan, keep_count, layer_plan
from nnsqueeze.structured.importance import CRITERIA, Part


def parts(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Part("conv", "out", torch.randn(5, 12, generator=g)), Part("bn", "out", torch.randn(5, 2, generator=g)),
            Part("linear", "in", torch.randn(5, 7, generator=g))]


def test_l1_l2_are_group_norms():
    ps = parts()
    cat = torch.cat([p.data for p in ps], 1).double()
    torch.testing.assert_close(CRITERIA["l1"](ps).double(), cat.abs().sum(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(CRITERIA["l2"](ps).double(), torch.linalg.vector_norm(cat, dim=1), rtol=1e-6, atol=0)


def test_fpgm_loop_reference():
    ps = parts()
    w = ps[0].data.double()
    ref = torch.tensor([sum(float((w[i] - w[j]).norm()) for j in range(5)) for i in range(5)], dtype=torch.float64)
    torch.testing.assert_close(CRITERIA["fpgm"](ps).double(), ref, rtol=1e-5, atol=1e-6)


def test_bn_scale_and_fallback():
    ps = parts()
    torch.testing.assert_close(CRITERIA["bn-scale"](ps), ps[1].data[:, 0].abs())
    torch.testing.assert_close(CRITERIA["bn-scale"]([ps[0]]), CRITERIA["l1"]([ps[0]]))


def test_data_criteria():
    acts = [Part("activation", "out", torch.tensor([[1.0, 0.0, -2.0, 3.0]]))]
    assert CRITERIA["energy"](acts).item() == (1 + 0 + 4 + 9) / 4
    assert CRITERIA["apoz"](acts).item() == 0.5
    t = [Part("taylor", "out", torch.tensor([[1.0, -4.0]]))]
    assert CRITERIA["taylor"](t).item() == 3.0


def test_keep_count_rounding():
    assert keep_count(64, 0.5) == 32
    assert keep_count(64, 0.45, round_to=8) == 32 and keep_count(64, 0.3, round_to=8) == 48
    assert keep_count(6, 0.5, round_to=8) == 6          # narrower than round_to: untouched
    assert keep_count(10, 0.99) == 1 and keep_count(10, 0.99, min_channels=3) == 3


def test_layer_and_global_plans():
    s = [torch.tensor([4.0, 1.0, 3.0, 2.0]), torch.tensor([10.0, 10.0, 0.1, 10.0])]
    assert [p.tolist() for p in layer_plan(s, [0.5, 0.25])] == [[1, 3], [2]]
    # global: normalized by the group mean, the weakest 2 of 8 overall go
    g = global_plan(s, 0.25, [None, None])
    assert sum(p.numel() for p in g) == 2 and 2 in g[1].tolist()
    # a fixed (override) ratio is kept; the cap limits a group's loss
    g = global_plan(s, 0.9, [0.0, None], max_ratio=0.5)
    assert g[0].numel() == 0 and g[1].numel() == 2
