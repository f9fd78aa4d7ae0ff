"""One tensor, one set of qparams (nnsqueeze.quant.tie_inputs): a quantized layer reading another's output
through a zero pad takes its output qparams, also when a ReLU6 module shared by the block (EfficientNet's
``_swish``) sits between them, and ORT then equals the simulation with a clipping calibration method."""

import copy

import pytest
import torch
from torch import nn

from nnsqueeze.context import Context
from nnsqueeze.quant.modules import convert_
from nnsqueeze.quant.tie_inputs import _clamps_nothing, tie_layer_inputs
from nnsqueeze.steps.quantize import Quantize
from ort_parity import ort_vs_sim  # tests/ is on sys.path (rootdir conftest)


class SharedAct(nn.Module):
    """EfficientNet-Lite's MBConv shape: one ReLU6 module called after the expand and the depthwise conv,
    TF-"SAME" asymmetric padding as a ZeroPad2d in front of the stride-2 depthwise conv; odd channels."""

    def __init__(self):
        super().__init__()
        self.expand, self.bn0 = nn.Conv2d(3, 11, 1, bias=False), nn.BatchNorm2d(11)
        self.dw = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(11, 11, 3, 2, groups=11, bias=False))
        self.bn1 = nn.BatchNorm2d(11)
        self.project = nn.Conv2d(11, 5, 1)
        self.act = nn.ReLU6()

    def forward(self, x):
        return self.project(self.act(self.bn1(self.dw(self.act(self.bn0(self.expand(x)))))))


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = SharedAct()
    for bn in (m.bn0, m.bn1):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.6)
    return m.eval()


@pytest.mark.parametrize("method", ["mse", pytest.param("percentile", marks=pytest.mark.ort_isa), "kl"])
def test_shared_relu6_and_pad_tied_and_ort_equal(method, tmp_path):
    ctx = Context(calib_data=[(torch.randn(16, 3, 17, 15) * 2, None) for _ in range(2)])
    ctx.report.begin_step("quantize", {})
    q = Quantize(Quantize.Config(calibration={"method": method})).run(copy.deepcopy(_model()), ctx)
    assert isinstance(q.act, nn.ReLU6)  # shared: kept as a module, the convs apply the clamp themselves
    dw, expand = q.dw[1], q.expand
    assert torch.equal(dw.input_scale_, expand.output_scale_)
    assert torch.equal(dw.input_zero_point_, expand.output_zero_point_)
    assert torch.equal(q.project.input_scale_, dw.output_scale_)
    torch.manual_seed(1)
    got, ref, step = ort_vs_sim(q, torch.randn(6, 3, 17, 15) * 2, [torch.randn(3, 3, 17, 15)], tmp_path / "q.onnx")
    assert (got - ref).abs().max() <= 0.02 * step


def test_tie_follows_only_identities():
    """A ReLU6 module after a conv that only applies ReLU is not an identity (values above 6 exist):
    the chain stops there; a non-zero pad is not followed either."""
    relu_conv, plain = convert_(nn.Conv2d(2, 2, 1)), convert_(nn.Conv2d(2, 2, 1))
    relu_conv.act, plain.act = "relu", None
    assert _clamps_nothing(nn.ReLU(), relu_conv) and not _clamps_nothing(nn.ReLU6(), relu_conv)
    assert not _clamps_nothing(nn.ReLU(), plain)
    for mid in (nn.ReLU6(), nn.ConstantPad2d(1, 0.5)):
        model = nn.Sequential(nn.Conv2d(1, 2, 1), mid, nn.Conv2d(2, 2, 1)).eval()
        a, b = convert_(model[0]), convert_(model[2])
        a.act = "relu"
        a.output_scale_.fill_(0.02)
        b.input_scale_.fill_(0.03)
        assert tie_layer_inputs(model, lambda m=model: m(torch.randn(1, 1, 4, 4))) == []
        assert float(b.input_scale_) == pytest.approx(0.03)
