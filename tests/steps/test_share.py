"""Step ``share``: one weight tensor for named layers, trained together, stored once, reloaded exactly."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load as st_load
from torch import nn

import nnsqueeze as nsq
from nnsqueeze.context import Context
from nnsqueeze.errors import ModelError
from nnsqueeze.report import ReportBuilder
from nnsqueeze.steps.share import Share, ShareConfig


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 7)
        self.blocks = nn.ModuleList(nn.Linear(7, 7) for _ in range(3))
        self.out = nn.Linear(7, 3)

    def forward(self, x):
        x = torch.relu(self.inp(x))
        for b in self.blocks:
            x = x + torch.tanh(b(x))
        return self.out(x)


GROUP = ["blocks.0", "blocks.1", "blocks.2"]


def _ctx():
    ctx = Context(report=ReportBuilder(), progress=False)
    ctx.report.begin_step("share", {})
    return ctx


def test_share_ties_to_the_mean():
    torch.manual_seed(0)
    net = Net()
    mean = torch.stack([net.blocks[i].weight.detach() for i in range(3)]).mean(0)
    b1 = net.blocks[1].bias.detach().clone()
    ctx = _ctx()
    Share(ShareConfig(groups=[GROUP]), 0).run(net, ctx)
    assert net.blocks[0].weight is net.blocks[1].weight is net.blocks[2].weight
    assert torch.allclose(net.blocks[2].weight, mean, atol=1e-7)
    assert torch.equal(net.blocks[1].bias, b1)  # biases stay per layer by default
    assert ctx.report.steps[-1]["figures"]["ratio"] == 3.0
    assert sum(p.numel() for p in net.parameters()) == 5 * 7 + 7 + 49 + 3 * 7 + 7 * 3 + 3


def test_share_train_save_load_stored_once(tmp_path):
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(3)]
    torch.manual_seed(0)
    recipe = {"steps": [{"share": {"groups": [GROUP], "bias": True}}, {"finetune": {"steps": 4, "lr": 1e-2}},
                        {"cluster": {"bits": 2}}],
              "export": {"onnx": None}, "evaluate": {"runs": 1, "warmup": 0}}
    res = nsq.compress(Net(), recipe, train_data=data, eval_data=data, progress=False)
    m = res.model
    assert m.blocks[0].weight is m.blocks[2].weight and m.blocks[0].bias is m.blocks[1].bias  # training kept the tie
    skipped = str(res.report["skipped"])
    assert "blocks.0" in skipped and "shares its weight with" in skipped   # cluster leaves the group alone
    res.save(tmp_path / "out")
    stored = st_load((tmp_path / "out" / "model.safetensors").read_bytes())
    assert "blocks.0.weight" in stored and "blocks.1.weight" not in stored and "blocks.2.bias" not in stored
    torch.manual_seed(7)
    loaded = nsq.load(tmp_path / "out", model=Net())
    assert loaded.blocks[1].weight is loaded.blocks[0].weight
    x = torch.cat([b[0] for b in data])
    with torch.no_grad():
        assert torch.equal(loaded(x), m.eval()(x))


def test_share_errors():
    with pytest.raises(ValidationError, match="two or more"):
        ShareConfig(groups=[["a"]])
    with pytest.raises(ValidationError, match="once"):
        ShareConfig(groups=[["a", "b"], ["b", "c"]])
    with pytest.raises(ModelError, match="differs from"):
        Share(ShareConfig(groups=[["inp", "out"]]), 0).run(Net(), _ctx())
    with pytest.raises(ModelError, match="no module named"):
        Share(ShareConfig(groups=[["blocks.0", "nope"]]), 0).run(Net(), _ctx())
