"""Hidden-size (residual stream) pruning of torchvision's ViT (`structured-prune: {hidden: ...}`).

The reference is independent of nnsqueeze and of torchvision's modules: the original weights, in float64,
sliced by hand with the kept stream channels (and kept heads / MLP neurons when those are pruned too),
run through a ViT forward pass written out below (checked first against the unpruned torchvision model).
Zeroing the removed channels would not be a reference: the LayerNorms then normalize over the kept
channels only. The pruned model must equal the reference within 1e-5 (float32 against float64).
Sizes: 24 wide (3 heads of 8, MLP 40, 4x4 patches of 8) and an odd one, 21 wide (3 heads of 7, MLP 33,
3x3 patches): head_dim stays 8 / 7 while the stream narrows to 18 / 15, no multiple of it.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nnsqueeze as nsq
from nnsqueeze.context import Context
from nnsqueeze.errors import ModelError, RecipeError
from nnsqueeze.steps.channel_prune import StructuredPrune
from nnsqueeze.structured.attention import PrunedMultiheadAttention
from nnsqueeze.zoo.tvision import import_torchvision

vt = import_torchvision().models.vision_transformer
TOL = {"atol": 1e-5, "rtol": 1e-5}
SHAPES = {"even": dict(image_size=32, patch_size=8, num_layers=2, num_heads=3, hidden_dim=24, mlp_dim=40),
          "odd": dict(image_size=24, patch_size=8, num_layers=2, num_heads=3, hidden_dim=21, mlp_dim=33)}
RATIO = {"even": 0.25, "odd": 0.3}      # 24 -> 18, 21 -> 15


def vit(shape="even"):
    torch.manual_seed(0)
    m = vt.VisionTransformer(num_classes=5, **SHAPES[shape]).eval()
    with torch.no_grad():   # torchvision starts class_token and the head at zero, norms at ones: spread them
        for n, p in m.named_parameters():
            if "ln" in n and n.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif "ln" in n or n in ("class_token", "heads.head.weight", "heads.head.bias"):
                p.normal_(0, 0.5)
    return m


def images(shape="even", seed=1, b=3):
    s = SHAPES[shape]["image_size"]
    return torch.randn(b, 3, s, s, generator=torch.Generator().manual_seed(seed))


def run_step(model, x, **cfg):
    ctx = Context(example_inputs=x, progress=False)
    ctx.report.begin_step("structured-prune", cfg)
    step = StructuredPrune(StructuredPrune.Config(**cfg))
    return step.run(model, ctx), step, ctx


# ---- the float64 reference -----------------------------------------------------------------------

def sliced(model, keep, heads=None, mlp=None):
    """The original state dict in float64 with stream channels ``keep`` (and heads / neurons) kept, by hand."""
    sd = {k: v.detach().double().clone() for k, v in model.state_dict().items()}
    k = torch.tensor(keep)
    sd["class_token"], sd["encoder.pos_embedding"] = sd["class_token"][..., k], sd["encoder.pos_embedding"][..., k]
    sd["conv_proj.weight"], sd["conv_proj.bias"] = sd["conv_proj.weight"][k], sd["conv_proj.bias"][k]
    sd["heads.head.weight"] = sd["heads.head.weight"][:, k]
    for n in [n for n in sd if ".ln" in n or n.startswith("encoder.ln")]:
        sd[n] = sd[n][k]
    for i in range(len(model.encoder.layers)):
        b = f"encoder.layers.encoder_layer_{i}."
        a, h = b + "self_attention.", model.encoder.layers[i].self_attention.num_heads
        d = sd[a + "in_proj_weight"].shape[0] // 3 // h
        hk = torch.tensor((heads or {}).get(b + "self_attention", list(range(h))))
        w = sd[a + "in_proj_weight"]
        sd[a + "in_proj_weight"] = w.reshape(3, h, d, -1)[:, hk].reshape(-1, w.shape[1])[:, k]
        sd[a + "in_proj_bias"] = sd[a + "in_proj_bias"].reshape(3, h, d)[:, hk].reshape(-1)
        w = sd[a + "out_proj.weight"]
        sd[a + "out_proj.weight"] = w.reshape(w.shape[0], h, d)[:, hk].reshape(w.shape[0], -1)[k]
        sd[a + "out_proj.bias"] = sd[a + "out_proj.bias"][k]
        nk = torch.tensor((mlp or {}).get(b + "mlp.0", list(range(sd[b + "mlp.0.weight"].shape[0]))))
        sd[b + "mlp.0.weight"], sd[b + "mlp.0.bias"] = sd[b + "mlp.0.weight"][nk][:, k], sd[b + "mlp.0.bias"][nk]
        sd[b + "mlp.3.weight"], sd[b + "mlp.3.bias"] = sd[b + "mlp.3.weight"][k][:, nk], sd[b + "mlp.3.bias"][k]
    return sd


def layer_norm(sd, name, x, eps=1e-6):
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * sd[f"{name}.weight"] + sd[f"{name}.bias"]


def vit_ref(sd, img, patch, head_dim, layers=2):
    """torchvision's VisionTransformer.forward, written out in float64."""
    x = F.conv2d(img.double(), sd["conv_proj.weight"], sd["conv_proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    x = torch.cat([sd["class_token"].expand(x.shape[0], -1, -1), x], 1) + sd["encoder.pos_embedding"]
    for i in range(layers):
        b = f"encoder.layers.encoder_layer_{i}."
        y = layer_norm(sd, b + "ln_1", x)
        a = b + "self_attention."
        q, k, v = (F.linear(y, w, bias).unflatten(-1, (-1, head_dim)).transpose(1, 2) for w, bias in
                   zip(sd[a + "in_proj_weight"].chunk(3), sd[a + "in_proj_bias"].chunk(3)))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), -1) @ v
        x = x + F.linear(att.transpose(1, 2).flatten(2), sd[b + "self_attention.out_proj.weight"],
                         sd[b + "self_attention.out_proj.bias"])
        y = F.gelu(F.linear(layer_norm(sd, b + "ln_2", x), sd[b + "mlp.0.weight"], sd[b + "mlp.0.bias"]))
        x = x + F.linear(y, sd[b + "mlp.3.weight"], sd[b + "mlp.3.bias"])
    return F.linear(layer_norm(sd, "encoder.ln", x)[:, 0], sd["heads.head.weight"], sd["heads.head.bias"])


def stream_keep(step):
    return next(k for n, r, k in step.plan_ if (n, r) == ("conv_proj", "out"))


# ---- tests ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("heads", [False, True])
@pytest.mark.parametrize("shape", ["even", "odd"])
def test_vit_hidden_equals_float64_reference(shape, heads):
    model, x = vit(shape), images(shape)
    orig, s = copy.deepcopy(model), SHAPES[shape]
    d = s["hidden_dim"] // s["num_heads"]
    with torch.no_grad():   # the reference itself first: it reproduces the unpruned torchvision model
        torch.testing.assert_close(orig(x).double(), vit_ref(sliced(orig, list(range(s["hidden_dim"]))), x,
                                                             s["patch_size"], d), **TOL)
    extra = {"ratio": 0.4} if heads else {}
    pruned, step, ctx = run_step(model, x, hidden=RATIO[shape], **extra)
    keep = stream_keep(step)
    width = s["hidden_dim"] - round(s["hidden_dim"] * RATIO[shape])
    assert len(keep) == width and pruned.hidden_dim == width and pruned.conv_proj.out_channels == width
    assert pruned.class_token.shape == (1, 1, width) and pruned.encoder.pos_embedding.shape[-1] == width
    assert pruned.encoder.ln.normalized_shape == (width,) and pruned.heads.head.in_features == width
    for blk in pruned.encoder.layers:
        att = blk.self_attention
        assert isinstance(att, PrunedMultiheadAttention) and att.embed_dim == width and att.head_dim == d
        assert att.in_proj_weight.shape == (3 * att.num_heads * d, width) and att.out_proj.out_features == width
        assert att.num_heads == (2 if heads else 3)             # 3 heads, ratio 0.4 -> 1 removed
        assert blk.ln_1.weight.shape == blk.ln_2.bias.shape == (width,) and blk.mlp[0].in_features == width
        assert blk.mlp[3].out_features == width
        assert blk.mlp[0].out_features == s["mlp_dim"] - (round(s["mlp_dim"] * 0.4) if heads else 0)
    members = {(m.module, m.role) for m in step._streams[0].group.members}
    # conv, class token, pos; out_proj, fc2; norms; in_proj, fc1; head
    assert len(members) == 3 + 2 * 2 + 5 + 2 * 2 + 1
    assert all(k == keep for n, r, k in step.plan_ if (n, r) in members)
    mlp = {n: k for n, r, k in step.plan_ if r == "out" and n.endswith("mlp.0")}
    with torch.no_grad():
        ref = vit_ref(sliced(orig, keep, step.heads_, mlp), x, s["patch_size"], d)
        torch.testing.assert_close(pruned(x).double(), ref, **TOL)
    fig = ctx.report.steps[-1]["figures"]
    assert (fig["hidden_before"], fig["hidden_after"]) == (s["hidden_dim"], width)
    assert not any("self_attention" in r["layer"] or "ln" in r["layer"] for r in ctx.report.skipped)


def test_l2_ranks_stream_channels_over_every_stream_tensor():
    model, x = vit(), images()
    orig = copy.deepcopy(model)
    _, step, _ = run_step(model, x, hidden=0.25)
    score = torch.zeros(24, dtype=torch.float64)
    for n, t in orig.state_dict().items():   # every tensor's entries on stream channel c, summed by hand
        t = t.double().pow(2)
        if n in ("class_token", "encoder.pos_embedding"):
            score += t.reshape(-1, 24).sum(0)
        elif n.startswith("conv_proj") or "out_proj" in n or "mlp.3" in n:
            score += t.reshape(24, -1).sum(1)
        elif ".ln" in n or n.startswith("encoder.ln"):
            score += t
        elif "in_proj_weight" in n or "mlp.0.weight" in n or n == "heads.head.weight":
            score += t.sum(0)
    assert sorted(set(range(24)) - set(stream_keep(step))) == sorted(torch.argsort(score)[:6].tolist())


@pytest.mark.parametrize("extra", [{}, {"ratio": 0.4}])
def test_vit_hidden_onnx_runtime_and_reload_are_exact(extra, tmp_path):
    from nnsqueeze.export.ort import OrtModule

    data = [images(seed=s) for s in range(2)]
    recipe = {"version": 1, "steps": [{"structured-prune": {"hidden": 0.25, **extra}}],
              "evaluate": {"runs": 2, "warmup": 1}}
    res = nsq.compress(vit(), recipe, calib_data=data, metric=None, progress=False)
    assert res.model.hidden_dim == 18
    res.save(tmp_path / "art")
    loaded = nsq.load(tmp_path / "art", model=vit()).eval()
    assert loaded.hidden_dim == 18 and isinstance(loaded.encoder.layers[1].self_attention, PrunedMultiheadAttention)
    assert loaded.encoder.layers[1].self_attention.embed_dim == 18
    x = data[1]
    with torch.no_grad():
        want = res.model.eval()(x)
        assert torch.equal(loaded(x), want)
        got = torch.as_tensor(OrtModule(tmp_path / "art" / "model.onnx")(x))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_widths_that_do_not_fit_are_recipe_errors():
    x = images()
    with pytest.raises(RecipeError, match="keeps 1 of 24 hidden channels: a LayerNorm over one channel"):
        run_step(vit(), x, hidden=0.97)
    with pytest.raises(RecipeError, match="removes none of the 24 hidden channels"):
        run_step(vit(), x, hidden=0.01)
    with pytest.raises(RecipeError, match="round_to=32"):
        run_step(vit(), x, hidden=0.25, round_to=32)


class Unlisted(nn.Module):
    """The stream gets a writer no shape rule lists (a (12, 5) parameter applied to the raw input)."""

    def __init__(self):
        super().__init__()
        self.inp, self.w = nn.Linear(5, 12), nn.Parameter(torch.randn(12, 5))
        self.ln, self.att = nn.LayerNorm(12), nn.MultiheadAttention(12, 2, batch_first=True)
        self.head = nn.Linear(12, 3)

    def forward(self, z):
        x = self.inp(z) + z @ self.w.T
        y = self.ln(x)
        return self.head(x + self.att(y, y, y)[0])


def test_a_stream_writer_the_shapes_do_not_list_is_a_model_error():
    torch.manual_seed(0)
    with pytest.raises(ModelError, match="no LayerNorm of width 12 reads a residual stream"):
        run_step(Unlisted().eval(), torch.randn(2, 4, 5), hidden=0.5)
    m = Unlisted().eval()
    m.att = nn.MultiheadAttention(12, 2, add_bias_kv=True, batch_first=True)
    with pytest.raises(ModelError, match="does not support this attention layer .bias_k"):
        run_step(m, torch.randn(2, 4, 5), hidden=0.5)


@pytest.mark.slow
def test_vit_b_16_architecture_hidden_heads_and_mlp_export_and_rebuild(tmp_path):
    """torchvision's vit_b_16 itself (12 blocks, 12 heads of 64), at image_size 32 (4 patches) to stay small."""
    from nnsqueeze.export.onnx import export_onnx
    from nnsqueeze.structured.macs import count

    def build():
        torch.manual_seed(0)
        return import_torchvision().models.get_model("vit_b_16", weights=None, image_size=32).eval()

    x = images(seed=2, b=1)
    model = build()
    before = count(model, x)
    pruned, step, ctx = run_step(model, x, hidden=0.25, ratio=0.5)
    assert pruned.hidden_dim == 576 and pruned.conv_proj.out_channels == 576
    for blk in pruned.encoder.layers:
        att = blk.self_attention
        assert (att.embed_dim, att.num_heads, att.head_dim, blk.mlp[0].out_features) == (576, 6, 64, 1536)
    after = count(pruned, x)
    # per block: attention 4 * 576 * 384 per token + scores; MLP 2 * 576 * 1536 per token: under half the MACs
    assert after.total_macs < 0.5 * before.total_macs and after.total_params < 0.4 * before.total_params
    export_onnx(pruned, tmp_path / "m.onnx", x)          # verifies ONNX Runtime against torch
    fresh = StructuredPrune.rebuild(build(), step.config, step.record())
    fresh.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), pruned(x))
