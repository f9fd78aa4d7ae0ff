"""Dependency groups found for each coupling pattern (hand-derived expectations)."""

from __future__ import annotations

import torch
from torch import nn

from nnsqueeze.structured.graph import build_graph
from nnsqueeze.zoo.mnist1d import build_model
from structured_models import (ConcatSplit, DepthwiseGrouped, InvertedResidualSE, Norms, ResidualCNN, Tied,
                               TransformerBlock)


def groups(model, x):
    g = build_graph(model, x)
    return {grp.size: sorted({(m.module, m.role, m.offset, m.expand) for m in grp.members}) for grp in g.groups}, g


def members(model, x):
    g = build_graph(model, x)
    return sorted((grp.size, sorted({(m.module, m.role, m.offset, m.expand) for m in grp.members}))
                  for grp in g.groups), g


def test_demo_cnn_flatten_into_linear():
    g = build_graph(build_model(), torch.randn(2, 1, 40))
    gs = [sorted({(m.module, m.role, m.offset, m.expand) for m in grp.members}) for grp in g.groups]
    assert gs[0] == [("features.0", "out", 0, 1), ("features.1", "out", 0, 1), ("features.3", "in", 0, 1)]
    assert gs[2] == [("classifier.0", "in", 0, 10), ("features.6", "out", 0, 1), ("features.7", "out", 0, 1)]
    assert gs[3] == [("classifier.0", "out", 0, 1), ("classifier.2", "in", 0, 1)]
    assert sorted(grp.size for grp in g.groups) == [32, 64, 128, 128]
    assert g.frozen == [("classifier.2", "reaches the model output")]


def test_residual_adds_tie_the_stream():
    gs, g = groups(ResidualCNN(), torch.randn(2, 3, 8, 8))
    assert gs[16] == [("b1.0", "in", 0, 1), ("b1.3", "out", 0, 1), ("b1.4", "out", 0, 1), ("b2.0", "in", 0, 1),
                      ("down.0", "in", 0, 1), ("stem.0", "out", 0, 1), ("stem.1", "out", 0, 1)]
    assert gs[32] == [("b2.3", "out", 0, 1), ("b2.4", "out", 0, 1), ("down.0", "out", 0, 1),
                      ("down.1", "out", 0, 1), ("fc", "in", 0, 1)]
    assert set(gs) == {16, 12, 24, 32}


def test_concat_offsets_and_chunk():
    gs, g = members(ConcatSplit(), torch.randn(2, 2, 9))
    assert (6, [("a", "out", 0, 1), ("bn", "out", 0, 1), ("head", "in", 4, 1), ("mix", "in", 0, 1)]) in gs
    assert (10, [("b", "out", 0, 1), ("bn", "out", 6, 1), ("head", "in", 10, 1), ("mix", "in", 6, 1)]) in gs
    # chunk(2) of conv `c` (GLU): channel j of the first half goes with channel j of the second half
    assert (6, [("c", "out", 0, 1), ("c", "out", 6, 1), ("d", "in", 0, 1)]) in gs
    assert sorted(size for size, _ in gs) == [4, 6, 6, 8, 10] and g.skipped == {}


def test_split_with_fixed_sizes_is_left_alone():
    class Split(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 8), nn.Linear(5, 2)

        def forward(self, x):
            p, q = torch.split(self.a(x), [5, 3], dim=-1)
            return self.b(p) + q.sum(-1, keepdim=True)

    g = build_graph(Split(), torch.randn(2, 3))
    assert g.groups == [] and "sizes are fixed" in g.skipped["split"]


def test_depthwise_passes_through_grouped_conv_folds_its_groups():
    gs, g = members(DepthwiseGrouped(), torch.randn(2, 3, 6, 6))
    # grouped conv (12 -> 12, groups=3): channel c of pw2 goes with c+4 and c+8 (the weight's shared input
    # column c); its own output channel c goes with c+4, c+8 (every group keeps the same count)
    assert gs == [(4, [("fc", "in", 0, 1), ("fc", "in", 4, 1), ("fc", "in", 8, 1), ("grouped", "out", 0, 1),
                       ("grouped", "out", 4, 1), ("grouped", "out", 8, 1)]),
                  (4, [("grouped", "in", 0, 1), ("pw2", "out", 0, 1), ("pw2", "out", 4, 1), ("pw2", "out", 8, 1)]),
                  (16, [("bn1", "out", 0, 1), ("bn2", "out", 0, 1), ("dw", "out", 0, 1), ("pw1", "out", 0, 1),
                        ("pw2", "in", 0, 1)])]
    assert g.skipped == {}


def test_groupnorm_blocks_layernorm_freezes():
    gs, g = members(Norms(), torch.randn(2, 1, 10))
    # GroupNorm(2, 8): a channel of the group is one norm group of 4 (the other group's statistics stay)
    assert gs == [(2, [("c1", "out", 0, 4), ("c2", "in", 0, 4), ("gn", "out", 0, 4)]),
                  (12, [("bn", "out", 0, 1), ("c2", "out", 0, 1), ("fc1", "in", 0, 10)])]
    assert set(g.skipped) == {"ln"} and "LayerNorm" in g.skipped["ln"]


def test_transformer_ffn_neurons_only():
    gs, g = groups(TransformerBlock(), torch.randint(0, 30, (2, 5)))
    assert gs == {40: [("down", "in", 0, 1), ("up", "out", 0, 1)]}
    assert "attention" in g.skipped["attn"]


def test_tied_weights_freeze():
    gs, g = groups(Tied(), torch.randint(0, 20, (2, 5)))
    assert gs == {24: [("back", "in", 0, 1), ("mid", "out", 0, 1)]}
    assert any("shares a weight" in r for _, r in g.frozen)


def test_unknown_op_freezes_with_reason():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.b(torch.cumsum(self.a(x), -1))

    g = build_graph(Odd(), torch.randn(2, 4))
    assert g.groups == [] and any("not understood" in r for r in g.skipped.values())


def test_untraceable_model_is_a_model_error():
    import pytest

    from nnsqueeze.errors import ModelError

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x):
            return self.a(x) if x.sum() > 0 else x

    with pytest.raises(ModelError, match="torch.fx cannot trace"):
        build_graph(Branchy(), torch.randn(2, 4))


def test_untracked_operand_and_shared_module_pin_channels():
    class Pinned(nn.Module):
        def __init__(self, twice: bool):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2)
            self.scale = nn.Parameter(torch.ones(6))
            self.twice = twice

        def forward(self, x):
            h = self.b(torch.relu(self.a(x)))
            if self.twice:
                return self.c(self.b(torch.relu(h)))          # `b` called twice
            return self.c(h * self.scale)                     # a plain parameter on b's channels

    g = build_graph(Pinned(True), torch.randn(2, 4))
    assert g.groups == [] and "called 2 times" in g.skipped["b"]
    g = build_graph(Pinned(False), torch.randn(2, 4))
    assert [sorted({m.module for m in grp.members}) for grp in g.groups] == [["a", "b"]]
    assert any("does not track" in r for r in g.skipped.values())


def test_squeeze_excite_gate_joins_the_expanded_channels():
    gs, g = groups(InvertedResidualSE(), torch.randn(2, 3, 6, 6))
    mods = {size: sorted({(m, r) for m, r, _, _ in mem}) for size, mem in gs.items()}
    assert ("se2", "out") in mods[24] and ("se1", "in") in mods[24] and ("dw.0", "out") in mods[24]
    assert ("se_conv", "in") in mods[24] and ("se_conv", "out") in mods[24]
    assert mods[6] == [("se1", "out"), ("se2", "in")] and g.skipped == {}
