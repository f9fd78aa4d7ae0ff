"""``rtn`` and ``weight-only`` are one step (nnsqueeze.steps.rtn): one run loop, and the weight-only
record written before the merge still rebuilds the same layers."""

from __future__ import annotations

import torch
from torch import nn

from nnsqueeze.context import Context
from nnsqueeze.ops.rtn import QuantGrid, quantize_groups
from nnsqueeze.quant.weight_only import WeightOnlyLinear
from nnsqueeze.registry import STEPS


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(80, 24), nn.ReLU(), nn.Linear(24, 5)).eval()


def test_weight_only_is_the_rtn_step():
    rtn, wo = STEPS.get("rtn"), STEPS.get("weight-only")
    assert issubclass(wo, rtn) and wo.run is rtn.run
    assert (rtn.registered_name, wo.registered_name) == ("rtn", "weight-only")


def test_weight_only_codes_are_the_rtn_grid_and_its_record_rebuilds():
    model = _mlp()
    ref = [m.weight.detach().clone() for m in model if isinstance(m, nn.Linear)]
    ctx = Context()
    ctx.report.begin_step("weight-only", {})
    step = STEPS.get("weight-only")(STEPS.get("weight-only").Config(bits=4, group_size=16, symmetric=False), 0)
    step.run(model, ctx)
    layers = [m for m in model if isinstance(m, nn.Linear)]
    for w, m in zip(ref, layers):
        grid = QuantGrid(4, 16, False, unsigned=True, empty_scale=1.0)
        s, z = grid.qparams(w)
        assert torch.equal(m.weight_scale_, s) and torch.equal(m.weight_zero_point_, z.to(torch.uint8))
        assert torch.equal(m.weight_codes(), quantize_groups(w, s, z, 16, 0, 15).to(torch.uint8))
    # the record format of the former steps/weight_only.py, replayed on a fresh float model
    record = {"layers": {"0": {"bits": 4, "group_size": 16, "symmetric": False},
                         "2": {"bits": 4, "group_size": 16, "symmetric": False}}, "embeddings": []}
    assert step.record() == record
    fresh = _mlp()
    STEPS.get("weight-only").rebuild(fresh, step.config, record)
    assert all(type(fresh[i]) is WeightOnlyLinear for i in (0, 2))
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(3, 80)
    assert torch.equal(fresh(x), model(x))
