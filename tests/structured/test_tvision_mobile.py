"""torchvision's mobile CNNs (random init, 64x64 input): ratio 0.5 with l2 removes at least as many MACs as
Torch-Pruning 1.6.1's MetaPruner (final classifier ignored; its figures measured with /tmp/zs/survey.py,
2026-12-06, nnsqueeze's MAC counter on both), every group is pruned (only the classifier is skipped), and the
pruned model equals the original with the removed channels' consumer columns set to zero, exports to ONNX
Runtime and replays from its record."""

from __future__ import annotations

import copy

import pytest
import torch

from nnsqueeze.context import Context
from nnsqueeze.steps.channel_prune import StructuredPrune
from nnsqueeze.structured.macs import count
from nnsqueeze.zoo.tvision import import_torchvision
from structured_models import randomize_bn

# Torch-Pruning 1.6.1's MACs left at ratio 0.5; ShuffleNetV2: Torch-Pruning raises ZeroDivisionError, the
# bound is nnsqueeze's own figure (issue #14: 0.50-0.52 before channel shuffle was understood). Deep
# ShuffleNet stages cannot lose half their stream channels exactly: each stride-1 unit passes the first
# half of its input on, so after k units one input channel spans 2^k channels (see structured/permute.py).
TP_MACS_LEFT = {"efficientnet_b0": 0.287475, "efficientnet_v2_s": 0.254611, "mnasnet0_5": 0.327337,
                "mobilenet_v3_small": 0.329621, "regnet_y_400mf": 0.259794, "shufflenet_v2_x0_5": 0.4146}


def prune(name, x, seed=0):
    torch.manual_seed(seed)
    model = import_torchvision().models.get_model(name, weights=None).eval()
    ctx = Context(example_inputs=x, progress=False)
    ctx.report.begin_step("structured-prune", {})
    step = StructuredPrune(StructuredPrune.Config(ratio=0.5, importance="l2"))
    return model, step.run(copy.deepcopy(model), ctx), step, ctx


@pytest.mark.parametrize("name", sorted(TP_MACS_LEFT))
def test_macs_left_at_most_torch_pruning(name):
    x = torch.randn(1, 3, 64, 64)
    model, pruned, _, ctx = prune(name, x)
    left = count(pruned, x).total_macs / count(model, x).total_macs
    assert left <= TP_MACS_LEFT[name] + 1e-6
    assert [s["reason"] for s in ctx.report.skipped] == ["channels kept: reaches the model output"]


@pytest.mark.parametrize("name", ["shufflenet_v2_x0_5", "efficientnet_b0"])
def test_pruned_zoo_model_is_exact_exports_and_replays(name, tmp_path):
    from nnsqueeze.export.onnx import export_onnx
    from nnsqueeze.export.ort import OrtModule

    torch.manual_seed(1)
    x = torch.randn(2, 3, 48, 40)
    tv = import_torchvision()
    model = randomize_bn(tv.models.get_model(name, weights=None)).double()   # BN away from identity
    ctx = Context(example_inputs=x.double(), progress=False)
    ctx.report.begin_step("structured-prune", {})
    step = StructuredPrune(StructuredPrune.Config(ratio=0.5))
    pruned = step.run(copy.deepcopy(model), ctx)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for layer, role, keep in step.plan_:
            if role == "in":
                w = ref.get_submodule(layer).weight
                w[:, [i for i in range(w.shape[1]) if i not in set(keep)]] = 0
        want = ref(x.double())
        torch.testing.assert_close(pruned(x.double()), want, atol=1e-9 * float(want.abs().max()), rtol=0)
    pruned = pruned.float()
    export_onnx(pruned, tmp_path / "m.onnx", x)
    with torch.no_grad():
        out = pruned(x)
        torch.testing.assert_close(torch.as_tensor(OrtModule(tmp_path / "m.onnx")(x)), out,
                                   atol=1e-4 * float(out.abs().max()), rtol=1e-4)
        fresh = StructuredPrune.rebuild(tv.models.get_model(name, weights=None), step.config, step.record())
        fresh.load_state_dict(pruned.state_dict())
        assert torch.equal(fresh.eval()(x), out)
