"""nnsqueeze.ops.quant against float64 numpy references and against ONNX Runtime's own Q/DQ."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nnsqueeze.ops.quant import (EPS, dequantize, fake_quantize, fake_quantize_bias, fake_quantize_ste, qparams,
                                 qrange, quantize, quantize_bias, sqnr_db)


def ref_qparams(lo: np.ndarray, hi: np.ndarray, bits: int, symmetric: bool):
    """float64 reference of the documented formulas."""
    lo, hi = np.minimum(lo.astype(np.float64), 0), np.maximum(hi.astype(np.float64), 0)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        return np.maximum(np.maximum(-lo, hi) / qmax, EPS), np.zeros_like(lo)
    qmax = 2 ** bits - 1
    scale = np.maximum((hi - lo) / qmax, EPS)
    return scale, np.clip(np.round(-lo / scale), 0, qmax)


def ref_quantize(x, scale, zp, qmin, qmax, axis):
    x = x.astype(np.float64)
    if axis is not None:
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return np.clip(np.round(x / scale) + zp, qmin, qmax), scale, zp


@pytest.mark.parametrize("bits", [2, 4, 7, 8])
def test_qrange(bits):
    assert qrange(bits, signed=True) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert qrange(bits, signed=False) == (0, 2 ** bits - 1)


@pytest.mark.parametrize("bits", [1, 9, 8.0])
def test_qrange_rejects_bad_bits(bits):
    with pytest.raises(ValueError):
        qrange(bits, signed=True)


@pytest.mark.parametrize("bits", [3, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_qparams_match_float64(bits, symmetric):
    g = torch.Generator().manual_seed(1)
    lo = -torch.rand(11, generator=g) * 3
    hi = torch.rand(11, generator=g) * 5
    lo[3], hi[5] = 0.7, -0.2  # ranges that do not contain 0: widened to include it
    scale, zp = qparams(lo, hi, bits=bits, symmetric=symmetric)
    rs, rz = ref_qparams(lo.numpy(), hi.numpy(), bits, symmetric)
    assert scale.dtype == torch.float32 and zp.dtype == torch.int32
    np.testing.assert_allclose(scale.numpy(), rs, rtol=1e-6)
    np.testing.assert_array_equal(zp.numpy(), rz)


def test_qparams_degenerate_range_gives_eps_not_nan():
    scale, zp = qparams(torch.zeros(3), torch.zeros(3), symmetric=True)
    assert torch.equal(scale, torch.full((3,), EPS))
    x = torch.zeros(3, 4)
    assert torch.equal(fake_quantize(x, scale, zp, -128, 127, axis=0), x)
    scale, zp = qparams(torch.tensor(0.0), torch.tensor(0.0), symmetric=False)
    assert float(scale) == EPS and int(zp) == 0


def test_qparams_asymmetric_represents_zero_exactly():
    scale, zp = qparams(torch.tensor(-0.37), torch.tensor(2.9), bits=8, symmetric=False)
    assert float(fake_quantize(torch.zeros(5), scale, zp, 0, 255).abs().max()) == 0.0


def test_qparams_rejects_non_finite():
    with pytest.raises(ValueError):
        qparams(torch.tensor(float("nan")), torch.tensor(1.0))


@pytest.mark.parametrize("axis", [None, 0, 1, -1])
@pytest.mark.parametrize("bits,signed", [(8, True), (8, False), (4, True), (5, False)])
def test_quantize_dequantize_match_float64(axis, bits, signed):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 7, generator=g) * 2 + 0.3  # odd shape
    reduce = tuple(d for d in range(3) if axis is None or d != axis % 3)
    lo, hi = x.amin(dim=reduce), x.amax(dim=reduce)
    scale, zp = qparams(lo, hi, bits=bits, symmetric=signed)
    qmin, qmax = qrange(bits, signed)
    q = quantize(x, scale, zp, qmin, qmax, axis=axis)
    rq, rs, rz = ref_quantize(x.numpy(), scale.numpy().astype(np.float64), zp.numpy(), qmin, qmax,
                              None if axis is None else axis % 3)
    # fp32 vs fp64 division can only disagree where x / scale is within rounding of a half.
    frac = np.abs(np.abs(x.numpy() / rs - np.floor(x.numpy() / rs)) - 0.5)
    differ = q.numpy() != rq
    assert not np.any(differ & (frac > 1e-4)), "codes differ from the float64 reference"
    assert q.dtype == torch.int32 and int(q.min()) >= qmin and int(q.max()) <= qmax
    dq = dequantize(q, scale, zp, axis=axis)
    np.testing.assert_allclose(dq.numpy(), (q.numpy() - rz) * rs, rtol=1e-6, atol=1e-7)
    # within range, the round trip error is at most half a step
    err = np.abs(dq.numpy() - x.numpy())
    assert np.all(err <= rs / 2 * (1 + 1e-5) + 1e-7)
    assert torch.equal(fake_quantize(x, scale, zp, qmin, qmax, axis=axis), dq)


def test_per_channel_parameter_count_is_checked():
    with pytest.raises(ValueError, match="per-channel"):
        quantize(torch.zeros(3, 4), torch.ones(4), torch.zeros(4, dtype=torch.int32), -128, 127, axis=0)


def test_fake_quantize_ste_values_and_gradient():
    x = torch.tensor([-3.0, -0.26, 0.0, 0.74, 1.0, 5.0], requires_grad=True)
    scale, zp = torch.tensor(0.01), torch.tensor(100, dtype=torch.int32)   # range [-1.0, 1.55]
    y = fake_quantize_ste(x, scale, zp, 0, 255)
    assert torch.equal(y.detach(), fake_quantize(x.detach(), scale, zp, 0, 255))
    y.sum().backward()
    # clipped straight-through: gradient 1 inside the representable range, 0 outside
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def test_fake_quantize_ste_per_channel_gradient_shape():
    w = torch.randn(5, 3, 2, requires_grad=True)
    scale, zp = qparams(w.detach().amin((1, 2)), w.detach().amax((1, 2)), symmetric=True)
    fake_quantize_ste(w, scale, zp, -128, 127, axis=0).pow(2).sum().backward()
    assert w.grad.shape == w.shape and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


def test_bias_codes_match_float64():
    g = torch.Generator().manual_seed(3)
    b, s_in, s_w = torch.randn(9, generator=g), torch.tensor(0.0123), torch.rand(9, generator=g) * 0.01 + 1e-3
    q, scale = quantize_bias(b, s_in, s_w)
    ref_scale = (np.float32(0.0123) * s_w.numpy()).astype(np.float32)
    np.testing.assert_array_equal(scale.numpy(), ref_scale)
    np.testing.assert_array_equal(q.numpy(), np.round(b.numpy().astype(np.float64) / ref_scale))
    assert torch.equal(fake_quantize_bias(b, s_in, s_w), q.float() * scale)


def test_sqnr():
    x = torch.tensor([1.0, -2.0, 3.0])
    assert sqnr_db(x, x) == math.inf
    assert sqnr_db(x, x + torch.tensor([0.1, 0.0, 0.0])) == pytest.approx(10 * math.log10(14 / 0.01), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# The same arithmetic as ONNX Runtime's QuantizeLinear / DequantizeLinear
# ---------------------------------------------------------------------------------------------
def _ort_qdq(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int | None):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    attrs = {} if axis is None else {"axis": axis}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs)]
    qtype = TensorProto.INT8 if zp.dtype == np.int8 else TensorProto.UINT8
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("q", qtype, list(x.shape)),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
        initializer=[numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zp, "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def test_fake_quant_per_tensor_uint8_equals_onnxruntime():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 9, 13, generator=g) * 3
    scale, zp = qparams(x.min(), x.max(), bits=8, symmetric=False)
    # exact half-way points and out-of-range values too
    x.view(-1)[:6] = torch.tensor([0.5, 1.5, -2.5, 100.0, -100.0, 0.0]) * scale
    q_ort, y_ort = _ort_qdq(x.numpy(), scale.numpy(), zp.numpy().astype(np.uint8), None)
    assert np.array_equal(quantize(x, scale, zp, 0, 255).numpy(), q_ort.astype(np.int32))
    assert np.array_equal(fake_quantize(x, scale, zp, 0, 255).numpy(), y_ort)


def test_fake_quant_per_channel_int8_axis1_equals_onnxruntime():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(5, 7, 3, generator=g) * torch.linspace(0.01, 4, 7).reshape(1, 7, 1)
    w[:, 2] = 0.0  # an all-zero channel
    scale, zp = qparams(w.amin((0, 2)), w.amax((0, 2)), bits=8, symmetric=True)
    q_ort, y_ort = _ort_qdq(w.numpy(), scale.numpy(), zp.numpy().astype(np.int8), 1)
    assert np.array_equal(quantize(w, scale, zp, -128, 127, axis=1).numpy(), q_ort.astype(np.int32))
    assert np.array_equal(fake_quantize(w, scale, zp, -128, 127, axis=1).numpy(), y_ort)


@pytest.mark.parametrize("shape", [(7,), (13, 29), (1536, 577)])
def test_sqnr_db_float32_path_within_1e_5_db_of_float64(shape):
    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(*shape, generator=g) * 3
    x_hat = x + 0.01 * torch.randn(*shape, generator=g)
    assert sqnr_db(x, x_hat, exact=False) == pytest.approx(sqnr_db(x, x_hat), abs=1e-5)
    assert sqnr_db(x, x, exact=False) == math.inf
