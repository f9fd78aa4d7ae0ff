"""Static int8 residual adds and activation matmuls (quant/functional.py + the quantize step's
``ops`` option): numerics against a float32/float64 reference, ONNX Runtime fusion (QLinearAdd,
integer MatMul) read from the optimized graph, ORT parity, rebuild, and what is skipped."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from nnsqueeze.context import Context
from nnsqueeze.quant.functional import QuantAdd, QuantMatMul, insert_quant_ops
from nnsqueeze.quant.observers import MinMaxObserver
from nnsqueeze.steps.quantize import Quantize


class ResidualCNN(nn.Module):
    """Two convs and a skip add (the add is the output)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1)

    def forward(self, x):
        y = self.c1(x)
        return y + self.c2(torch.relu(y))


class TinyAttention(nn.Module):
    """softmax(q @ k^T / sqrt(d)) @ v with Linear projections; (B, T, 7) -> (B, T, 6)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(7, 6), nn.Linear(7, 6), nn.Linear(7, 6)

    def forward(self, x):
        a = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2) / 6 ** 0.5, dim=-1)
        return torch.bmm(a, self.v(x))


def _quantize(model, calib, **cfg):
    ctx = Context(calib_data=calib)
    ctx.report.begin_step("quantize", {})
    step = Quantize(Quantize.Config(weights={"reduce_range": True}, **cfg))
    return step.run(model, ctx), step, ctx


def _ort(model, x, tmp_path):
    """Export (TorchScript QDQ, post-processed like the pipeline), run in ORT, and return
    (ORT output, op types of the graph ORT optimized, written with optimized_model_filepath)."""
    import onnx
    import onnxruntime as ort

    from nnsqueeze.export.onnx import export_onnx

    path = tmp_path / "m.onnx"
    export_onnx(model, path, x, verify=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    return torch.from_numpy(out), ops


def _calib(shape, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g), None) for _ in range(n)]


def test_default_ops_leave_the_model_a_plain_module():
    model, _, _ = _quantize(ResidualCNN().eval(), _calib((4, 3, 9, 11)))
    assert type(model) is ResidualCNN and not any(isinstance(m, QuantAdd) for m in model.modules())


def test_residual_add_runs_as_qlinearadd_in_ort(tmp_path):
    torch.manual_seed(0)
    model, step, ctx = _quantize(ResidualCNN().eval(), _calib((4, 3, 9, 11)), ops=["add"])
    assert step.record()["ops"] == {"fx": {"add": "add"}}
    add = model.get_submodule("nsq_add")
    assert isinstance(add, QuantAdd) and float(add.output_scale_) != 1.0  # calibrated
    x = torch.randn(3, 3, 13, 7, generator=torch.Generator().manual_seed(5))  # other (odd) shape
    with torch.no_grad():
        ref = model(x)
    got, ops = _ort(model, x, tmp_path)
    assert ops.count("QLinearAdd") == 1 and ops.count("QLinearConv") == 2
    step_out = float(add.output_scale_)
    assert float((got - ref).abs().max()) <= step_out * 1.0001  # within one output quantization step
    assert (got - ref).abs().gt(1e-6).float().mean() < 0.01      # and almost everywhere exact


def test_attention_matmuls_run_on_integer_codes_in_ort(tmp_path):
    torch.manual_seed(0)
    model, step, ctx = _quantize(TinyAttention().eval(), _calib((4, 5, 7)), ops=["matmul"])
    kinds = step.record()["ops"]["fx"]
    assert sorted(kinds.values()) == ["matmul", "matmul"]  # q @ k^T and a @ v (bmm)
    x = torch.randn(3, 9, 7, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x)
    got, ops = _ort(model, x, tmp_path)
    integer_mm = sum(ops.count(k) for k in ("MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger"))
    assert integer_mm == 5 and "MatMul" not in ops  # 3 Linears + 2 activation matmuls, none in float
    one_step = float(ref.max() - ref.min()) / 255
    assert float((got - ref).abs().max()) <= one_step


def test_quant_ops_match_a_float64_reference():
    """QuantAdd / QuantMatMul = dequant(quant(.)) with fp32 division and half-to-even rounding."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(5, 3, 7, generator=g) * 2, torch.randn(5, 7, 4, generator=g) + 0.5
    c = torch.randn(5, 3, 7, generator=g)
    mm, add = QuantMatMul(), QuantAdd()
    for m, args in ((mm, (a, b)), (add, (a, c))):
        m.start_calibration(lambda name: MinMaxObserver(name=name), "op")
        m(*args)
        m.finish_calibration()

    def fq(x, s, z):
        x32, s32 = x.numpy().astype(np.float32), np.float32(s)
        q = np.clip(np.rint(x32 / s32) + int(z), 0, 255)
        return (q - int(z)).astype(np.float64) * float(s32)

    x1, x2 = a * 1.3, b - 0.2  # values partly outside the calibrated ranges (clipped)
    want = fq(x1, mm.a_scale_, mm.a_zero_point_) @ fq(x2, mm.b_scale_, mm.b_zero_point_)
    assert np.allclose(mm(x1, x2).double().numpy(), want, atol=1e-5)
    s = fq(x1, add.a_scale_, add.a_zero_point_) + fq(c, add.b_scale_, add.b_zero_point_)
    want = fq(torch.from_numpy(s.astype(np.float32)), add.output_scale_, add.output_zero_point_)
    got = add(x1, c).double().numpy()
    # the float32 sum may land on the other side of a rounding tie than the float64 one: one step
    assert np.abs(got - want).max() <= float(add.output_scale_) * 1.0001
    assert np.mean(np.abs(got - want) > 1e-6) < 0.01


def test_rebuild_reproduces_the_graph_and_outputs():
    torch.manual_seed(1)
    fresh = ResidualCNN().eval()
    model, step, _ = _quantize(copy.deepcopy(fresh), _calib((4, 3, 9, 11)), ops=["add"])
    rebuilt = Quantize.rebuild(fresh, step.config, json.loads(json.dumps(step.record())))
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 3, 9, 11)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), model(x))


class _Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.bias = nn.Parameter(torch.randn(5))

    def forward(self, x):
        n = x.size(1) + x.size(0)     # two Python ints (fx nodes): found out at calibration
        m = x.size(0) + 1             # a Python constant operand
        y = self.fc(x) + self.bias    # a bias add, not a residual
        return (y + x) * n * m        # the residual add


def test_non_activation_ops_are_skipped_with_a_reason():
    model, step, ctx = _quantize(_Mixed().eval(), _calib((4, 5)), ops=["add"])
    assert list(step.record()["ops"]["fx"]) == ["add_3"]
    reasons = {s["layer"]: s["reason"] for s in ctx.report.skipped}
    assert "not two float tensors (int, int)" in reasons["add"]
    assert "Python constant (1)" in reasons["add_1"]
    assert "parameter/buffer 'bias'" in reasons["add_2"]
    x = torch.randn(3, 5)
    with torch.no_grad():  # the skipped ops compute in float as before: n * m = (5 + 3) * (3 + 1)
        want = model.nsq_add_3(model.fc(x) + model.bias, x) * 32
        assert torch.equal(model(x), want)


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            return self.fc(x) + x
        return x


def test_untraceable_model_is_reported_not_silent():
    model, step, ctx = _quantize(_Untraceable().eval(), _calib((4, 4)), ops=["add", "matmul"])
    assert type(model) is _Untraceable and "ops" in step.record() and not step.record()["ops"]
    (skip,) = [s for s in ctx.report.skipped if "_Untraceable" in s["layer"]]
    assert "does not trace with torch.fx" in skip["reason"]


def test_insert_quant_ops_rejects_unknown_rebuild_nodes():
    with pytest.raises(KeyError, match="not found"):
        insert_quant_ops(ResidualCNN(), ["add"], only={"add_7": "add"})


# ------------------------------------------------------------------------------------------------
# Activation formats other than uint8 (the step's `activations`): int8 symmetric, 4-bit, 16-bit
# ------------------------------------------------------------------------------------------------
class ConvAttention(nn.Module):
    """(B, 7, T) -> (B, T, 6): 1x1-conv projections (ORT keeps 16-bit-input convs in float on the
    exact values, unlike DQ->MatMul weights, which it may fuse into MatMulNBits), q @ k, p @ v and
    a residual add."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Conv1d(7, 6, 1), nn.Conv1d(7, 6, 1), nn.Conv1d(7, 6, 1)

    def forward(self, x):
        q = self.q(x).transpose(1, 2)
        p = torch.softmax(q @ self.k(x) / 6 ** 0.5, dim=-1)
        return torch.bmm(p, self.v(x).transpose(1, 2)) + q


SCHEMES = [{"bits": 8, "symmetric": True}, {"bits": 4, "symmetric": True}, {"bits": 4}, {"bits": 16}]


@pytest.mark.parametrize("acts", SCHEMES, ids=["s8", "s4", "u4", "u16"])
def test_ops_follow_the_activation_format_in_ort(acts, tmp_path):
    from nnsqueeze.quant.act_scheme import ActScheme

    torch.manual_seed(0)
    model, step, ctx = _quantize(ConvAttention().eval(), _calib((4, 7, 5)), ops=["add", "matmul"],
                                 activations=acts)
    scheme = ActScheme(**acts)
    rec = step.record()["ops"]
    assert sorted(rec["fx"].values()) == ["add", "matmul", "matmul"] and rec["act_scheme"] == scheme.to_dict()
    assert not any("uint8 per-tensor codes" in n["note"] for n in ctx.report.notes)
    mods = [m for m in model.modules() if isinstance(m, (QuantAdd, QuantMatMul))]
    assert len(mods) == 3 and all(m.ascheme == scheme for m in mods)
    x = torch.randn(3, 7, 9, generator=torch.Generator().manual_seed(2))  # other (odd) shape
    with torch.no_grad():
        ref = model(x)
    got, ops = _ort(model, x, tmp_path)
    if scheme.bits <= 8:  # ORT runs the ops on the integer codes
        assert ops.count("QLinearAdd") == 1 and "MatMul" not in ops and "FusedMatMul" not in ops
    else:  # 16 bits: no integer kernel, float ops on the exact dequantized values (said so)
        assert "QLinearAdd" not in ops and any(t in ops for t in ("MatMul", "FusedMatMul"))
        assert any("no 16-bit add/matmul kernels" in n["note"] for n in ctx.report.notes)
    out_step = float(model.nsq_add.output_scale_)
    ulps = 4 * torch.finfo(torch.float32).eps * float(ref.abs().max())  # float32 rounding of (q - z) * s
    assert float((got - ref).abs().max()) <= out_step + ulps  # within one output quantization step
    # and almost everywhere exact: 16-bit steps are 256x finer, so ORT's and torch's float32
    # summation orders (1e-7 relative) put more values on the other side of a rounding boundary
    flips = float((got - ref).abs().gt(out_step / 2).float().mean())
    assert flips < (0.02 if scheme.bits <= 8 else 0.1)


@pytest.mark.parametrize("acts", SCHEMES, ids=["s8", "s4", "u4", "u16"])
def test_op_codes_match_a_float64_reference(acts):
    """Each op input's codes = clip(round(x / s) + z, qmin, qmax), computed in float64, on inputs
    partly outside the calibrated range (so both ends of the code range are hit)."""
    from nnsqueeze.quant.act_scheme import ActScheme

    scheme = ActScheme(**acts)
    qmin, qmax = scheme.qrange
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(5, 3, 7, generator=g) * 2, torch.randn(5, 7, 4, generator=g) + 0.5
    mm, add = QuantMatMul(scheme), QuantAdd(scheme)
    for m, args in ((mm, (a, b)), (add, (a, a.flip(0)))):
        m.start_calibration(lambda name: MinMaxObserver(name=name), "op")
        m(*args)
        m.finish_calibration()
    if scheme.symmetric:
        assert int(mm.a_zero_point_) == 0 and int(add.output_zero_point_) == 0
    x = a * 4  # beyond the calibrated ranges (inputs and their sum): clipped codes
    for n in ("a", "output"):
        s, z = add._buffers[f"{n}_scale_"], add._buffers[f"{n}_zero_point_"]
        assert qmin <= int(z) <= qmax
        y = add._fq(x, n).double()
        codes = torch.round(y / s.double()) + int(z)  # exact: y = (q - z) * s in float32
        want = np.clip(np.rint(x.double().numpy() / np.float64(s)) + int(z), qmin, qmax)
        near_tie = np.abs(np.abs(x.double().numpy() / np.float64(s)) % 1 - 0.5) < 1e-4
        assert np.array_equal(codes.numpy()[~near_tie], want[~near_tie])
        assert codes.min() >= qmin and codes.max() <= qmax
        assert codes.min() == qmin or codes.max() == qmax  # the clipping is exercised
    # the product: of the float64 reference dequantized operands, (q - z) * s
    def deq(t, n):
        s, z = float(mm._buffers[f"{n}_scale_"]), int(mm._buffers[f"{n}_zero_point_"])
        return (np.clip(np.rint(t.double().numpy() / np.float64(np.float32(s))) + z, qmin, qmax) - z) * s
    want = deq(x, "a") @ deq(b, "b")
    assert np.allclose(mm(x, b).double().numpy(), want, rtol=1e-5, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("acts", [SCHEMES[0], SCHEMES[1], SCHEMES[3]], ids=["s8", "s4", "u16"])
def test_ops_format_survives_artifact_save_and_reload(acts, tmp_path):
    import nnsqueeze as nsq
    from nnsqueeze import artifact

    torch.manual_seed(1)
    fresh = ConvAttention().eval()
    res = nsq.compress(copy.deepcopy(fresh), {"steps": [{"quantize": {"ops": ["add", "matmul"], "activations": acts}}],
                                              "evaluate": {"warmup": 1, "runs": 2, "per_step": False}},
                       calib_data=_calib((4, 7, 5)), progress=False)
    out = res.save(tmp_path / "art")
    again = artifact.load(out, copy.deepcopy(fresh))
    assert [type(m).__name__ for m in again.modules() if isinstance(m, (QuantAdd, QuantMatMul))] == \
        [type(m).__name__ for m in res.model.modules() if isinstance(m, (QuantAdd, QuantMatMul))]
    assert all(m.ascheme.to_dict() == acts | {"symmetric": acts.get("symmetric", False)}
               for m in again.modules() if isinstance(m, (QuantAdd, QuantMatMul)))
    x = torch.randn(2, 7, 11, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(again(x), res.model(x))
        assert not torch.equal(again(x), fresh(x))
