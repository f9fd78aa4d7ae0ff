"""Per-layer shrinking: shapes, attributes, masks, and numerics against slicing by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nnsqueeze.errors import ModelError
from nnsqueeze.structured.pruners import channel_slices, dim_size, shrink


def test_conv_out_and_in_match_hand_slicing():
    conv = nn.Conv2d(4, 6, 3)
    w, b = conv.weight.detach().clone(), conv.bias.detach().clone()
    shrink(conv, "out", torch.tensor([1, 4]))
    shrink(conv, "in", torch.tensor([0, 3]))
    assert (conv.out_channels, conv.in_channels) == (2, 2)
    assert torch.equal(conv.weight, w[[1, 4]][:, [0, 3]]) and torch.equal(conv.bias, b[[1, 4]])
    x = torch.randn(1, 2, 5, 5)
    assert conv(x).shape == (1, 2, 3, 3)


def test_linear_square_in_only_touches_columns():
    lin = nn.Linear(5, 5)
    w = lin.weight.detach().clone()
    shrink(lin, "in", torch.tensor([0, 2, 4]))
    assert lin.weight.shape == (5, 3) and lin.bias.shape == (5,) and lin.in_features == 3
    assert torch.equal(lin.weight, w[:, [0, 2, 4]])


def test_unstructured_mask_shrinks_with_its_weight():
    lin = nn.Linear(4, 3)
    lin.register_buffer("weight_mask", torch.rand(3, 4) > 0.5)
    mask = lin.weight_mask.clone()
    shrink(lin, "out", torch.tensor([0, 2]))
    shrink(lin, "in", torch.tensor([1, 3]))
    assert torch.equal(lin.weight_mask, mask[[0, 2]][:, [1, 3]])


def test_batchnorm_depthwise_embedding():
    bn = nn.BatchNorm1d(5)
    bn.running_mean.copy_(torch.arange(5.0))
    shrink(bn, "out", torch.tensor([1, 3]))
    assert bn.num_features == 2 and torch.equal(bn.running_mean, torch.tensor([1.0, 3.0]))
    dw = nn.Conv1d(6, 6, 3, groups=6)
    shrink(dw, "out", torch.tensor([0, 5]))
    assert (dw.in_channels, dw.out_channels, dw.groups, tuple(dw.weight.shape)) == (2, 2, 2, (2, 1, 3))
    emb = nn.Embedding(10, 8)
    shrink(emb, "out", torch.tensor([0, 1, 7]))
    assert emb.embedding_dim == 3 and emb(torch.tensor([[1]])).shape == (1, 1, 3)
    assert dim_size(emb, "out") == 3


def test_unsupported_layers_raise_typed_errors():
    with pytest.raises(ModelError, match="groups=2"):
        shrink(nn.Conv1d(4, 4, 1, groups=2), "out", torch.tensor([0]))
    with pytest.raises(ModelError, match="whole groups"):
        shrink(nn.GroupNorm(2, 4), "out", torch.tensor([0]))
    with pytest.raises(ModelError, match="no pruner"):
        shrink(nn.LayerNorm((4, 4)), "out", torch.tensor([0]))   # over more than one axis


def test_grouped_conv_and_groupnorm_match_hand_slicing():
    conv = nn.Conv1d(6, 4, 3, groups=2)           # weight (4, 3, 3): input column j is channel j of each group
    w = conv.weight.detach().clone()
    shrink(conv, "in", torch.tensor([0, 2]))
    shrink(conv, "out", torch.tensor([1, 3]))
    assert (conv.in_channels, conv.out_channels, conv.groups) == (4, 2, 2)
    assert torch.equal(conv.weight, w[[1, 3]][:, [0, 2]]) and conv(torch.randn(1, 4, 5)).shape == (1, 2, 3)
    gn = nn.GroupNorm(3, 6)
    gn.weight.data = torch.arange(6.0)
    shrink(gn, "out", torch.tensor([2, 3]))
    assert (gn.num_groups, gn.num_channels) == (1, 2) and torch.equal(gn.weight, torch.tensor([2.0, 3.0]))


def test_channel_slices_expanded_inputs():
    lin = nn.Linear(6, 2)  # 3 channels x 2 positions, channel c -> columns 2c, 2c+1
    (s,) = channel_slices(lin, "in", 0, 2, 3)
    w = lin.weight.detach()
    assert torch.equal(s[1], torch.stack([w[:, 2], w[:, 3]]).flatten())
