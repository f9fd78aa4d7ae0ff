"""The quantize step with low-bit / per-group / non-uniform weights, AdaRound, CLE and SmoothQuant."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from nnsqueeze.context import Context
from nnsqueeze.ops.equalize import in_channel_absmax, out_channel_absmax
from nnsqueeze.quant.equalize import equalize, find_pairs
from nnsqueeze.quant.fold import fold_batchnorm
from nnsqueeze.steps.quantize import Quantize


def run(model, data, **cfg):
    cfg.setdefault("weights", {}).setdefault("reduce_range", False)
    ctx = Context(calib_data=data, progress=False)
    ctx.report.begin_step("quantize", {})
    step = Quantize(Quantize.Config.model_validate(cfg))
    return step.run(model, ctx), step, ctx


def reload(fresh, model, step):
    """Pack, rebuild on a fresh model, unpack, load: what the artifact writer/loader do."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for name, mod in model.named_modules():
        if hasattr(mod, "pack_state"):
            mod.pack_state(sd, f"{name}.")
    rebuilt = Quantize.rebuild(fresh, step.config, json.loads(json.dumps(step.record())))
    for name, mod in rebuilt.named_modules():
        if hasattr(mod, "unpack_state"):
            mod.unpack_state(sd, f"{name}.")
    rebuilt.load_state_dict(sd, strict=True)
    return rebuilt.eval()


@pytest.mark.parametrize("weights", [
    {"bits": 4, "adaround": {"iters": 40, "samples": 64, "batch": 32}},
    {"bits": 3, "granularity": "per-group", "group_size": 3, "symmetric": False},
    {"bits": 4, "levels": "kmeans"},
    {"bits": 4, "clip": "mse", "granularity": "per-tensor"},
])
def test_schemes_run_report_and_reload(tiny_cnn, toy_data, weights):
    fresh = copy.deepcopy(tiny_cnn)
    model, step, ctx = run(tiny_cnn, toy_data["calib"], weights=weights)
    figs = ctx.report.steps[0]["figures"]
    assert figs["quantized_layers"] == 4 and figs["weight_bits"] == weights["bits"]
    layer = ctx.report.layers["features.3"]
    assert layer["scheme"].startswith(f"w{weights['bits']}")
    x = toy_data["eval"][0][0]
    with torch.no_grad():
        assert torch.equal(reload(fresh, model, step)(x), model(x))
    if "adaround" in weights:
        for name in ("features.0", "features.3", "classifier.1", "classifier.3"):
            m = model.get_submodule(name)
            # learned codes: the weight sits exactly on its grid, nearest rounding reproduces it
            assert torch.equal(m.fake_quant_weight().detach(), m.weight.detach())
            st = ctx.report.layers[name]["adaround"]
            assert st["mse"] <= st["mse_nearest"]


def test_layer_weights_override_and_unknown_names(tiny_cnn, toy_data):
    fresh = copy.deepcopy(tiny_cnn)
    model, step, ctx = run(tiny_cnn, toy_data["calib"], weights={"bits": 4},
                           layer_weights={"classifier.3": {"bits": 8, "reduce_range": False}})
    assert model.classifier[3].weight_bits == 8 and model.features[0].weight_bits == 4
    assert ctx.report.steps[0]["figures"]["weight_bits"] == [4, 8]
    from nnsqueeze.errors import RecipeError
    with pytest.raises(RecipeError, match="not quantized layers"):
        run(fresh, toy_data["calib"], layer_weights={"nope": {"bits": 8}})


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv1d(3, 9, 3, padding=1), nn.Conv1d(9, 11, 3), nn.Conv1d(11, 5, 1)
        self.f1, self.f2 = nn.Linear(5 * 7, 13), nn.Linear(13, 4)

    def forward(self, x):
        x = nn.functional.relu(self.c1(x))
        x = self.c3(torch.relu(self.c2(x)))
        return self.f2(torch.relu(self.f1(x.flatten(1))))


def _chain():
    torch.manual_seed(1)
    m = Chain()
    with torch.no_grad():  # very unequal channel ranges, as after BN folding
        m.c1.weight.mul_(torch.logspace(-2, 1, 9).reshape(-1, 1, 1))
        m.c1.bias.mul_(torch.logspace(-2, 1, 9))
    return m.eval()


@pytest.mark.parametrize("method", ["cle", "smoothquant"])
def test_equalization_preserves_fp32_outputs(method):
    m = _chain()
    x = torch.randn(16, 3, 9)
    with torch.no_grad():
        ref = m(x)
    names = ["c1", "c2", "c3", "f1", "f2"]
    # c3 -> flatten -> f1 is not a pair (the Linear reads the flattened axis, not the channels)
    assert find_pairs(m, names) == [("c1", "c2"), ("c2", "c3"), ("f1", "f2")]
    out = equalize(m, names, method, iterations=3, data=[(x, None)])
    assert len(out) == 3
    with torch.no_grad():
        got = m(x)
    assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    if method == "cle":  # ranges equalized: r1 == r2 per channel (exact for the last pair of each chain)
        assert torch.allclose(out_channel_absmax(m.c2.weight), in_channel_absmax(m.c3.weight), rtol=1e-4)
        assert torch.allclose(out_channel_absmax(m.f1.weight), in_channel_absmax(m.f2.weight), rtol=1e-4)


def test_cle_in_the_step_helps_per_tensor_weights():
    torch.manual_seed(0)
    x = torch.randn(64, 3, 9)
    calib = [(x[:32], None), (x[32:], None)]
    ref_model = _chain()
    with torch.no_grad():
        ref = ref_model(x)
    errs = {}
    for eq in (None, {"method": "cle"}):
        model, _, ctx = run(_chain(), calib, equalize=eq, weights={"bits": 4, "granularity": "per-tensor"})
        with torch.no_grad():
            errs[eq is not None] = float(((model(x) - ref) ** 2).mean())
    assert errs[True] < 0.5 * errs[False]
    assert [p["pair"] for p in ctx.report.steps[0]["figures"]["equalized_pairs"]] == \
        [["c1", "c2"], ["c2", "c3"], ["f1", "f2"]]


def test_bn_folded_model_pairs():
    # after folding, features.0 -> (Identity) -> ReLU -> features.3 is a pair
    from tiny_cnn import TinyCNN
    m = TinyCNN().eval()
    fold_batchnorm(m)
    assert ("features.0", "features.3") in find_pairs(m, ["features.0", "features.3", "classifier.1", "classifier.3"])


def test_bias_absorption_keeps_outputs_where_exact_and_shrinks_ranges():
    from nnsqueeze.quant.equalize import absorb_biases

    torch.manual_seed(2)
    m = _chain()
    with torch.no_grad():
        m.f1.bias.add_(3.0)                      # pre-activations mostly positive: something to absorb
    x = torch.randn(256, 3, 9)
    with torch.no_grad():
        ref = m(x)
        z_before = m.f1(m.c3(torch.relu(m.c2(nn.functional.relu(m.c1(x))))).flatten(1))  # f1 pre-activation
    b1 = m.f1.bias.detach().clone()
    m2 = copy.deepcopy(m)
    with torch.no_grad():
        m2.c1.padding = (1,)
    # a padded L2 is skipped (its padding would see -c); c2 pads nothing, c1 -> c2 is absorbed
    assert [o["pair"] for o in absorb_biases(m2, [("c1", "c2"), ("f1", "f2")], [(x, None)])][-1] == ["f1", "f2"]
    out = absorb_biases(m, [("f1", "f2")], [(x, None)])
    assert [o["pair"] for o in out] == [["f1", "f2"]]
    c = b1 - m.f1.bias.detach()
    assert bool((c >= 0).all()) and float(c.max()) > 0
    # exact for every sample whose pre-activations are all >= c (the vast majority)
    keep = (z_before >= c).all(1)
    assert int(keep.sum()) >= 200
    with torch.no_grad():
        got = m(x)
    assert float((got[keep] - ref[keep]).abs().max()) <= 1e-5 * float(ref.abs().max())
    # the ReLU output that f2's input quantizer sees is smaller
    assert float(torch.relu(z_before - c).amax()) < float(torch.relu(z_before).amax())


def test_bias_absorption_option_in_the_step(tiny_cnn, toy_data):
    model, _, ctx = run(tiny_cnn, toy_data["calib"], equalize={"method": "cle", "bias_absorption": True})
    pairs = ctx.report.steps[0]["figures"]["equalized_pairs"]
    assert all("bias_absorbed" in p for p in pairs)
