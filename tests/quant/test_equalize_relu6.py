"""Equalization through ReLU6 and depthwise convs (mobile CNN blocks): quant/equalize.py.

References: the original float model run in float64 (the rescaled model must compute the same
function where the ReLU6 clip is respected) and, for the step, fp32 outputs on held-out inputs.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from nnsqueeze.context import Context
from nnsqueeze.quant.equalize import CLIP_HEADROOM, absorb_biases, equalize, find_chains
from nnsqueeze.steps.quantize import Quantize


class Block(nn.Module):
    """expand 1x1 -> ReLU6 -> depthwise 3x3 -> ReLU6 -> project 1x1 (an inverted residual, no BN),
    one ReLU6 module shared by both calls as in EfficientNet-Lite."""

    def __init__(self, cin: int = 3, mid: int = 7, cout: int = 5):
        super().__init__()
        self.expand = nn.Conv2d(cin, mid, 1)
        self.dw = nn.Conv2d(mid, mid, 3, padding=1, groups=mid)
        self.project = nn.Conv2d(mid, cout, 1)
        self.act = nn.ReLU6()

    def forward(self, x):
        return self.project(self.act(self.dw(self.act(self.expand(x)))))


def _block(seed: int = 0, balanced: bool = False) -> Block:
    """Very unequal expand channel ranges, channel 6 large enough to clip at 6; ``balanced``: the
    depthwise weights undo them (as BatchNorm folding often leaves it), so a small expand channel
    matters as much downstream as a large one."""
    torch.manual_seed(seed)
    m = Block()
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


def test_cle_and_range_keep_the_function_with_a_clipping_channel():
    x = torch.randn(32, 3, 11, 9, generator=torch.Generator().manual_seed(1))
    for method in ("cle", "range"):
        m = _block()
        ref = _ref64(m, x)
        with torch.no_grad():
            z = m.expand(x)
        assert float(z[:, 6].max()) > 6 and float(z[:, :6].max()) < 6 * CLIP_HEADROOM  # the case under test
        out = equalize(m, ["expand", "dw", "project"], method, iterations=2, data=[(x[:16], None), (x[16:], None)])
        assert out and all(o.get("clipped") for o in out)
        got = _ref64(m, x)
        # the rescaled weights are stored in float32: 1e-6 of the output range (a clip ignored would be O(1))
        assert float((got - ref).abs().max()) <= 1e-6 * float(ref.abs().max()), method
        with torch.no_grad():
            z2 = m.expand(x)
        # the clipping channel is untouched; the others stay under the headroom on this data
        assert torch.allclose(z2[:, 6], z[:, 6], rtol=1e-6, atol=1e-6)
        assert float(z2[:, :6].max()) <= 6 * CLIP_HEADROOM * (1 + 1e-6)


def test_range_sets_every_free_channel_to_the_same_maximum():
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    m = _block()
    out = equalize(m, ["expand", "dw", "project"], "range", data=[(x, None)])
    assert [o["pair"] for o in out] == [["expand", "dw"]]  # range leaves non-depthwise L2s alone
    with torch.no_grad():
        z = m.expand(x).transpose(0, 1).reshape(7, -1).amax(1)
    free = z[:6][z[:6] > 0]
    assert torch.allclose(free, torch.full_like(free, 6 * CLIP_HEADROOM), rtol=1e-5)


def test_bias_absorption_skips_relu6_pairs():
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    m = _block()
    assert absorb_biases(m, [("expand", "dw"), ("dw", "project")], [(x, None)]) == []


def test_range_in_the_step_lowers_the_error_of_per_tensor_activations():
    g = torch.Generator().manual_seed(4)
    calib = [(torch.randn(32, 3, 12, 12, generator=g), None) for _ in range(2)]
    held = torch.randn(64, 3, 12, 12, generator=g)
    ref = _ref64(_block(balanced=True), held)
    errs = {}
    for eq in (None, {"method": "range"}):
        ctx = Context(calib_data=calib, progress=False)
        ctx.report.begin_step("quantize", {})
        cfg = {"weights": {"reduce_range": False}, "bias_correction": False, "equalize": eq}
        q = Quantize(Quantize.Config.model_validate(cfg)).run(_block(balanced=True), ctx).eval()
        with torch.no_grad():
            errs[eq is not None] = float(((q(held).double() - ref) ** 2).mean())
    assert errs[True] < 0.7 * errs[False], errs
