"""Hidden-size pruning of torchvision's Swin (V1 and V2), one residual stream per stage.

The reference is a float64 forward written out below, on the original weights sliced by hand to the kept
channels of each stage, except the window attention itself: it runs through the *original* torchvision
layer in float64 on the kept channels put back in place between zeros, its output read at the kept ones
(exact: the removed input columns then multiply zeros, and the removed output rows are not read; removed
heads, when heads are pruned too, have their ``proj`` input columns zeroed, as in test_window_attention).
LayerNorms (also the V1 patch merging's norm over the 4 concatenated neighbours) normalize over the kept
channels, which zeroing channels could not reproduce. The pruned model must equal the reference within 1e-5.
Sizes are odd: stage widths 15 and 30 (3 heads of 5, 5 heads of 6), windows of 3 on a 6x6 then 3x3 map.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import nnsqueeze as nsq
from nnsqueeze.context import Context
from nnsqueeze.steps.channel_prune import StructuredPrune
from nnsqueeze.structured.window_attention import PrunedWindowAttention
from nnsqueeze.zoo.tvision import import_torchvision

swin = import_torchvision().models.swin_transformer
TOL = {"atol": 1e-5, "rtol": 1e-5}


def model(v2: bool):
    torch.manual_seed(0)
    extra = {"block": swin.SwinTransformerBlockV2, "downsample_layer": swin.PatchMergingV2} if v2 else {}
    m = swin.SwinTransformer(patch_size=[4, 4], embed_dim=15, depths=[2, 2], num_heads=[3, 5], window_size=[3, 3],
                             mlp_ratio=2.0, num_classes=5, **extra).eval()
    with torch.no_grad():   # norms start at ones and zeros, Linear biases at zero: spread them
        for n, p in m.named_parameters():
            if "norm" in n and n.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif n.endswith("bias") or "norm" in n:
                p.normal_(0, 0.3)
    return m


def images(seed=1, b=2):
    return torch.randn(b, 3, 24, 24, generator=torch.Generator().manual_seed(seed))


def run_step(m, x, **cfg):
    ctx = Context(example_inputs=x, progress=False)
    ctx.report.begin_step("structured-prune", cfg)
    step = StructuredPrune(StructuredPrune.Config(**cfg))
    return step.run(m, ctx), step, ctx


def layer_norm(x, norm, k):
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight[k] + norm.bias[k]


def attend(attn, x, k, width, heads):
    """The original window attention (float64) on the kept channels ``k`` of a ``width`` stream."""
    a = copy.deepcopy(attn)
    if heads is not None:   # removed heads: their proj input columns zeroed
        d = width // a.num_heads
        gone = [h for h in range(a.num_heads) if h not in heads]
        with torch.no_grad():
            for h in gone:
                a.proj.weight[:, h * d:(h + 1) * d] = 0
    full = x.new_zeros(*x.shape[:-1], width)
    full[..., k] = x
    return a(full)[..., k]


def mlp(m, x, k, neurons):
    h = F.gelu(F.linear(x, m[0].weight[neurons][:, k], m[0].bias[neurons]))
    return F.linear(h, m[3].weight[k][:, neurons], m[3].bias[k])


def merge(x):
    x = F.pad(x, (0, 0, 0, x.shape[-2] % 2, 0, x.shape[-3] % 2))
    return torch.cat([x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]], -1)


def swin_ref(m, x, keeps, v2, heads=None, neurons=None):
    """SwinTransformer.forward in float64 (``m`` already float64), stage ``i`` keeping channels ``keeps[i]``."""
    f, heads, neurons = m.features, heads or {}, neurons or {}
    k = torch.tensor(keeps[0])
    y = F.conv2d(x.double(), f[0][0].weight[k], f[0][0].bias[k], stride=4).permute(0, 2, 3, 1)
    y = layer_norm(y, f[0][2], k)
    for i in range(2):
        k, width = torch.tensor(keeps[i]), 15 * 2 ** i
        for j, blk in enumerate(f[2 * i + 1]):
            name = f"features.{2 * i + 1}.{j}"
            hk = heads.get(f"{name}.attn")
            nk = torch.tensor(neurons.get(f"{name}.mlp.0", list(range(2 * width))))
            if v2:
                y = y + layer_norm(attend(blk.attn, y, k, width, hk), blk.norm1, k)
                y = y + layer_norm(mlp(blk.mlp, y, k, nk), blk.norm2, k)
            else:
                y = y + attend(blk.attn, layer_norm(y, blk.norm1, k), k, width, hk)
                y = y + mlp(blk.mlp, layer_norm(y, blk.norm2, k), k, nk)
        if i == 0:
            pm, nxt = f[2], torch.tensor(keeps[1])
            wide = (k[:, None] + width * torch.arange(4)).flatten().sort().values   # concatenation order
            y = merge(y)
            if v2:
                y = layer_norm(F.linear(y, pm.reduction.weight[nxt][:, wide]), pm.norm, nxt)
            else:
                y = F.linear(layer_norm(y, pm.norm, wide), pm.reduction.weight[nxt][:, wide])
    k = torch.tensor(keeps[1])
    y = layer_norm(y, m.norm, k).mean((1, 2))
    return F.linear(y, m.head.weight[:, k], m.head.bias)


def keeps_of(step):
    return [next(kp for n, r, kp in step.plan_ if (n, r) == (f"features.{s}.0.mlp.3", "out")) for s in (1, 3)]


@pytest.mark.parametrize("heads", [False, True])
@pytest.mark.parametrize("v2", [False, True])
def test_swin_hidden_per_stage_equals_float64_reference(v2, heads):
    m, x = model(v2), images()
    orig = copy.deepcopy(m).double()
    with torch.no_grad():   # the reference itself first: it reproduces the unpruned torchvision model
        torch.testing.assert_close(m(x).double(), swin_ref(orig, x, [list(range(15)), list(range(30))], v2), **TOL)
    extra = {"ratio": 0.4} if heads else {}
    pruned, step, ctx = run_step(m, x, hidden=0.3, **extra)
    keeps = keeps_of(step)
    assert [len(k) for k in keeps] == [11, 21]          # 15 - round(4.5), 30 - 9
    assert [s.width for s in step._streams] == [15, 30]
    fig = ctx.report.steps[-1]["figures"]
    assert fig["hidden_widths"] == [[15, 11], [30, 21]]
    for s, (stage, width, d) in enumerate([(1, 11, 5), (3, 21, 6)]):
        for blk in pruned.features[stage]:
            assert isinstance(blk.attn, PrunedWindowAttention) and blk.attn.head_dim == d
            assert blk.attn.qkv.in_features == blk.attn.proj.out_features == blk.mlp[0].in_features == width
            assert blk.norm1.normalized_shape == blk.norm2.normalized_shape == (width,)
            assert blk.attn.num_heads == ((2, 3)[s] if heads else (3, 5)[s])
    pm = pruned.features[2]
    assert pm.reduction.in_features == 44 and pm.reduction.out_features == 21
    assert pm.norm.normalized_shape == ((21,) if v2 else (44,))
    assert pruned.norm.normalized_shape == (21,) and pruned.head.in_features == 21
    neurons = {n: kp for n, r, kp in step.plan_ if r == "out" and n.endswith("mlp.0")}
    with torch.no_grad():
        ref = swin_ref(orig, x, keeps, v2, step.heads_, neurons)
        torch.testing.assert_close(pruned(x).double(), ref, **TOL)


@pytest.mark.parametrize("v2", [False, True])
def test_swin_hidden_fraction_per_stage(v2):
    # one fraction per stage: 15 - 3 and 30 - 15 channels kept; the same float64 reference as above
    m, x = model(v2), images()
    orig = copy.deepcopy(m).double()
    pruned, step, ctx = run_step(m, x, hidden=[0.2, 0.5], ratio=0.4)
    keeps = keeps_of(step)
    assert [len(k) for k in keeps] == [12, 15]
    assert ctx.report.steps[-1]["figures"]["hidden_widths"] == [[15, 12], [30, 15]]
    assert pruned.features[2].reduction.in_features == 48 and pruned.head.in_features == 15
    neurons = {n: kp for n, r, kp in step.plan_ if r == "out" and n.endswith("mlp.0")}
    with torch.no_grad():
        torch.testing.assert_close(pruned(x).double(), swin_ref(orig, x, keeps, v2, step.heads_, neurons), **TOL)
    # a zero keeps that stage whole
    pruned, _, ctx = run_step(model(v2), x, hidden=[0.0, 0.5])
    assert ctx.report.steps[-1]["figures"]["hidden_widths"] == [[15, 15], [30, 15]]
    assert pruned.features[1][0].norm1.normalized_shape == (15,) and pruned.head.in_features == 15


def test_swin_hidden_list_must_name_every_stage():
    with pytest.raises(nsq.RecipeError, match=r"3 fractions for this model's 2 residual stream\(s\), of widths "
                       r"\[15, 30\]"):
        run_step(model(False), images(), hidden=[0.2, 0.2, 0.2])
    for bad in ([], [0.2, 1.0], [-0.1, 0.2]):
        with pytest.raises(ValueError, match="hidden"):
            StructuredPrune.Config(hidden=bad)


@pytest.mark.parametrize("v2", [False, True])
def test_swin_hidden_onnx_runtime_and_reload_are_exact(v2, tmp_path):
    from nnsqueeze.export.ort import OrtModule

    data = [images(seed=s) for s in range(2)]
    recipe = {"version": 1, "steps": [{"structured-prune": {"hidden": 0.3, "ratio": 0.4}}],
              "evaluate": {"runs": 2, "warmup": 1}}
    res = nsq.compress(model(v2), recipe, calib_data=data, metric=None, progress=False)
    res.save(tmp_path / "art")
    loaded = nsq.load(tmp_path / "art", model=model(v2)).eval()
    assert loaded.features[3][1].attn.qkv.in_features == 21 and loaded.head.in_features == 21
    x = data[1]
    with torch.no_grad():
        want = res.model.eval()(x)
        assert torch.equal(loaded(x), want)
        got = torch.as_tensor(OrtModule(tmp_path / "art" / "model.onnx")(x))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["swin_t", "swin_v2_t"])
def test_torchvision_swin_hidden_heads_and_mlp_export_and_rebuild(name, tmp_path):
    from nnsqueeze.export.onnx import export_onnx
    from nnsqueeze.structured.macs import count

    def build():
        torch.manual_seed(0)
        return import_torchvision().models.get_model(name, weights=None).eval()

    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    m = build()
    before = count(m, x).total_macs
    pruned, step, ctx = run_step(m, x, hidden=0.25, ratio=0.5, norms="prune")
    assert ctx.report.steps[-1]["figures"]["hidden_widths"] == [[96, 72], [192, 144], [384, 288], [768, 576]]
    left = [s["layer"] for s in ctx.report.skipped]     # the head's output (classes); V2's cpb_mlp (its views)
    assert "head" in left and all(n == "head" or "cpb_mlp" in n or n.startswith("view") for n in left)
    assert count(pruned, x).total_macs / before <= 0.38          # measured 0.3779 (swin_t), 0.3785 (swin_v2_t)
    export_onnx(pruned, tmp_path / "m.onnx", x)          # verifies ONNX Runtime against torch
    fresh = StructuredPrune.rebuild(build(), step.config, step.record())
    fresh.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), pruned(x))
