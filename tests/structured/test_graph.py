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


def test_concat_offsets_and_splits():
    gs, g = groups(ConcatSplit(), torch.randn(2, 2, 9))
    assert gs[6] == [("a", "out", 0, 1), ("bn", "out", 0, 1), ("head", "in", 4, 1), ("mix", "in", 0, 1)]
    assert gs[10] == [("b", "out", 0, 1), ("bn", "out", 6, 1), ("head", "in", 10, 1), ("mix", "in", 6, 1)]
    assert 12 not in gs  # chunk of conv `c`: split sizes are fixed in forward(), left intact
    assert "split" in g.skipped["chunk"]


def test_depthwise_passes_through_grouped_is_left_alone():
    gs, g = groups(DepthwiseGrouped(), torch.randn(2, 3, 6, 6))
    assert gs == {16: [("bn1", "out", 0, 1), ("bn2", "out", 0, 1), ("dw", "out", 0, 1), ("pw1", "out", 0, 1),
                       ("pw2", "in", 0, 1)]}
    assert "groups=3" in g.skipped["grouped"]


def test_norms_across_channels_freeze():
    gs, g = groups(Norms(), torch.randn(2, 1, 10))
    assert gs == {12: [("bn", "out", 0, 1), ("c2", "out", 0, 1), ("fc1", "in", 0, 10)]}
    assert {"gn", "ln"} <= set(g.skipped)


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
