"""Fake-quant layers: structure, integer-arithmetic reference, pack/unpack, masks, training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnsqueeze.quant.modules import QuantConv1d, QuantConv2d, QuantLinear, convert_, fake_quant_modules
from nnsqueeze.quant.observers import MinMaxObserver


def calibrated(layer: nn.Module, x: torch.Tensor, **kw) -> nn.Module:
    convert_(layer, **kw)
    layer.start_calibration(MinMaxObserver, "layer")
    with torch.no_grad():
        layer(x)
    layer.finish_calibration()
    return layer.eval()


def test_convert_keeps_keys_and_adds_buffers():
    conv = nn.Conv1d(3, 7, 3)
    keys = set(conv.state_dict())
    w = conv.weight
    q = convert_(conv, act="relu")
    assert q is conv and type(q) is QuantConv1d and q.weight is w
    sd = q.state_dict()
    assert keys <= set(sd)
    assert sd["weight_scale_"].shape == (7,) and sd["input_scale_"].shape == ()
    assert sd["input_zero_point_"].dtype == torch.int32 and "output_scale_" in sd  # convs quantize outputs
    assert "output_scale_" not in convert_(nn.Linear(4, 2)).state_dict()        # Linear may output float
    q.revert_()
    assert type(q) is nn.Conv1d and set(q.state_dict()) == keys


def test_convert_rejects_other_layers():
    with pytest.raises(TypeError, match="Conv3d"):
        convert_(nn.Conv3d(1, 1, 1))


@pytest.mark.parametrize("make,shape", [
    (lambda: nn.Linear(13, 7), (5, 13)),
    (lambda: nn.Conv1d(3, 5, 3, stride=2, padding=1), (4, 3, 37)),
    (lambda: nn.Conv2d(3, 5, 3, padding=1), (2, 3, 7, 9)),
])
def test_forward_equals_integer_arithmetic(make, shape):
    """y = s_x * s_w * (sum((x_q - z_x) * w_q) + b_q), computed in float64 from integer codes."""
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(*shape) * 2 + 0.5
    calibrated(layer, x, quant_output=False)
    y = layer(x)
    xq = torch.clamp(torch.round(x / layer.input_scale_) + layer.input_zero_point_, 0, 255)
    xc = (xq - layer.input_zero_point_).double()
    wq, bq = layer.weight_codes().double(), layer.bias_codes().double()
    if isinstance(layer, nn.Linear):
        acc = F.linear(xc, wq, bq)
        scale = (layer.input_scale_.double() * layer.weight_scale_.double())
    else:
        acc = layer._conv_forward(xc, wq, bq)
        scale = (layer.input_scale_.double() * layer.weight_scale_.double()).reshape(-1, *[1] * (x.dim() - 2))
    ref = acc * scale
    assert (y.double() - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


def test_absorbed_relu_and_output_quant():
    torch.manual_seed(1)
    conv = nn.Conv1d(2, 5, 3)
    x = torch.randn(3, 2, 11)
    calibrated(conv, x, act="relu", quant_output=True)
    y = conv(x)
    assert int(conv.output_zero_point_) == 0 and y.min().item() >= 0
    codes = y / conv.output_scale_
    assert torch.allclose(codes, codes.round(), atol=1e-3)  # on the uint8 grid


def test_pack_unpack_bit_exact_and_int8():
    torch.manual_seed(2)
    layer = calibrated(nn.Conv1d(7, 11, 5), torch.randn(4, 7, 23))
    sd = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.pack_state(sd, "")
    assert sd["weight"].dtype == torch.int8
    assert sd["weight"].numel() * 1 == layer.weight.numel()
    assert torch.equal(sd["weight"], layer.weight_codes())
    layer.unpack_state(sd, "")
    assert sd["weight"].dtype == torch.float32
    assert torch.equal(sd["weight"], layer.fake_quant_weight().detach())
    # Loading the unpacked weights reproduces the layer exactly.
    twin = convert_(nn.Conv1d(7, 11, 5), act=None, quant_output=True)
    twin.load_state_dict(sd)
    x = torch.randn(2, 7, 23)
    assert torch.equal(twin.eval()(x), layer(x))
    layer.unpack_state(sd, "")  # unpacking a float weight is a no-op
    assert sd["weight"].dtype == torch.float32


def test_masked_weights_stay_zero():
    torch.manual_seed(3)
    lin = nn.Linear(9, 6)
    mask = torch.rand(6, 9) > 0.5
    with torch.no_grad():
        lin.weight.mul_(mask)  # pruned entries are exact zeros, as the prune step leaves them
    lin.register_buffer("weight_mask", mask)
    calibrated(lin, torch.randn(8, 9))
    assert torch.all(lin.fake_quant_weight()[~mask] == 0)
    assert torch.all(lin.weight_codes()[~mask] == 0)
    sd = {k: v.clone() for k, v in lin.state_dict().items()}
    lin.pack_state(sd, "")
    assert torch.all(sd["weight"][~mask] == 0)
    assert sd["weight_mask"].dtype == torch.uint8 and sd["weight_mask"].numel() == (6 * 9 + 7) // 8  # bits
    lin.unpack_state(sd, "")
    assert torch.equal(sd["weight_mask"], mask) and torch.equal(sd["weight"], lin.fake_quant_weight())
    # even if a weight under the mask was revived by a training step, the mask wins
    with torch.no_grad():
        lin.weight[~mask] = 1.0
    assert torch.all(lin.fake_quant_weight()[~mask] == 0)


def test_training_mode_has_straight_through_gradients():
    torch.manual_seed(4)
    lin = calibrated(nn.Linear(5, 3), torch.randn(16, 5)).train()
    x = torch.randn(4, 5, requires_grad=True)
    lin(x).sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
    assert lin.bias.grad is not None and x.grad is not None
    with torch.no_grad():
        lin.weight.mul_(3.0)
    lin(torch.randn(2, 5))  # weight scales follow the weights in training
    flat = lin.weight.detach().abs().amax(1)
    assert torch.allclose(lin.weight_scale_, flat / 127)


def test_weight_bits_7_uses_reduced_range():
    lin = calibrated(nn.Linear(31, 4), torch.randn(8, 31), weight_bits=7)
    codes = lin.weight_codes()
    assert codes.abs().max().item() == 63
    sd = lin.state_dict()
    lin.pack_state(sd, "")
    assert sd["weight"].abs().max().item() == 63


def test_fake_quant_modules_lists_converted_layers():
    m = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    convert_(m[2])
    assert [(n, type(q)) for n, q in fake_quant_modules(m)] == [("2", QuantLinear)]
    assert QuantConv2d.__mro__[1].__name__ == "FakeQuantMixin"


def test_unseen_layer_reports_zero_batches():
    lin = convert_(nn.Linear(3, 3))
    lin.start_calibration(MinMaxObserver, "lin")
    assert lin.calibrated_batches == 0


def _weight_error_mean(layer, x, w_float, b_float):
    """Per-output-channel mean of (layer with quantized weights) - (float layer) on the same float inputs."""
    with torch.no_grad():
        wq, b = layer.fake_quant_weight(), layer.bias
        if isinstance(layer, nn.Linear):
            return (F.linear(x, wq, b) - F.linear(x, w_float, b_float)).mean(0)
        return (layer._conv_forward(x, wq, b) - layer._conv_forward(x, w_float, b_float)).mean((0, 2))


@pytest.mark.parametrize("make,shape", [(lambda: nn.Linear(13, 7), (256, 13)),
                                       (lambda: nn.Conv1d(6, 9, 3, groups=3), (16, 6, 301))])
def test_bias_correction_zeroes_the_mean_weight_error(make, shape):
    torch.manual_seed(5)
    x = torch.randn(*shape) + torch.linspace(-2, 3, shape[1]).reshape(1, -1, *[1] * (len(shape) - 2))
    errors = {}
    for correct in (False, True):
        torch.manual_seed(6)
        layer = make()
        w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
        convert_(layer, weight_bits=4, quant_output=False)  # coarse weights: a visible error
        layer.start_calibration(MinMaxObserver, "layer")
        with torch.no_grad():
            layer(x)
        shift = layer.finish_calibration(bias_correction=correct)
        assert (shift is not None) == correct
        errors[correct] = _weight_error_mean(layer, x, w0, b0).abs().max().item()
    assert errors[False] > 1e-2
    # exact for Linear; for the conv only edge windows (no padding) differ from the channel mean
    assert errors[True] <= (1e-5 if len(shape) == 2 else 0.05 * errors[False])
