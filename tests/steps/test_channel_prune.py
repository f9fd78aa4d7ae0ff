"""Step ``structured-prune``: exact equivalence with zeroed channels, budgets, recipes, reload, ONNX."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

import nnsqueeze as nsq
from nnsqueeze.context import Context
from nnsqueeze.errors import DataError, TargetError
from nnsqueeze.steps.channel_prune import StructuredPrune
from nnsqueeze.structured.macs import count
from nnsqueeze.zoo.mnist1d import build_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "structured"))
from structured_models import (ConcatSplit, DepthwiseGrouped, InvertedResidualSE, Norms,  # noqa: E402
                               ResidualCNN, ResNeXtGN, Tied, TransformerBlock, randomize_bn)

CASES = {
    "demo": (build_model, lambda: torch.randn(4, 1, 40)),
    "residual": (ResidualCNN, lambda: torch.randn(4, 3, 8, 8)),
    "concat": (ConcatSplit, lambda: torch.randn(4, 2, 9)),
    "depthwise": (DepthwiseGrouped, lambda: torch.randn(4, 3, 6, 6)),
    "norms": (Norms, lambda: torch.randn(4, 1, 10)),
    "transformer": (TransformerBlock, lambda: torch.randint(0, 30, (4, 5))),
    "tied": (Tied, lambda: torch.randint(0, 20, (4, 5))),
    "inverted-residual-se": (InvertedResidualSE, lambda: torch.randn(4, 3, 6, 6)),
    "resnext-gn": (ResNeXtGN, lambda: torch.randn(4, 3, 6, 6)),
}


def run_step(model, x, ctx=None, **cfg):
    ctx = ctx or Context(example_inputs=x, progress=False)
    ctx.report.begin_step("structured-prune", cfg)
    step = StructuredPrune(StructuredPrune.Config(**cfg))
    return step.run(model, ctx), step, ctx


def zeroed_reference(model, plan, heads=None):
    """The original model with every pruned channel's consumer columns (and removed heads) set to zero."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, keep in (heads or {}).items():
            mha = ref.get_submodule(name)
            for h in range(mha.num_heads):
                if h not in keep:
                    mha.out_proj.weight[:, h * mha.head_dim:(h + 1) * mha.head_dim] = 0
        for name, role, keep in plan:
            if role == "in":
                w = ref.get_submodule(name).weight
                drop = [i for i in range(w.shape[1]) if i not in set(keep)]
                w[:, drop] = 0
    return ref


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("importance", ["l1", "l2", "fpgm", "bn-scale"])
def test_pruned_equals_original_with_channels_zeroed(case, importance):
    build, make_x = CASES[case]
    torch.manual_seed(0)
    model, x = randomize_bn(build()), make_x()
    orig = copy.deepcopy(model)
    pruned, step, ctx = run_step(model, x, ratio=0.5, importance=importance)
    assert step.plan_, "something must be pruned"
    ref = zeroed_reference(orig, step.plan_, step.heads_)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), ref(x), atol=1e-5, rtol=0)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in orig.parameters())
    fig = ctx.report.steps[-1]["figures"]
    assert fig["macs_after"] <= fig["macs_before"] and fig["params_after"] < fig["params_before"]


def test_demo_cnn_halves_every_width_and_reports_layers():
    model, x = build_model().eval(), torch.randn(2, 1, 40)
    pruned, step, ctx = run_step(model, x, ratio=0.5)
    f = pruned.features
    assert (f[0].out_channels, f[1].num_features, f[3].out_channels, f[6].out_channels) == (16, 16, 32, 64)
    assert pruned.classifier[0].in_features == 640 and pruned.classifier[0].out_features == 64
    assert pruned.classifier[2].out_features == 10
    lay = ctx.report.layers["features.3"]
    assert lay["macs_before"] == 20 * 64 * 32 * 3 and lay["macs_after"] == 20 * 32 * 16 * 3
    assert ctx.report.skipped == [{"step": "structured-prune", "layer": "classifier.2",
                                   "reason": "channels kept: reaches the model output"}] or \
        any(s["layer"] == "classifier.2" for s in ctx.report.skipped)


def test_left_alone_layers_are_reported_and_intact():
    model, x = TransformerBlock().eval(), torch.randint(0, 30, (2, 5))
    attn_before = copy.deepcopy(model.attn.state_dict())
    pruned, _, ctx = run_step(model, x, ratio=0.5, head_ratio=0.0)
    reasons = {s["layer"]: s["reason"] for s in ctx.report.skipped}
    assert "embed_dim channels are kept" in reasons["attn"] and "LayerNorm" in reasons["ln1"]
    assert pruned.up.out_features == 20 and pruned.down.in_features == 20
    for k, v in pruned.attn.state_dict().items():
        assert torch.equal(v, attn_before[k])


def test_round_to_and_overrides_and_ignore():
    model, x = build_model().eval(), torch.randn(2, 1, 40)
    pruned, _, _ = run_step(model, x, ratio=0.4, round_to=8, overrides={"features.0": 0.0},
                            ignore=["classifier.0"])
    f = pruned.features
    assert f[0].out_channels == 32                              # override: keep all
    assert f[3].out_channels % 8 == 0 and f[3].out_channels == 40
    assert f[6].out_channels % 8 == 0
    assert pruned.classifier[0].out_features == 128            # ignored -> its group is kept


@pytest.mark.parametrize("key,value", [("macs", 0.3), ("params", 0.4), ("params", 50_000)])
def test_budgets_are_met(key, value):
    model, x = build_model().eval(), torch.randn(2, 1, 40)
    before = count(model, x)
    pruned, _, ctx = run_step(model, x, **{key: value})
    after = count(pruned, x)
    got, base = (after.total_macs, before.total_macs) if key == "macs" else (after.total_params, before.total_params)
    budget = value if value > 1 else value * base
    assert got <= budget and got >= 0.8 * budget  # close to the budget, not far under it


def test_global_scope_prunes_requested_fraction():
    model, x = ResidualCNN().eval(), torch.randn(2, 3, 8, 8)
    _, step, ctx = run_step(model, x, ratio=0.5, scope="global")
    fig = ctx.report.steps[-1]["figures"]
    assert abs(fig["channels_removed"] / fig["channels"] - 0.5) < 0.08


def test_data_criteria(toy_data, tiny_cnn):
    x = toy_data["calib"][0][0]
    for imp in ("taylor", "apoz", "energy"):
        ctx = Context(example_inputs=x, train_data=toy_data["train"], calib_data=toy_data["calib"], progress=False)
        m = copy.deepcopy(tiny_cnn)
        pruned, step, _ = run_step(m, x, ctx=ctx, ratio=0.5, importance=imp)
        ref = zeroed_reference(tiny_cnn, step.plan_)
        with torch.no_grad():
            torch.testing.assert_close(pruned(x), ref(x), atol=1e-5, rtol=0)
    with pytest.raises(DataError, match="training data"):
        run_step(copy.deepcopy(tiny_cnn), x, ratio=0.5, importance="taylor")


def test_config_and_target_errors():
    with pytest.raises(ValidationError, match="exactly one of"):
        StructuredPrune.Config(ratio=0.5, macs=0.5)
    with pytest.raises(ValidationError, match="exactly one of"):
        StructuredPrune.Config()
    with pytest.raises(ValidationError):
        StructuredPrune.Config(ratio=0.5, bogus=1)
    with pytest.raises(TargetError):
        run_step(build_model(), torch.randn(2, 1, 40), ratio=0.5, targets=["nope"])
    with pytest.raises(DataError, match="example inputs"):
        StructuredPrune(StructuredPrune.Config(ratio=0.5)).run(build_model(), Context(progress=False))


def test_recipe_iterative_save_load_and_onnx(tmp_path, toy_data, tiny_cnn):
    recipe = [{"structured-prune": {"ratio": 0.3, "importance": "l1"}}, {"finetune": {"steps": 3, "lr": 1e-3}},
              {"structured-prune": {"macs": 0.5, "importance": "fpgm"}}, {"finetune": {"steps": 3, "lr": 1e-3}}]
    res = nsq.compress(tiny_cnn, recipe, train_data=toy_data["train"], calib_data=toy_data["calib"],
                       eval_data=toy_data["eval"])
    m = res.model.eval()
    assert m.features[3].out_channels < 13
    res.save(tmp_path / "art")
    fresh = __import__("tiny_cnn").TinyCNN()
    loaded = nsq.load(tmp_path / "art", model=fresh)
    x = toy_data["eval"][0][0]
    with torch.no_grad():
        assert torch.equal(loaded(x), m(x))
    from nnsqueeze.export.ort import OrtModule
    ort = OrtModule(tmp_path / "art" / "model.onnx")
    torch.testing.assert_close(torch.as_tensor(ort(x)), m(x), atol=1e-4, rtol=1e-4)
    assert res.report["compressed"]["params"] < res.report["baseline"]["params"]


def test_preset_resolves():
    from nnsqueeze.recipe import load_recipe

    r = load_recipe("channels-50")
    assert [s.name for s in r.steps] == ["structured-prune", "finetune"] * 2
    assert r.steps[0].config.round_to == 8


def test_attention_heads_removed_exported_and_reloaded(tmp_path):
    torch.manual_seed(0)
    model, x = TransformerBlock().eval(), torch.randint(0, 30, (4, 5))
    orig = copy.deepcopy(model)
    pruned, step, ctx = run_step(model, x, ratio=0.25, head_ratio=0.5, importance="l2")
    assert type(pruned.attn).__name__ == "PrunedMultiheadAttention" and pruned.attn.num_heads == 2
    assert pruned.up.out_features == 30 and ctx.report.layers["attn"] == {**ctx.report.layers["attn"],
                                                                          "heads_before": 4, "heads_after": 2}
    ref = zeroed_reference(orig, step.plan_, step.heads_)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), ref(x), atol=1e-5, rtol=0)
    # record -> rebuild on a fresh model, then the weights: identical outputs
    fresh = StructuredPrune.rebuild(TransformerBlock(), step.config, step.record())
    fresh.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), pruned(x))
    from nnsqueeze.export.onnx import export_onnx
    export_onnx(pruned, tmp_path / "t.onnx", x, samples=[torch.randint(0, 30, (3, 5))])  # verifies in ORT
    # prune heads again on the already-pruned layer
    again, step2, _ = run_step(pruned, x, ratio=0.0, head_ratio=0.5)
    assert again.attn.num_heads == 1


def test_unreachable_budget_is_noted():
    model, x = build_model().eval(), torch.randn(2, 1, 40)
    _, _, ctx = run_step(model, x, params=100)
    assert any("out of reach" in n["note"] for n in ctx.report.notes)



@pytest.mark.parametrize("case", sorted(CASES))
def test_every_pattern_exports_to_ort_and_replays(case, tmp_path):
    from nnsqueeze.export.onnx import export_onnx
    from nnsqueeze.export.ort import OrtModule

    build, make_x = CASES[case]
    torch.manual_seed(1)
    model, x = randomize_bn(build()), make_x()
    pruned, step, _ = run_step(model, x, ratio=0.5, importance="l2")
    export_onnx(pruned, tmp_path / "m.onnx", x)
    with torch.no_grad():
        want = pruned(x)
        torch.testing.assert_close(torch.as_tensor(OrtModule(tmp_path / "m.onnx")(x)), want, atol=1e-4, rtol=1e-4)
        torch.manual_seed(2)  # a fresh model with other weights: the record fixes shapes, the state dict values
        fresh = StructuredPrune.rebuild(build(), step.config, step.record())
        fresh.load_state_dict(pruned.state_dict())
        assert torch.equal(fresh.eval()(x), want)


def test_resnext_grouped_conv_and_groupnorm_shrink_evenly():
    torch.manual_seed(0)
    model, x = randomize_bn(ResNeXtGN()), torch.randn(2, 3, 6, 6)
    pruned, step, ctx = run_step(model, x, ratio=0.5)
    assert (pruned.grouped.in_channels, pruned.grouped.out_channels, pruned.grouped.groups) == (12, 12, 4)
    assert pruned.grouped.weight.shape == (12, 3, 3, 3) and pruned.reduce.out_channels == 12
    assert (pruned.gn0.num_groups, pruned.gn0.num_channels, pruned.stem.out_channels) == (2, 8, 8)
    assert pruned.gn3.num_channels == pruned.expand.out_channels == pruned.fc.in_features == 8
