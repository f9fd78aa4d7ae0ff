"""torchvision's ConvNeXt, Swin, ViT and MaxViT (random init) at 50% channels (l2): MACs left (per
``nnsqueeze.structured.macs.count``) against bounds measured on 2026-12-06 (Swin: 2026-12-07, window-attention
heads pruned and counted; MaxViT: block / grid attention heads pruned and counted), then ONNX Runtime parity and
exact rebuild.

Torch-Pruning 1.6.1's MetaPruner on the same models and inputs (final classifier ignored): convnext_tiny
0.2572 (nnsqueeze with ``norms: prune`` 0.2572); vit_b_16 0.2618, by pruning the hidden size (residual
stream, with ``model.hidden_dim`` set by hand as its ViT example does), which nnsqueeze keeps (0.5033:
heads and MLP neurons); swin_t, swin_v2_t and maxvit_t: Torch-Pruning ran out of memory (> 9.5 GB).
"""

from __future__ import annotations

import pytest
import torch

from nnsqueeze.context import Context
from nnsqueeze.steps.channel_prune import StructuredPrune
from nnsqueeze.structured.macs import count
from nnsqueeze.zoo.tvision import import_torchvision

pytestmark = pytest.mark.slow


def prune(name: str, size: int, **cfg):
    tv = import_torchvision()
    torch.manual_seed(0)
    model, x = tv.models.get_model(name, weights=None).eval(), torch.randn(1, 3, size, size)
    before = count(model, x).total_macs
    ctx = Context(example_inputs=x, progress=False)
    ctx.report.begin_step("structured-prune", cfg)
    step = StructuredPrune(StructuredPrune.Config(ratio=0.5, importance="l2", **cfg))
    pruned = step.run(model, ctx)
    return pruned, step, ctx, x, count(pruned, x).total_macs / before


def check_export_and_rebuild(name, pruned, step, x, tmp_path):
    from nnsqueeze.export.onnx import export_onnx

    tv = import_torchvision()
    export_onnx(pruned, tmp_path / "m.onnx", x)          # verifies ONNX Runtime against torch
    fresh = StructuredPrune.rebuild(tv.models.get_model(name, weights=None), step.config, step.record())
    fresh.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), pruned(x))


def test_convnext_tiny_norms_prune_matches_torch_pruning(tmp_path):
    pruned, step, ctx, x, left = prune("convnext_tiny", 64, norms="prune")
    assert left <= 0.258                                 # Torch-Pruning: 0.257
    assert [s["layer"] for s in ctx.report.skipped] == ["classifier.2"]
    blk = pruned.features[1][0]
    assert blk.layer_scale.shape == (48, 1, 1) and blk.block[2].normalized_shape == (48,)
    check_export_and_rebuild("convnext_tiny", pruned, step, x, tmp_path)


def test_vit_b_16_heads_and_mlp_neurons(tmp_path):
    pruned, step, ctx, x, left = prune("vit_b_16", 224)
    assert left <= 0.504                                 # Torch-Pruning (hidden size pruned too): 0.68
    enc = pruned.encoder.layers[0]
    assert enc.self_attention.num_heads == 6 and enc.mlp[0].out_features == 1536
    assert pruned.conv_proj.out_channels == 768          # the residual stream (hidden size) is kept
    check_export_and_rebuild("vit_b_16", pruned, step, x, tmp_path)


@pytest.mark.parametrize("name", ["swin_t", "swin_v2_t"])
def test_swin_window_heads_and_mlp_neurons(name, tmp_path):
    pruned, step, ctx, x, left = prune(name, 64, norms="prune")
    assert left <= 0.51                   # measured 0.5016 (swin_t), 0.4998 (swin_v2_t); 0.54 with heads kept
    blk = pruned.features[1][0]
    assert blk.mlp[0].out_features == 192 and blk.mlp[3].in_features == 192
    assert blk.attn.num_heads == 1 and blk.attn.proj.in_features == 32             # 3 heads of 32 -> 1
    assert pruned.features[7][0].attn.num_heads == 12                               # 24 -> 12
    assert blk.attn.qkv.in_features == 96                # the residual stream (hidden size) is kept
    check_export_and_rebuild(name, pruned, step, x, tmp_path)


def test_maxvit_t_mbconv_mlp_widths_and_heads(tmp_path):
    pruned, step, ctx, x, left = prune("maxvit_t", 224, norms="prune")
    assert left <= 0.48                   # measured 0.4716 (attention core counted); 0.576 with heads kept
    layer = pruned.blocks[0].layers[0].layers
    assert layer.MBconv.layers.conv_a[0].out_channels == 128 and layer.window_attention.mlp_layer[1].out_features == 128
    attn = layer.window_attention.attn_layer[1]
    assert attn.to_qkv.in_features == 64 and attn.merge.out_features == 64    # the residual stream is kept
    assert attn.n_heads == 1 and attn.to_qkv.out_features == 96 and attn.merge.in_features == 32   # 2 heads of 32
    assert pruned.blocks[3].layers[1].layers.grid_attention.attn_layer[1].n_heads == 8            # 16 -> 8
    assert len(step.record()["heads"]) == 22             # block and grid attention of all 11 layers
    reasons = " ".join(s["reason"] for s in ctx.report.skipped)
    assert "heads are pruned inside the layer" in reasons and "channel count read from its shape" not in reasons
    check_export_and_rebuild("maxvit_t", pruned, step, x, tmp_path)
