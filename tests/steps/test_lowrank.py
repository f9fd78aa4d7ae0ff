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


class _Conv2dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 12, (3, 5), stride=(2, 1), padding=(1, 2))
        self.c = nn.Conv2d(12, 6, 1)
        self.d = nn.Conv1d(6, 6, 3)
        self.head = nn.Linear(150, 4)

    def forward(self, x):
        x = torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x))))))   # (N, 6, 5, 7)
        x = self.d(x.flatten(2)[..., :35])                                    # (N, 6, 33)
        return self.head(x.flatten(1)[:, :150])


def test_spatial_energy_one_is_exact_and_skips_conv1d_and_1x1():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = _Conv2dNet().eval()
    with torch.no_grad():  # b: a kernel of spatial rank 4 (sum of 4 separable (3x1)(1x5) products)
        model.b.weight.copy_(torch.einsum("riy,orx->oiyx", torch.randn(4, 8, 3, generator=g),
                                          torch.randn(12, 4, 5, generator=g)))
    x = torch.randn(3, 3, 10, 7, generator=g)
    with torch.no_grad():
        y = model(x)
    ctx = make_ctx()
    model = LowRank(LowRankConfig(energy=1.0, conv="spatial", targets=["Conv2d", "Conv1d"]), 0).run(model, ctx)
    assert ctx.report.layers["b"]["lowrank"] == "spatial" and ctx.report.layers["b"]["ranks"] == [4]
    assert [m.kernel_size for m in model.b] == [(3, 1), (1, 5)] and model.b[0].stride == (2, 1)
    skipped = str(ctx.report.build()["skipped"])
    assert "'c'" in skipped and "'d'" in skipped and "larger than 1x1" in skipped
    assert "would not save" in skipped  # a: full-rank 3x3 kernel, rank 9 costs more than it saves
    with torch.no_grad():
        assert torch.allclose(model(x), y, atol=1e-4)


def test_spatial_budget_pipeline_onnx_and_reload(tmp_path):
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 3, 10, 7, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(3)]
    torch.manual_seed(0)
    model = _Conv2dNet()
    recipe = {"steps": [{"lowrank": {"budget": 0.5, "conv": "spatial", "targets": ["Conv2d"]}},
                        {"finetune": {"steps": 3, "lr": 1e-3}}], "evaluate": {"runs": 1, "warmup": 0}}
    res = nsq.compress(model, recipe, train_data=data, calib_data=data, eval_data=data, progress=False)
    b = res.model.b
    assert sum(m.weight.numel() for m in b) <= 0.5 * 12 * 8 * 15
    exp = res.report["export"]["compressed"]
    assert exp["max_abs_diff"] <= exp["tolerance"]  # ONNX Runtime runs the (kh x 1), (1 x kw) convs
    res.save(tmp_path / "out")
    torch.manual_seed(5)
    loaded = nsq.load(tmp_path / "out", model=_Conv2dNet())
    x = torch.cat([d[0] for d in data])
    with torch.no_grad():
        assert torch.equal(loaded(x), res.model.eval()(x))


def test_sensitivity_picks_the_smallest_budget_within_tolerance():
    import copy

    import torch.nn.functional as F

    from nnsqueeze.steps.lowrank import BUDGETS
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 24), nn.ReLU(), nn.Linear(24, 4))
    with torch.no_grad():  # layer 0 has rank 2: exact from budget 0.2 (rank 2) on
        model[0].weight.copy_(torch.randn(30, 2, generator=g) @ torch.randn(2, 20, generator=g))
        model[4].weight.mul_(20.0)  # confident outputs
    xs = [torch.randn(16, 20, generator=g) for _ in range(2)]
    with torch.no_grad():  # labels = the model's own predictions: any change of the layer raises the loss
        data = [(x, model(x).argmax(1)) for x in xs]
    tol = 1e-3

    def loss(net):
        with torch.no_grad():
            return sum(float(F.cross_entropy(net(x), y)) * len(y) for x, y in data) / 32

    base = loss(model)
    want = {}
    for name in ("0", "2"):  # reference: each budget on its own, through the budget rule
        want[name] = None
        for b in BUDGETS:
            trial = copy.deepcopy(model)
            cctx = make_ctx()
            trial = LowRank(LowRankConfig(budget=b, targets=[name]), 0).run(trial, cctx)
            if name in cctx.report.layers and loss(trial) <= base + tol:
                want[name] = b
                break
    assert want["0"] == 0.2   # rank 1 (budgets 0.1, 0.15) loses more than tol; rank 2 is exact
    ctx = Context(calib_data=data, report=ReportBuilder(), progress=False)
    ctx.report.begin_step("lowrank", {})
    out = LowRank(LowRankConfig(sensitivity=tol, targets=["0", "2"]), 0).run(copy.deepcopy(model), ctx)
    for name in ("0", "2"):
        if want[name] is None:
            assert "calibration loss" in str(ctx.report.build()["skipped"])
        else:
            assert ctx.report.layers[name]["sensitivity_budget"] == want[name]
    assert isinstance(out[0], nn.Sequential) and out[0][0].out_features == 2   # exact rank-2 factors at 0.2
    with pytest.raises(ValidationError, match="one of"):
        LowRankConfig(sensitivity=0.1, budget=0.5)
