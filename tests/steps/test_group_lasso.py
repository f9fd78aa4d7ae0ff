"""Step ``group-lasso``: proximal group shrinkage zeroes whole channel groups; pruning them is free."""

from __future__ import annotations

import copy

import torch

import nnsqueeze as nsq
from nnsqueeze.context import Context
from nnsqueeze.steps.channel_prune import StructuredPrune
from nnsqueeze.steps.group_lasso import GroupLassoCallback
from nnsqueeze.structured.graph import build_graph


def test_proximal_operator_matches_closed_form(tiny_cnn):
    x = torch.randn(2, 1, 37)
    g = build_graph(tiny_cnn, x).groups[0]  # features.0 out + BN + features.3 in
    m = copy.deepcopy(tiny_cnn)
    w0, bn0, w3 = m.features[0].weight.detach().clone(), m.features[1].weight.detach().clone(), \
        m.features[3].weight.detach().clone()
    norms = (w0.pow(2).flatten(1).sum(1) + m.features[0].bias.detach().pow(2) + bn0.pow(2)
             + m.features[1].bias.detach().pow(2) + w3.pow(2).sum((0, 2))).sqrt()
    lam = float(norms.median())
    GroupLassoCallback([g], lam, {}).on_step_end(m, 0, 1)
    f = (1 - lam / norms).clamp_min(0)
    torch.testing.assert_close(m.features[0].weight, w0 * f[:, None, None])
    torch.testing.assert_close(m.features[1].weight, bn0 * f)
    torch.testing.assert_close(m.features[3].weight, w3 * f[None, :, None])
    assert int((f == 0).sum()) >= 3


def test_recipe_zeroes_channels_then_pruning_them_changes_nothing(tiny_cnn, toy_data):
    res = nsq.compress(tiny_cnn, [{"group-lasso": {"strength": 0.5}}, {"finetune": {"steps": 4, "lr": 1e-3}}],
                       train_data=toy_data["train"], calib_data=toy_data["calib"], eval_data=toy_data["eval"])
    zero = res.report["steps"][0]["figures"]["zero_channels"]
    assert zero > 0
    model = res.model.eval()
    x = toy_data["eval"][0][0]
    with torch.no_grad():
        before = model(x)
    g = build_graph(model, x).groups
    ratio = 0.999 * zero / sum(grp.size for grp in g)
    ctx = Context(example_inputs=x, progress=False)
    ctx.report.begin_step("structured-prune", {})
    pruned = StructuredPrune(StructuredPrune.Config(ratio=ratio, scope="global", importance="l2")).run(model, ctx)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), before, atol=1e-5, rtol=0)
