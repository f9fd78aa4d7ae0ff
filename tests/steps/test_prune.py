"""Step ``prune``: exact sparsity, masks as bool buffers, gradual cubic schedule, record/rebuild."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from nnsqueeze.context import Context
from nnsqueeze.errors import ModelError, TargetError
from nnsqueeze.report import ReportBuilder
from nnsqueeze.steps.prune import GradualPruning, Prune, PruneConfig

LAYERS = ["features.0", "features.3", "classifier.1", "classifier.3"]  # the Conv1d/Linear of TinyCNN


def make_ctx(**kw) -> Context:
    ctx = Context(report=ReportBuilder(), progress=False, **kw)
    ctx.report.begin_step("prune", {})
    return ctx


def run(model, ctx=None, **cfg):
    ctx = ctx or make_ctx()
    step = Prune(PruneConfig(**cfg), 0)
    return step.run(model, ctx), step, ctx


def ref_pruned(w: torch.Tensor, k: int) -> torch.Tensor:
    """Independent reference: positions of the k smallest |w| (stable sort), as a bool 'pruned' mask."""
    out = torch.zeros(w.numel(), dtype=torch.bool)
    out[torch.sort(w.abs().flatten(), stable=True).indices[:k]] = True
    return out.view(w.shape)


@pytest.mark.parametrize("sparsity", [0.3, 0.6, 0.95])
def test_oneshot_layer_scope_exact_per_layer(tiny_cnn, sparsity):
    before = copy.deepcopy(tiny_cnn.state_dict())
    model, step, ctx = run(tiny_cnn, sparsity=sparsity)
    assert step.layers_ == LAYERS
    for name in LAYERS:
        m = model.get_submodule(name)
        w0 = before[f"{name}.weight"]
        k = round(sparsity * w0.numel())
        assert m.weight_mask.dtype == torch.bool and m.weight_mask.shape == w0.shape
        assert torch.equal(~m.weight_mask, ref_pruned(w0, k))
        assert int((m.weight == 0).sum()) == k  # real zeros in the weight
        assert torch.equal(m.weight[m.weight_mask], w0[m.weight_mask])  # survivors untouched
        assert torch.equal(m.bias, before[f"{name}.bias"])  # biases never pruned
        assert ctx.report.layers[name]["sparsity"] == pytest.approx(k / w0.numel(), abs=1e-6)
    bn = model.features[1]
    assert not hasattr(bn, "weight_mask") and torch.equal(bn.weight, before["features.1.weight"])
    figs = ctx.report.steps[-1]["figures"]
    assert figs["target_sparsity"] == sparsity and figs["layers"] == 4
    total = sum(before[f"{n}.weight"].numel() for n in LAYERS)
    zeros = sum(round(sparsity * before[f"{n}.weight"].numel()) for n in LAYERS)
    assert figs["sparsity"] == pytest.approx(zeros / total, abs=1e-6)


def test_oneshot_global_scope_exact_and_one_threshold(tiny_cnn):
    before = copy.deepcopy(tiny_cnn.state_dict())
    model, _, ctx = run(tiny_cnn, sparsity=0.7, scope="global")
    ws = [before[f"{n}.weight"] for n in LAYERS]
    total = sum(w.numel() for w in ws)
    masks = [model.get_submodule(n).weight_mask for n in LAYERS]
    assert sum(int((~m).sum()) for m in masks) == round(0.7 * total)
    # Reference: rank all magnitudes together.
    ref = ref_pruned(torch.cat([w.flatten() for w in ws]), round(0.7 * total))
    assert torch.equal(torch.cat([(~m).flatten() for m in masks]), ref)
    pruned = torch.cat([w.abs()[~m] for w, m in zip(ws, masks)])
    kept = torch.cat([w.abs()[m] for w, m in zip(ws, masks)])
    assert pruned.max() <= kept.min()
    per = [ctx.report.layers[n]["sparsity"] for n in LAYERS]
    assert len(set(per)) > 1  # global: layers differ
    assert ctx.report.steps[-1]["figures"]["sparsity"] == pytest.approx(round(0.7 * total) / total, abs=1e-6)


def test_default_targets_include_conv2d_and_ignore_is_reported():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4 * 4, 7), nn.Linear(7, 3))
    ctx = make_ctx()
    model, step, _ = run(model, ctx, sparsity=0.5, ignore=["4"])
    assert step.layers_ == ["0", "3"]
    assert int((~model[0].weight_mask).sum()) == round(0.5 * 135)
    assert not hasattr(model[4], "weight_mask")
    assert ctx.report.skipped == [{"step": "prune", "layer": "4", "reason": "ignored by recipe"}]
    with pytest.raises(TargetError, match="Conv1d"):  # user-given targets stay strict
        run(model, sparsity=0.5, targets=["Conv1d"])


def test_prune_again_never_revives_and_nonfinite_weights_fail(tiny_cnn):
    model, _, _ = run(tiny_cnn, sparsity=0.6)
    first = {n: model.get_submodule(n).weight_mask.clone() for n in LAYERS}
    model, _, _ = run(model, sparsity=0.3)  # lower target: nothing comes back
    for n in LAYERS:
        assert torch.equal(model.get_submodule(n).weight_mask, first[n])
    model, _, _ = run(model, sparsity=0.8)
    for n in LAYERS:
        m = model.get_submodule(n).weight_mask
        assert not (m & ~first[n]).any() and int((~m).sum()) == round(0.8 * m.numel())
    with torch.no_grad():
        model.classifier[3].weight[0, 0] = float("nan")
    with pytest.raises(ModelError, match=r"classifier\.3\.weight"):
        run(model, sparsity=0.5)


def test_record_rebuild_load_state_dict_restores_masks(tiny_cnn):
    model, step, _ = run(tiny_cnn, sparsity=0.6, scope="global")
    rec = step.record()
    assert rec["layers"] == LAYERS
    import json
    json.dumps(rec)  # JSON-able
    torch.manual_seed(123)
    fresh = type(tiny_cnn)()
    fresh = Prune.rebuild(fresh, PruneConfig(sparsity=0.6), rec)
    for n in LAYERS:
        m = fresh.get_submodule(n).weight_mask
        assert m.dtype == torch.bool and not m.any()  # zero-filled until loaded
    fresh.load_state_dict(model.state_dict(), strict=True)
    for n in LAYERS:
        assert torch.equal(fresh.get_submodule(n).weight_mask, model.get_submodule(n).weight_mask)
        assert torch.equal(fresh.get_submodule(n).weight, model.get_submodule(n).weight)
    with pytest.raises(ModelError, match="nope"):
        Prune.rebuild(type(tiny_cnn)(), PruneConfig(sparsity=0.6), {"layers": ["nope"]})


def drive(cb: GradualPruning, model: nn.Module, total: int, after=None):
    """A stand-in training loop: the calls finetune makes, without the training."""
    cb.on_train_begin(model, total)
    for step in range(total):
        cb.on_step_end(model, step, total)
        if after:
            after(step)
    cb.on_train_end(model)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_gradual_follows_cubic_curve_and_ends_exact(tiny_cnn, scope):
    total, s_f, s_i = 50, 0.75, 0.1
    ctx = make_ctx()
    model, step, _ = run(tiny_cnn, ctx, sparsity=s_f, initial_sparsity=s_i, scope=scope, schedule="gradual",
                         begin=0.1, end=0.7, frequency=3)
    assert step.requires_training and not Prune.trains and Prune.registered_name == "prune"
    (cb,) = ctx.callbacks
    assert all(model.get_submodule(n).weight_mask.all() for n in LAYERS)  # nothing pruned before training
    t0, t_end, dt = 5, 35, 3  # round(0.1 * 50), round(0.7 * 50)
    numels = [model.get_submodule(n).weight.numel() for n in LAYERS]
    seen, prev = [], {n: model.get_submodule(n).weight_mask.clone() for n in LAYERS}

    def expected(t):  # Zhu & Gupta at the last update point <= t
        if t < t0:
            return s_i
        if t >= t_end:
            return s_f
        tq = t0 + (t - t0) // dt * dt
        # round: at tq = t0 the float form gives 0.0999..98 for s_i = 0.1, and round(s * 55) would flip
        return round(s_f + (s_i - s_f) * (1 - (tq - t0) / (t_end - t0)) ** 3, 12)

    def check(step):
        s = expected(step + 1)
        zeros = [int((~model.get_submodule(n).weight_mask).sum()) for n in LAYERS]
        if scope == "layer":
            assert zeros == [round(s * k) for k in numels]
        else:
            assert sum(zeros) == round(s * sum(numels))
        for n in LAYERS:  # masks only shrink, weights are zero where masked
            m = model.get_submodule(n)
            assert not (m.weight_mask & ~prev[n]).any() and (m.weight[~m.weight_mask] == 0).all()
            prev[n] = m.weight_mask.clone()
        seen.append(s)

    drive(cb, model, total, check)
    assert seen[0] == s_i and seen[-1] == s_f and 0.3 < seen[20] < 0.7  # a real ramp in between
    assert cb.done
    figs = ctx.report.steps[-1]["figures"]
    assert figs["target_sparsity"] == s_f
    assert figs["mask_updates"] == len(set(seen))
    # Done callbacks ignore later training (a second fine-tune must not re-run the schedule).
    masks = [model.get_submodule(n).weight_mask.clone() for n in LAYERS]
    drive(cb, model, 10)
    assert all(torch.equal(a, model.get_submodule(n).weight_mask) for a, n in zip(masks, LAYERS))


def test_gradual_default_frequency_and_short_training(tiny_cnn):
    ctx = make_ctx()
    model, _, _ = run(tiny_cnn, ctx, sparsity=0.5, schedule="gradual")
    cb = ctx.callbacks[0]
    cb.on_train_begin(model, 3)  # 3 steps: end = round(0.8 * 3) = 2
    cb.on_step_end(model, 0, 3)
    assert cb.frequency_ == 1
    cb.on_train_end(model)  # stopped early: the target is still applied exactly
    for n in LAYERS:
        m = model.get_submodule(n).weight_mask
        assert int((~m).sum()) == round(0.5 * m.numel())


@pytest.mark.parametrize("cfg,key", [
    ({"sparsity": 1.5}, "sparsity"),
    ({"sparsity": -0.1}, "sparsity"),
    ({"sparsity": 0.5, "scope": "net"}, "scope"),
    ({"sparsity": 0.5, "method": "random"}, "method"),
    ({"sparsity": 0.5, "schedule": "gradual", "begin": 0.5, "end": 0.4}, "end"),
    ({"sparsity": 0.5, "initial_sparsity": 0.6}, "initial_sparsity"),
    ({"sparsity": 0.5, "frequency": 0}, "frequency"),
    ({"sparsity": 0.5, "sparsty": 0.4}, "sparsty"),
    ({}, "sparsity"),
])
def test_bad_config_names_the_key(cfg, key):
    with pytest.raises(ValidationError) as e:
        PruneConfig(**cfg)
    assert key in {str(x) for err in e.value.errors() for x in err["loc"]}


def test_gradual_without_training_step_is_a_recipe_error():
    pipeline = pytest.importorskip("nnsqueeze.pipeline")
    steps = [Prune(PruneConfig(sparsity=0.5, schedule="gradual"), 0)]

    class FakeRecipe:
        class E:
            name, config = "prune", PruneConfig(sparsity=0.5, schedule="gradual")
        steps = [E]

    from nnsqueeze.errors import RecipeError
    with pytest.raises(RecipeError, match=r"steps\[0\]\.prune"):
        pipeline.make_steps(FakeRecipe)
    assert steps[0].requires_training and not Prune(PruneConfig(sparsity=0.5), 0).requires_training
