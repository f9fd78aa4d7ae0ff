"""BatchNorm folding during QAT: the fold-on-the-fly forward equals conv + BN (training: batch
statistics and running-stat updates; eval/frozen: running statistics) when quantization is off."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from nnsqueeze.quant.fold import bn_train_forward, fold_attached_
from nnsqueeze.quant.modules import convert_


def pair(kind: str, bias: bool):
    torch.manual_seed(0)
    conv = nn.Conv1d(3, 5, 3, padding=1, bias=bias) if kind == "conv1d" else (
        nn.Conv2d(3, 5, 3, bias=bias) if kind == "conv2d" else nn.Linear(7, 5, bias=bias))
    bn = nn.BatchNorm2d(5) if kind == "conv2d" else nn.BatchNorm1d(5)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    shape = {"conv1d": (8, 3, 9), "conv2d": (4, 3, 6, 7)}.get(kind, (16, 7))
    x = torch.randn(*shape)
    return conv, bn, x


@pytest.mark.parametrize("kind", ["conv1d", "conv2d", "linear"])
@pytest.mark.parametrize("bias", [True, False])
def test_training_forward_matches_conv_bn_and_updates_running_stats(kind, bias):
    conv, bn, x = pair(kind, bias)
    ref_bn = copy.deepcopy(bn).train()
    ref = ref_bn(conv(x))
    y = bn_train_forward(lambda w, b: conv._conv_forward(x, w, b) if kind != "linear" else
                         nn.functional.linear(x, w, b), conv.weight, conv.bias, bn, lambda w: w)
    assert float((y - ref).abs().max().detach()) <= 1e-5 * max(1.0, float(ref.abs().max().detach()))
    assert torch.allclose(bn.running_mean, ref_bn.running_mean, atol=1e-6)
    assert torch.allclose(bn.running_var, ref_bn.running_var, atol=1e-6)
    assert int(bn.num_batches_tracked) == int(ref_bn.num_batches_tracked)
    # gradients flow to the weight and to gamma/beta
    y.sum().backward()
    assert conv.weight.grad is not None and bn.weight.grad is not None


@pytest.mark.parametrize("kind", ["conv1d", "conv2d", "linear"])
def test_attached_bn_eval_and_frozen_forward_equal_conv_bn_eval(kind):
    conv, bn, x = pair(kind, True)
    with torch.no_grad():
        ref = bn.eval()(conv(x))
    layer = copy.deepcopy(conv)
    layer.add_module("bn", copy.deepcopy(bn))
    convert_(layer, weight_bits=8)
    # the float path the layer quantizes: effective (folded) weight and bias
    with torch.no_grad():
        y = layer._layer(x, layer.effective_weight(), layer.effective_bias())
    assert float((y - ref).abs().max()) <= 1e-5 * max(1.0, float(ref.abs().max()))
    # frozen BN in training mode == eval mode (same grid, same folded numbers)
    layer.input_scale_.fill_(float(x.abs().max()) / 127)
    layer.input_zero_point_.fill_(128)
    layer.eval()
    with torch.no_grad():
        ev = layer(x)
    layer.train()
    layer.bn_frozen = True
    with torch.no_grad():
        tr = layer(x)
    assert torch.equal(ev, tr)
    # folding for good keeps the eval output
    fold_attached_(layer)
    layer.eval()
    with torch.no_grad():
        assert float((layer(x) - ev).abs().max()) <= 1e-5 * max(1.0, float(ev.abs().max()))
