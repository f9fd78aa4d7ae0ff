"""Step ``lowrank``: SVD / Tucker-2 replacement, budgets, skips, save/load and ONNX parity."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

import nnsqueeze as nsq
from nnsqueeze.context import Context
from nnsqueeze.report import ReportBuilder
from nnsqueeze.steps.lowrank import LowRank, LowRankConfig
from nnsqueeze.steps.prune import Prune, PruneConfig


def make_ctx() -> Context:
    ctx = Context(report=ReportBuilder(), progress=False)
    ctx.report.begin_step("lowrank", {})
    return ctx


def test_exact_on_low_rank_weights():
    # a rank-5 Linear and a Tucker-rank (4, 3) conv: energy 1.0 finds those ranks and is exact
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv1d(6, 8, 3, padding=1), nn.Flatten(), nn.Linear(80, 40))
    with torch.no_grad():
        model[2].weight.copy_(torch.randn(40, 5, generator=g) @ torch.randn(5, 80, generator=g))
        core = torch.randn(4, 3, 3, generator=g)
        model[0].weight.copy_(torch.einsum("or,rsk,si->oik", torch.randn(8, 4, generator=g), core,
                                           torch.randn(3, 6, generator=g)))
    x = torch.randn(4, 6, 10, generator=g)
    with torch.no_grad():
        y = model(x)
    ctx = make_ctx()
    model = LowRank(LowRankConfig(energy=1.0), 0).run(model, ctx)
    assert ctx.report.layers["2"]["ranks"] == [5] and ctx.report.layers["0"]["ranks"] == [4, 3]
    with torch.no_grad():
        assert torch.allclose(model(x), y, atol=1e-4)


def test_budget_halves_parameters_and_skips_what_does_not_pay(tiny_cnn):
    ctx = make_ctx()
    before = {n: tiny_cnn.get_submodule(n).weight.numel() for n in ["features.3", "classifier.1"]}
    model = LowRank(LowRankConfig(budget=0.5), 0).run(tiny_cnn, ctx)
    fig = ctx.report.steps[-1]["figures"]
    assert fig["params_after"] <= 0.5 * fig["params_before"]
    for n, b in before.items():
        assert sum(p.numel() for p in model.get_submodule(n).parameters() if p.dim() > 1) <= 0.5 * b
    skipped = {s["layer"] if isinstance(s, dict) else s[1] for s in ctx.report.build()["skipped"]}
    assert "features.0" in str(skipped)  # Conv1d(1, 7, 3): 21 weights, nothing to save


def test_pruned_layers_are_skipped(tiny_cnn):
    pctx = make_ctx()
    Prune(PruneConfig(sparsity=0.5, targets=["classifier.1"]), 0).run(tiny_cnn, pctx)
    ctx = make_ctx()
    LowRank(LowRankConfig(rank=2), 1).run(tiny_cnn, ctx)
    assert isinstance(tiny_cnn.classifier[1], nn.Linear)
    assert "weight_mask" in str(ctx.report.build()["skipped"])


def test_config_one_rule():
    assert LowRankConfig().energy == 0.9
    with pytest.raises(ValidationError, match="one of"):
        LowRankConfig(rank=2, budget=0.5)


def test_pipeline_save_load_and_onnx(tiny_cnn, toy_data, tmp_path):
    recipe = {"steps": [{"lowrank": {"budget": 0.5}}, {"finetune": {"steps": 5, "lr": 1e-3}}],
              "evaluate": {"runs": 1, "warmup": 0}}
    res = nsq.compress(tiny_cnn, recipe, train_data=toy_data["train"], calib_data=toy_data["calib"],
                       eval_data=toy_data["eval"], progress=False)
    exp = res.report["export"]["compressed"]
    assert exp["max_abs_diff"] <= exp["tolerance"]  # ONNX Runtime runs the factorized model
    res.save(tmp_path / "out")
    loaded = nsq.load(tmp_path / "out", model=type(tiny_cnn)())
    x = torch.cat([b[0] for b in toy_data["eval"]])
    with torch.no_grad():
        assert torch.equal(loaded(x), res.model.eval()(x))
