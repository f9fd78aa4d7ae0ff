"""Equalization through ReLU6 and depthwise convs (mobile CNN blocks): quant/equalize.py.

References: the original float model run in float64 (the rescaled model must compute the same
function where the ReLU6 clip is respected) and, for the step, fp32 outputs on held-out inputs.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from nnsqueeze.context import Context
from nnsqueeze.quant.equalize import absorb_biases, equalize, find_chains
from nnsqueeze.steps.quantize import Quantize


class Block(nn.Module):
    """expand 1x1 -> ReLU6 -> depthwise 3x3 -> ReLU6 -> project 1x1 (an inverted residual, no BN),
    one ReLU6 module shared by both calls as in EfficientNet-Lite (or two ReLUs)."""

    def __init__(self, cin: int = 3, mid: int = 7, cout: int = 5, act: type = nn.ReLU6):
        super().__init__()
        self.expand = nn.Conv2d(cin, mid, 1)
        self.dw = nn.Conv2d(mid, mid, 3, padding=1, groups=mid)
        self.project = nn.Conv2d(mid, cout, 1)
        self.act = act()
        self.act2 = self.act if act is nn.ReLU6 else act()   # a shared nn.ReLU is not a pair's pass-through

    def forward(self, x):
        return self.project(self.act2(self.dw(self.act(self.expand(x)))))


def _block(seed: int = 0, balanced: bool = False, act: type = nn.ReLU6) -> Block:
    """Very unequal expand channel ranges, channel 6 large enough to clip at 6; ``balanced``: the
    depthwise weights undo them (as BatchNorm folding often leaves it), so a small expand channel
    matters as much downstream as a large one."""
    torch.manual_seed(seed)
    m = Block(act=act)
    with torch.no_grad():
        m.expand.weight.mul_(torch.logspace(-2, 0.3, 7).reshape(-1, 1, 1, 1))
        m.expand.bias.copy_(torch.linspace(-0.1, 0.2, 7).abs() * torch.logspace(-2, 0.3, 7))
        m.expand.weight[6].mul_(8.0)
        dw = torch.logspace(2, -0.3, 7) if balanced else torch.logspace(-1, 0.5, 7)
        m.dw.weight.mul_(dw.reshape(-1, 1, 1, 1))
    return m.eval()


def _ref64(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(m).double()(x.double())


def test_chains_go_through_relu6_and_depthwise():
    m = _block()
    assert find_chains(m, ["expand", "dw", "project"]) == [("expand", "dw", True), ("dw", "project", True)]


def test_pairs_across_a_relu6_are_left_alone():
    x = torch.randn(32, 3, 11, 9, generator=torch.Generator().manual_seed(1))
    for method in ("cle", "range", "smoothquant"):
        m = _block()
        before = {k: v.clone() for k, v in m.state_dict().items()}
        assert equalize(m, ["expand", "dw", "project"], method, iterations=2, data=[(x, None)]) == []
        assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_cle_through_depthwise_keeps_the_function_after_relus():
    x = torch.randn(32, 3, 11, 9, generator=torch.Generator().manual_seed(1))
    m = _block(act=nn.ReLU)
    ref = _ref64(m, x)
    out = equalize(m, ["expand", "dw", "project"], "cle", iterations=2, data=[(x, None)])
    assert [o["pair"] for o in out] == [["expand", "dw"], ["dw", "project"]]
    # the rescaled weights are stored in float32: 1e-6 of the output range
    assert float((_ref64(m, x) - ref).abs().max()) <= 1e-6 * float(ref.abs().max())
    # equal ranges (exact for the last pair of the chain): the depthwise rows vs project's input columns
    assert torch.allclose(m.dw.weight.abs().amax((1, 2, 3)), m.project.weight.abs().amax((0, 2, 3)), rtol=1e-4)


def test_range_sets_every_channel_to_the_same_maximum_after_a_relu():
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    m = _block(act=nn.ReLU)
    ref = _ref64(m, x)
    out = equalize(m, ["expand", "dw", "project"], "range", data=[(x, None)])
    assert [o["pair"] for o in out] == [["expand", "dw"]]  # range leaves non-depthwise L2s alone
    assert float((_ref64(m, x) - ref).abs().max()) <= 1e-6 * float(ref.abs().max())
    with torch.no_grad():
        z = m.expand(x).transpose(0, 1).reshape(7, -1).amax(1)
    live = z[z > 0]
    assert torch.allclose(live, torch.full_like(live, float(live.max())), rtol=1e-5)


def test_bias_absorption_skips_relu6_pairs():
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    m = _block()
    assert absorb_biases(m, [("expand", "dw"), ("dw", "project")], [(x, None)]) == []


def test_range_in_the_step_lowers_the_error_of_per_tensor_activations():
    g = torch.Generator().manual_seed(4)
    calib = [(torch.randn(32, 3, 12, 12, generator=g), None) for _ in range(2)]
    held = torch.randn(64, 3, 12, 12, generator=g)
    ref = _ref64(_block(balanced=True, act=nn.ReLU), held)
    errs = {}
    for eq in (None, {"method": "range"}):
        ctx = Context(calib_data=calib, progress=False)
        ctx.report.begin_step("quantize", {})
        cfg = {"weights": {"reduce_range": False}, "bias_correction": False, "equalize": eq}
        q = Quantize(Quantize.Config.model_validate(cfg)).run(_block(balanced=True, act=nn.ReLU), ctx).eval()
        with torch.no_grad():
            errs[eq is not None] = float(((q(held).double() - ref) ** 2).mean())
    assert errs[True] < 0.7 * errs[False], errs
