"""Outlier input channels in float beside the dynamic int8 matmul; fp16-exact storage."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import nnsqueeze as nsq
from nnsqueeze.export.onnx import export_onnx
from nnsqueeze.export.ort import OrtModule
from nnsqueeze.ops.dynamic import dynamic_qparams, outlier_channels
from nnsqueeze.quant.dynamic import convert_dynamic_, dynamic_fake_linear
from nnsqueeze.quant.embedding import fp16_ceil


def _x(seed=0, shape=(3, 7, 23), big=(4, 17)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    for j, c in enumerate(big):  # outlier channels ~30x the others
        x[..., c] *= 30.0 + 5 * j
    return x


def test_outlier_channels_closed_form():
    a = torch.tensor([1.0, 9.0, 1.2, 0.8, 30.0, 1.1, 6.5])  # median 1.2: ratio 6 -> > 7.2
    assert outlier_channels(a, 6.0, 8).tolist() == [4, 1]
    assert outlier_channels(a, 6.0, 1).tolist() == [4]
    assert outlier_channels(a, 50.0, 8) is None
    assert outlier_channels(torch.zeros(5), 6.0, 8) is None  # median 0: nothing is an outlier
    assert outlier_channels(torch.tensor([1.0, 100.0]), 1.5, 8).tolist() == [1]  # never every channel


def test_layer_matches_float64_reference_and_reverts():
    torch.manual_seed(0)
    lin = nn.Linear(23, 13)
    w0, b0 = lin.weight.detach().clone().double(), lin.bias.detach().clone().double()
    idx = torch.tensor([4, 17])
    s = torch.rand(23, dtype=torch.float64) + 0.5
    q = convert_dynamic_(lin, bits=8, signed=True, smooth=s, outliers=idx)
    x = _x()
    with torch.no_grad():
        y = q.eval()(x).double()
    # float64 reference: int8 path on x/s with the outlier channels zeroed, plus the float outlier part
    keep = torch.ones(23, dtype=torch.float64)
    keep[idx] = 0
    xs = (x.double() * (1 / s).float().double() * keep).float()  # the layer multiplies in float32
    sc, zp = dynamic_qparams(xs)
    xq = (torch.clamp(torch.round(xs / sc) + zp, 0, 255) - zp).double()
    ws = (w0 * s * keep)
    wscale = ws.abs().amax(1).float() / 127
    wq = torch.clamp(torch.round(ws.float() / wscale[:, None]), -127, 127).double()
    w_o = w0[:, idx].float().half().double()  # stored fp16-rounded
    ref = (xq @ wq.T) * (sc.double() * wscale.double()) + b0 + x.double()[..., idx] @ w_o.T
    assert torch.allclose(y, ref, atol=1e-5, rtol=1e-5)
    # the outlier channels' range is no longer the tensor's: the int8 step is ~30x finer
    assert float(sc) < float(dynamic_qparams(x)[0]) / 10
    # the cheap search simulation agrees with the exact layer within a fraction of a step
    sim = dynamic_fake_linear(x, w0.float(), b0.float(), s, 8, True, idx)
    assert float((sim.double() - y).detach().abs().max()) < 0.05 * float(y.abs().max())
    q.revert_()
    assert type(q) is nn.Linear
    got = q.weight.detach().double()
    assert torch.allclose(got[:, idx], w_o, atol=0) and torch.allclose(got, w0, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("bad", [[], [0, 0], [23], list(range(23))])
def test_bad_outlier_indices_are_rejected_and_leave_the_layer_alone(bad):
    lin = nn.Linear(23, 5)
    w = lin.weight.detach().clone()
    with pytest.raises(ValueError, match="outliers"):
        convert_dynamic_(lin, outliers=torch.tensor(bad, dtype=torch.int64))
    assert type(lin) is nn.Linear and torch.equal(lin.weight, w)


class _QKV(nn.Module):
    """Three Linears reading one tensor (q, k, v) and one reading another."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(23, 8), nn.Linear(23, 8), nn.Linear(23, 6)
        self.o = nn.Linear(8, 5)

    def forward(self, x):
        a = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2), -1) @ self.v(x)[..., :8].repeat(1, 1, 2)[..., :8]
        return self.o(a)


@pytest.mark.ort_isa
def test_step_outliers_and_ort_parity(tmp_path):
    torch.manual_seed(0)
    model = _QKV().eval()
    calib = [(_x(i), None) for i in range(3)]
    recipe = {"version": 1, "steps": [{"quantize-dynamic": {"smooth": {"alpha": 0.5},
                                                             "outliers": {"ratio": 6.0, "max_channels": 4}}}]}
    res = nsq.compress(model, recipe, calib_data=calib, example_inputs=_x(9), metric=None, progress=False)
    res.save(tmp_path / "out")
    qm = res.model
    assert sorted(qm.q.outlier_index_.tolist()) == [4, 17] and torch.equal(qm.k.outlier_index_, qm.q.outlier_index_)
    assert not hasattr(qm.o, "outlier_index_")  # its input has no outlier channel
    fig = export_onnx(qm, tmp_path / "m.onnx", _x(5), samples=[_x(6)])
    assert sum(fig["ort_int8_ops"].values()) == 4  # every Linear on int8 kernels
    sess = OrtModule(tmp_path / "m.onnx", threads=1)
    x = _x(7)
    with torch.no_grad():
        ref = qm(x)
    got = sess(x)
    assert float((got - ref).abs().max()) < 1e-4 * float(ref.abs().max()) + 1e-6
    # reload from the artifact (no pickle) reproduces the model exactly
    back = nsq.load(tmp_path / "out", _QKV())
    with torch.no_grad():
        assert torch.equal(back(x), ref)


def test_fp16_ceil_is_smallest_fp16_not_below():
    s = torch.rand(5000, generator=torch.Generator().manual_seed(0)) * 0.1 + 1e-4
    h = fp16_ceil(s)
    assert bool((h >= s).all()) and torch.equal(h.half().float(), h)
    below = torch.nextafter(h.half(), torch.zeros_like(h.half())).float()
    assert bool((below < s).all())  # one fp16 step down would be below s
    assert torch.equal(fp16_ceil(torch.tensor([1e-6, 0.1])), torch.tensor([1e-6, 0.1]))  # outside fp16 normals


@pytest.mark.ort_isa
def test_embedding_scales_and_outliers_stored_as_fp16_exactly(tmp_path):
    import onnx
    from onnx import numpy_helper

    torch.manual_seed(0)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.lin = nn.Embedding(600, 23), nn.Linear(23, 300)

        def forward(self, ids):
            h = self.emb(ids)
            h = h * torch.tensor([30.0 if j == 4 else 1.0 for j in range(23)])
            return self.lin(h)

    m = M().eval()
    from nnsqueeze.quant.embedding import convert_embedding_
    convert_embedding_(m.emb)
    convert_dynamic_(m.lin, outliers=torch.tensor([4]))
    ids = torch.randint(0, 600, (4, 9))
    fig = export_onnx(m, tmp_path / "m.onnx", ids, samples=[torch.randint(0, 600, (3, 9))])
    assert fig["fp16_exact_constants"] == 2  # 600 row scales, 300x1 outlier weights
    proto = onnx.load(tmp_path / "m.onnx")
    halves = [numpy_helper.to_array(i) for i in proto.graph.initializer if i.data_type == 10]
    assert sorted(a.size for a in halves) == [300, 600]
    assert np.array_equal(np.sort(halves[[a.size for a in halves].index(600)].astype(np.float32).ravel()),
                          np.sort(m.emb.weight_scale_.numpy().ravel()))
    assert fig["max_abs_diff"] < 1e-4
