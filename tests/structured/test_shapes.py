"""Channel counts read from shapes: reshapes that keep the channel axis, and the ones that must freeze it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nnsqueeze.context import Context
from nnsqueeze.steps.channel_prune import StructuredPrune
from nnsqueeze.structured.graph import build_graph


class Partition(nn.Module):
    """MaxViT-like window partition (channels-first -> windows, channels last); ``mode`` picks the size given
    for the channel axis: ``own`` (the tensor's shape), ``minus1``, ``const``; ``other`` reshapes another
    tensor to this one's channel count (MaxViT's attention output reshaped to its input's width)."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.a, self.up, self.b = nn.Conv2d(3, 6, 1), nn.Linear(6, 6), nn.Linear(6, 4)

    def forward(self, x):
        h = self.a(x)
        B, C, H, W = h.shape
        if self.mode == "const":
            w = h.reshape(B, 6, H // 2, 2, W // 2, 2)
        elif self.mode == "minus1":
            w = h.reshape(B, -1, H // 2, 2, W // 2, 2)
        else:
            w = h.reshape(B, C, H // 2, 2, W // 2, 2)
        w = w.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // 2) * (W // 2), 4, -1)
        if self.mode == "other":      # up's outputs reshaped with h's channel count
            return self.b(self.up(w).reshape(B, -1, 4, C))
        return self.b(w)


@pytest.mark.parametrize("mode", ["own", "minus1"])
def test_reshape_keeping_the_channel_axis_prunes_and_matches(mode):
    torch.manual_seed(0)
    g = build_graph(Partition(mode), torch.randn(2, 3, 4, 6))   # odd window counts below
    got = [(grp.size, sorted((m.module, m.role) for m in grp.members)) for grp in g.groups]
    assert got == [(6, [("a", "out"), ("b", "in")])]
    assert g.skipped == {}                 # size arithmetic (H // 2) carries no channels: nothing to report
    model, x = Partition(mode).eval(), torch.randn(3, 3, 10, 6)
    ctx = Context(example_inputs=x, progress=False)
    ctx.report.begin_step("structured-prune", {})
    step = StructuredPrune(StructuredPrune.Config(ratio=0.5))
    ref = {n: t.detach().double() for n, t in model.state_dict().items()}
    pruned = step.run(model, ctx)
    keep = torch.tensor(dict(((n, r), k) for n, r, k in step.plan_)[("a", "out")])
    h = torch.nn.functional.conv2d(x.double(), ref["a.weight"][keep], ref["a.bias"][keep])   # float64 reference
    B, C, H, W = h.shape
    w = h.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 3, 5, 1).reshape(B, -1, 4, C)
    want = w @ ref["b.weight"][:, keep].T + ref["b.bias"]
    with torch.no_grad():
        torch.testing.assert_close(pruned(x).double(), want, atol=1e-6, rtol=1e-6)


def test_constant_channel_count_freezes():
    g = build_graph(Partition("const"), torch.randn(2, 3, 4, 6))
    assert all(grp.size != 6 for grp in g.groups)
    assert any("fixed in forward()" in r for r in g.skipped.values())


def test_other_tensors_channel_count_freezes_that_tensor():
    g = build_graph(Partition("other"), torch.randn(2, 3, 4, 6))
    assert g.groups == []                  # a's channels (read) and up's (reshaped to them) are both kept
    assert any("channel count read from its shape" in r for r in g.skipped.values())
