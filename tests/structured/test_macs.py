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
