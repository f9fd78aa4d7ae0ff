"""``norms: prune``: channels-last blocks (permute, LayerNorm over the last axis, layer scale), ConvNeXt-style.

The pruned model is checked against an independent float64 reference: the original weights indexed by the
kept channels, run through hand-written ops (LayerNorm over the kept channels only), on odd spatial sizes.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnsqueeze.context import Context
from nnsqueeze.errors import ModelError
from nnsqueeze.steps.channel_prune import StructuredPrune
from nnsqueeze.structured.graph import build_graph
from nnsqueeze.structured.pruners import dim_size, shrink


class LayerNorm2d(nn.LayerNorm):
    """torchvision's: a LayerNorm subclass that permutes to channels-last and calls F.layer_norm."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Block(nn.Module):
    """dwconv -> permute -> LayerNorm -> Linear 4x -> GELU -> Linear -> permute -> layer scale -> + input."""

    def __init__(self, d: int):
        super().__init__()
        self.dw = nn.Conv2d(d, d, 3, padding=1, groups=d)
        self.ln = nn.LayerNorm(d, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.layer_scale = nn.Parameter(torch.rand(d, 1, 1) + 0.5)

    def forward(self, x):
        h = self.dw(x).permute(0, 2, 3, 1)
        h = self.fc2(F.gelu(self.fc1(self.ln(h)))).permute(0, 3, 1, 2)
        return x + self.layer_scale * h


class TinyConvNeXt(nn.Module):
    def __init__(self, d: int = 8, classes: int = 5):
        super().__init__()
        self.stem, self.stem_ln = nn.Conv2d(3, d, 2, stride=2), LayerNorm2d(d)
        self.block = Block(d)
        self.head_ln, self.head = LayerNorm2d(d), nn.Linear(d, classes)

    def forward(self, x):
        h = self.block(self.stem_ln(self.stem(x)))
        return self.head(self.head_ln(F.adaptive_avg_pool2d(h, 1)).flatten(1))


def _randomize(m: nn.Module) -> nn.Module:
    torch.manual_seed(3)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.1)
    return m.eval()


def reference(m: TinyConvNeXt, x: torch.Tensor, keep: list[int], keep_hidden: list[int]) -> torch.Tensor:
    """float64, from the ORIGINAL weights: residual channels ``keep``, MLP neurons ``keep_hidden``."""
    k, kh = torch.tensor(keep), torch.tensor(keep_hidden)
    p = {n: t.detach().double() for n, t in m.state_dict().items()}
    x = x.double()

    def ln(h, w, b, eps=1e-5):   # over the last axis, kept channels only
        mu = h.mean(-1, keepdim=True)
        var = ((h - mu) ** 2).mean(-1, keepdim=True)
        return (h - mu) / torch.sqrt(var + eps) * w[k] + b[k]

    h = F.conv2d(x, p["stem.weight"][k], p["stem.bias"][k], stride=2)
    h = ln(h.permute(0, 2, 3, 1), p["stem_ln.weight"], p["stem_ln.bias"]).permute(0, 3, 1, 2)
    r = F.conv2d(h, p["block.dw.weight"][k], p["block.dw.bias"][k], padding=1, groups=len(keep))
    r = ln(r.permute(0, 2, 3, 1), p["block.ln.weight"], p["block.ln.bias"], 1e-6)
    r = F.gelu(r @ p["block.fc1.weight"][kh][:, k].T + p["block.fc1.bias"][kh])
    r = (r @ p["block.fc2.weight"][k][:, kh].T + p["block.fc2.bias"][k]).permute(0, 3, 1, 2)
    h = h + p["block.layer_scale"][k] * r
    h = ln(h.mean((2, 3)), p["head_ln.weight"], p["head_ln.bias"])
    return h @ p["head.weight"][:, k].T + p["head.bias"]


def run(model, x, **cfg):
    ctx = Context(example_inputs=x, progress=False)
    ctx.report.begin_step("structured-prune", cfg)
    step = StructuredPrune(StructuredPrune.Config(**cfg))
    return step.run(model, ctx), step, ctx


def test_graph_follows_channels_through_permute_layernorm_and_layer_scale():
    g = build_graph(TinyConvNeXt(), torch.randn(2, 3, 10, 10), norms=True)
    got = sorted((grp.size, sorted({(mb.module, mb.role) for mb in grp.members})) for grp in g.groups)
    assert got == [(8, [("block", "param:layer_scale:0"), ("block.dw", "out"), ("block.fc1", "in"),
                        ("block.fc2", "out"), ("block.ln", "out"), ("head", "in"), ("head_ln", "out"),
                        ("stem", "out"), ("stem_ln", "out")]),
                   (32, [("block.fc1", "out"), ("block.fc2", "in")])]
    assert g.skipped == {} and g.frozen == [("head", "reaches the model output")]


def test_without_norms_layernorm_keeps_its_channels():
    g = build_graph(TinyConvNeXt(), torch.randn(2, 3, 10, 10))
    assert [grp.size for grp in g.groups] == [32]           # only the MLP neurons
    assert "LayerNorm" in g.skipped["stem_ln"] and "norms: prune" in g.skipped["stem_ln"]
    assert "LayerNorm" in g.skipped["block.ln"]


@pytest.mark.parametrize("hw", [(13, 11), (9, 9)])
def test_pruned_equals_float64_reference_on_kept_channels(hw):
    torch.manual_seed(0)
    model = _randomize(TinyConvNeXt())
    orig = copy.deepcopy(model)
    x = torch.randn(3, 3, *hw)
    pruned, step, ctx = run(model, x, ratio=0.5, norms="prune")
    plan = {(n, r): k for n, r, k in step.plan_}
    keep, keep_hidden = plan[("stem", "out")], plan[("block.fc1", "out")]
    assert len(keep) == 4 and len(keep_hidden) == 16
    assert pruned.block.layer_scale.shape == (4, 1, 1) and pruned.block.ln.normalized_shape == (4,)
    assert pruned.stem_ln.normalized_shape == (4,) and pruned.head.in_features == 4
    with torch.no_grad():
        torch.testing.assert_close(pruned(x).double(), reference(orig, x, keep, keep_hidden), atol=1e-5, rtol=1e-5)
    fig = ctx.report.steps[-1]["figures"]
    assert fig["macs_after"] < fig["macs_before"] / 3


def test_export_matches_ort_and_rebuild_is_exact(tmp_path):
    from nnsqueeze.export.onnx import export_onnx
    from nnsqueeze.export.ort import OrtModule

    torch.manual_seed(1)
    model, x = _randomize(TinyConvNeXt()), torch.randn(2, 3, 14, 10)
    pruned, step, _ = run(model, x, ratio=0.5, norms="prune", importance="l1")
    export_onnx(pruned, tmp_path / "m.onnx", x)
    with torch.no_grad():
        want = pruned(x)
        torch.testing.assert_close(torch.as_tensor(OrtModule(tmp_path / "m.onnx")(x)), want, atol=1e-4, rtol=1e-4)
        torch.manual_seed(2)
        fresh = StructuredPrune.rebuild(TinyConvNeXt(), step.config, step.record())
        fresh.load_state_dict(pruned.state_dict())
        assert torch.equal(fresh.eval()(x), want)


def test_layer_norm_and_parameter_shrink_and_bad_roles():
    ln = nn.LayerNorm(5)
    with torch.no_grad():
        ln.weight.copy_(torch.arange(5.0))
    shrink(ln, "out", torch.tensor([1, 3]))
    assert ln.normalized_shape == (2,) and ln.weight.tolist() == [1.0, 3.0] and dim_size(ln, "out") == 2
    blk = Block(6)
    shrink(blk, "param:layer_scale:0", torch.tensor([0, 5]))
    assert blk.layer_scale.shape == (2, 1, 1) and dim_size(blk, "param:layer_scale:0") == 2
    with pytest.raises(ModelError, match="per-channel tensor"):
        shrink(blk, "param:missing:0", torch.tensor([0]))
    with pytest.raises(ModelError, match="per-channel tensor"):
        dim_size(blk, "param:layer_scale:7")


def test_compress_save_load_reloads_exactly(tmp_path):
    import nnsqueeze as nsq

    torch.manual_seed(4)
    model, x, y = _randomize(TinyConvNeXt()), torch.randn(4, 3, 11, 13), torch.randint(0, 5, (4,))
    recipe = {"steps": [{"structured-prune": {"ratio": 0.5, "norms": "prune"}}], "export": {"onnx": None},
              "evaluate": {"runs": 1, "warmup": 0}}
    res = nsq.compress(model, recipe, calib_data=[(x, y)], eval_data=[(x, y)], progress=False)
    assert res.model.block.ln.normalized_shape == (4,)
    res.save(tmp_path / "art")
    loaded = nsq.load(tmp_path / "art", model=TinyConvNeXt())
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), res.model.eval()(x))


def test_a_layers_own_bias_used_as_a_scale_is_not_a_separate_parameter():
    class BiasScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.b(self.a(x) * self.a.bias)   # a's bias, sliced by a's own pruner: no second member

    g = build_graph(BiasScale(), torch.randn(2, 3), norms=True)
    assert g.groups == [] and any("does not track" in r for r in g.skipped.values())
