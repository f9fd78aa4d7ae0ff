"""Step ``nm-prune``: 2:4 pattern per layer, skips with reasons, kept through fine-tuning, reloads."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

import nnsqueeze as nsq
from torch import nn
from nnsqueeze.context import Context
from nnsqueeze.steps.nm_prune import NMPrune


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(37, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 5))


def test_pattern_and_skips(tiny_cnn):
    ctx = Context(progress=False)
    ctx.report.begin_step("nm-prune", {})
    m = NMPrune(NMPrune.Config(n=2, m=4)).run(mlp(), ctx)
    skipped = {s["layer"]: s["reason"] for s in ctx.report.skipped}
    assert "multiple of 4" in skipped["1"]          # reduction 37
    assert ctx.report.steps[-1]["figures"]["sparsity"] == 0.5
    for name in ("3", "5"):
        mod = m.get_submodule(name)
        groups = mod.weight_mask.reshape(mod.weight.shape[0], -1, 4)
        assert bool((groups.sum(-1) == 2).all()) and bool((mod.weight[~mod.weight_mask] == 0).all())
    with pytest.raises(ValidationError, match="smaller than m"):
        NMPrune.Config(n=4, m=4)


def test_recipe_finetune_keeps_pattern_and_reload(tmp_path, toy_data):
    res = nsq.compress(mlp(), [{"structured-prune": {"ratio": 0.3, "round_to": 4}}, {"nm-prune": {"ignore": ["1"]}},
                                  {"finetune": {"steps": 3, "lr": 1e-2}}],
                       train_data=toy_data["train"], calib_data=toy_data["calib"], eval_data=toy_data["eval"])
    lin = res.model[3]
    assert lin.weight.shape == (8, 12)  # 16 -> 12 (round_to 4); 8 stays (6 rounds to 8)
    assert bool((lin.weight_mask.reshape(lin.weight.shape[0], -1, 4).sum(-1) == 2).all())
    assert bool((lin.weight[~lin.weight_mask] == 0).all())
    res.save(tmp_path / "a")
    loaded = nsq.load(tmp_path / "a", model=mlp())
    x = toy_data["eval"][0][0]
    with torch.no_grad():
        assert torch.equal(loaded(x), res.model.eval()(x))
