"""MACs/params counting against closed forms."""

from __future__ import annotations

import torch
from torch import nn

from nnsqueeze.structured.macs import count
from nnsqueeze.zoo.mnist1d import build_model


def test_demo_cnn_closed_form():
    c = count(build_model(), torch.randn(3, 1, 40))
    expected = 40 * 32 * 1 * 5 + 20 * 64 * 32 * 3 + 10 * 128 * 64 * 3 + 1280 * 128 + 128 * 10
    assert c.total_macs == expected and c.total_params == 196_810
    assert c.per_layer["features.6"] == {"macs": 10 * 128 * 64 * 3, "params": 128 * 64 * 3 + 128}


def test_grouped_conv_and_sequence_linear():
    m = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2))
    assert count(m, torch.randn(1, 4, 5, 5)).total_macs == 25 * 8 * 2 * 9
    lin = nn.Linear(6, 3)
    assert count(lin, torch.randn(2, 7, 6)).total_macs == 7 * 3 * 6


def test_attention_counted_once_closed_form():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from structured_models import TransformerBlock

    c = count(TransformerBlock(d=16, heads=4, hidden=40), torch.randint(0, 30, (2, 5)))
    attn = 5 * 16 * 16 + 2 * 5 * 16 * 16 + 5 * 16 * 16 + 2 * 5 * 5 * 16   # q, k+v, out_proj, QK^T + AV
    assert c.per_layer["attn"]["macs"] == attn and "attn.out_proj" not in c.per_layer
    assert c.total_macs == attn + 2 * 5 * 40 * 16 + 3 * 16


def test_swin_window_attention_agrees_with_flop_counter_mode():
    """Swin's attention projections are functional ``F.linear`` calls (no Linear hook fires): counted by the
    attention layer with QK^T and AV, the total agrees with torch's FlopCounterMode (FLOPs = 2 MACs) within 1%,
    padded windows and the V2 ``cpb_mlp`` included, before and after head pruning."""
    from torch.utils.flop_counter import FlopCounterMode

    from nnsqueeze.structured.window_attention import prune_heads
    from nnsqueeze.zoo.tvision import import_torchvision

    swin = import_torchvision().models.swin_transformer
    x = torch.randn(1, 3, 13, 11)
    for kw in ({}, {"block": swin.SwinTransformerBlockV2, "downsample_layer": swin.PatchMergingV2}):
        torch.manual_seed(0)
        m = swin.SwinTransformer(patch_size=[2, 2], embed_dim=20, depths=[2, 2], num_heads=[5, 5],
                                 window_size=[3, 3], mlp_ratio=2.0, num_classes=7, **kw).eval()
        for step in range(2):
            with torch.no_grad(), FlopCounterMode(display=False) as fc:
                m(x)
            ours, ref = count(m, x).total_macs, fc.get_total_flops() / 2
            assert abs(ours - ref) <= 0.01 * ref, (kw, step, ours, ref)
            assert count(m, x).per_layer["features.1.0.attn"]["macs"] > 0
            if step == 0:
                m.features[1][0].attn = prune_heads(m.features[1][0].attn, [0, 3])
