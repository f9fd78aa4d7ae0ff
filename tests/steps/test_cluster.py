"""Step ``cluster``: exact k shared values through fine-tuning, per-cluster centroid gradients,
entropy-coded artifact decoded bit-exactly by nsq.load, ONNX export parity."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import nnsqueeze as nsq
from nnsqueeze.artifact import pack_state
from nnsqueeze.context import Context
from nnsqueeze.errors import ModelError
from nnsqueeze.report import ReportBuilder
from nnsqueeze.steps.cluster import Cluster, ClusterConfig, clustered_layers
from nnsqueeze.steps.finetune import Finetune, FinetuneConfig
from nnsqueeze.steps.prune import Prune, PruneConfig

LAYERS = ["features.0", "features.3", "classifier.1", "classifier.3"]


def make_ctx(name="cluster", **kw) -> Context:
    ctx = Context(report=ReportBuilder(), progress=False, **kw)
    ctx.report.begin_step(name, {})
    return ctx


def nonzero_values(m: nn.Module) -> torch.Tensor:
    w = m.weight.detach()
    return w[w != 0].unique()


def test_exact_k_values_after_finetuning(tiny_cnn, toy_data):
    ctx = make_ctx(train_data=toy_data["train"])
    model = Prune(PruneConfig(sparsity=0.5), 0).run(tiny_cnn, ctx)
    zeros_before = {n: (model.get_submodule(n).weight == 0).clone() for n in LAYERS}
    model = Cluster(ClusterConfig(bits=2, conv_bits=3), 1).run(model, ctx)
    assert [n for n, _ in clustered_layers(model)] == LAYERS
    ctx.report.begin_step("finetune", {})
    before = {n: m.centroids.detach().clone() for n, m in clustered_layers(model)}
    model = Finetune(FinetuneConfig(steps=8, lr=1e-2), 2).run(model, ctx)
    for name, m in clustered_layers(model):
        k = 8 if isinstance(m, nn.Conv1d) else 4
        assert m.centroids.numel() == k
        assert nonzero_values(m).numel() == k, name      # exactly k shared values
        assert torch.equal(m.weight == 0, zeros_before[name])  # pruned zeros stay zero
        assert not torch.equal(m.centroids, before[name])    # the centroids trained
        assert not hasattr(m, "weight_mask") and m.weight_code.dtype == torch.int16


def test_centroid_gradient_is_the_sum_over_its_cluster():
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    dense = copy.deepcopy(lin)
    Cluster(ClusterConfig(bits=2), 0).run(nn.Sequential(lin), make_ctx())
    with torch.no_grad():
        dense.weight.copy_(lin.weight)
    x = torch.randn(7, 6)
    lin(x).square().sum().backward()
    dense(x).square().sum().backward()
    codes = lin.weight_code.long()
    expected = torch.zeros(5).index_add_(0, codes.flatten(), dense.weight.grad.flatten())[1:]
    assert torch.allclose(lin.centroids.grad, expected, atol=1e-5)


def test_report_bytes_and_skips(tiny_cnn):
    ctx = make_ctx()
    model = Cluster(ClusterConfig(bits=4, targets=["Linear"]), 0).run(tiny_cnn, ctx)
    fig = ctx.report.steps[-1]["figures"]
    assert fig["fp32_bytes"] == 4 * sum(model.get_submodule(n).weight.numel() for n in LAYERS[2:])
    assert fig["stored_bytes"] == sum(m.stored_bytes() for _, m in clustered_layers(model))
    assert ctx.report.layers["classifier.1"]["clusters"] == 16
    ctx.report.begin_step("cluster", {})
    Cluster(ClusterConfig(bits=2, targets=["classifier.1", "Conv1d"]), 1).run(model, ctx)
    assert any("already clustered" in str(s) for s in ctx.report.build()["skipped"])


def test_packed_state_is_compact_and_decodes_bit_exactly(tiny_cnn):
    fresh = copy.deepcopy(tiny_cnn)
    model = Prune(PruneConfig(sparsity=0.8), 0).run(tiny_cnn, make_ctx())
    model = Cluster(ClusterConfig(bits=3), 1).run(model, make_ctx())
    sd = pack_state(model)
    assert "classifier.1.weight_code" not in sd and sd["classifier.1.weight_code.dc"].dtype == torch.uint8
    m = model.classifier[1]
    assert sd["classifier.1.weight_code.dc"].numel() < m.weight.numel() / 4  # < 2 bits per weight
    fresh = Cluster.rebuild(fresh, ClusterConfig(bits=3),
                            {"layers": {n: 8 for n in LAYERS}})
    fresh.get_submodule("classifier.1").unpack_state(sd, "classifier.1.")
    assert torch.equal(sd["classifier.1.weight_code"], m.weight_code)


def test_rebuild_unknown_layer():
    with pytest.raises(ModelError, match="layer not found"):
        Cluster.rebuild(nn.Sequential(nn.Linear(2, 2)), ClusterConfig(), {"layers": {"nope": 4}})


RECIPE = {"steps": [
    {"prune": {"sparsity": 0.7, "scope": "global", "schedule": "gradual"}},
    {"finetune": {"steps": 6, "lr": 1e-3}},
    {"cluster": {"bits": 3, "conv_bits": 4, "fold_bn": True}},
    {"finetune": {"steps": 6, "lr": 1e-3}},
], "evaluate": {"runs": 1, "warmup": 0}}


def test_pipeline_save_load_exact_and_onnx(tiny_cnn, toy_data, tmp_path):
    res = nsq.compress(tiny_cnn, RECIPE, train_data=toy_data["train"], calib_data=toy_data["calib"],
                       eval_data=toy_data["eval"], progress=False)
    assert isinstance(res.model.features[1], nn.Identity)  # BN folded
    exp = res.report["export"]["compressed"]
    assert exp["max_abs_diff"] <= exp["tolerance"]  # ONNX Runtime matches torch
    assert res.report["compressed"]["archive_bytes"] < res.report["baseline"]["archive_bytes"] / 4
    res.save(tmp_path / "out")
    loaded = nsq.load(tmp_path / "out", model=type(tiny_cnn)())
    for (n, a), (_, b) in zip(clustered_layers(res.model), clustered_layers(loaded)):
        assert torch.equal(a.weight_code, b.weight_code) and torch.equal(a.centroids, b.centroids), n
    x = torch.cat([b[0] for b in toy_data["eval"]])
    with torch.no_grad():
        assert torch.equal(loaded(x), res.model.eval()(x))


def test_preset_resolves():
    r = nsq.load_recipe("deep-compression")
    assert [s.name for s in r.steps] == ["prune", "distill", "cluster", "distill"]


def test_tied_weights_are_skipped():
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    ctx = make_ctx()
    model = Cluster(ClusterConfig(bits=1), 0).run(nn.Sequential(a, b), ctx)
    # both users are skipped: clustering one would untie them (the other would keep the fp32 tensor)
    assert type(model[0]) is nn.Linear and type(model[1]) is nn.Linear and model[0].weight is model[1].weight
    skipped = str(ctx.report.build()["skipped"])
    assert "shares its weight with 0" in skipped and "shares its weight with 1" in skipped
