"""Activation formats of static quantization: 2..8 or 16 bits, signed (symmetric) or unsigned codes.

For each format: ONNX Runtime computes the torch simulation (within one step of the output grid),
the simulated codes stay in ``[qmin, qmax]`` (against a float64 reference quantizer), observers
give closed-form qparams on non-8-bit ranges, the artifact reloads bit-exactly, bad configs are
RecipeErrors, and LSQ (QAT) keeps codes in range while training.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from nnsqueeze.artifact import pack_state, unpack_state
from nnsqueeze.context import Context
from nnsqueeze.errors import RecipeError
from nnsqueeze.export.onnx import export_onnx
from nnsqueeze.export.ort import OrtModule
from nnsqueeze.isa import u8s8_saturates
from nnsqueeze.quant.act_scheme import ActScheme, act_qrange
from nnsqueeze.quant.modules import fake_quant_modules
from nnsqueeze.recipe import Recipe
from nnsqueeze.registry import OBSERVERS
from nnsqueeze.steps.qat import Qat, finalize_qat_
from nnsqueeze.steps.quantize import Quantize

FORMATS = [  # (bits, symmetric)
    (8, False), (8, True), (4, False), (4, True), (3, False), (3, True), (2, False), (16, False), (16, True)]


def fmt_id(f):
    return f"{'s' if f[1] else 'u'}{f[0]}"


def quantize(model, data, **cfg):
    # 8-bit weight codes, 7-bit where this CPU's ORT u8s8 kernels saturate (the parity check needs it)
    cfg.setdefault("weights", {}).setdefault("reduce_range", u8s8_saturates())
    ctx = Context(calib_data=data, progress=False)
    ctx.report.begin_step("quantize", {})
    step = Quantize(Quantize.Config.model_validate(cfg))
    return step.run(model, ctx), step, ctx


def capture_codes(model, x):
    """Simulated codes ``xq / s + z`` (float64) of every layer's quantized input and output, next to
    a float64 reference quantizer of the same float values: [(name, codes, reference, qmin, qmax)]."""
    rows, hooks = [], []

    def hook(mod, args, out, name):
        a = args[0].detach()
        for which, v, qv in (("input", a, mod._quant_act(a, "input").detach()),
                             ("output", None, out.detach() if mod.quant_output else None)):
            if qv is None:
                continue
            s = mod._buffers[f"{which}_scale_"].double()
            z = mod._buffers[f"{which}_zero_point_"].double()
            qmin, qmax = mod.act_qrange
            codes = qv.double() / s + z
            if v is None:  # the output's float value before quantization is not exposed: check the grid only
                ref = None
            else:
                ref = torch.clamp(torch.round(v.double() / s) + z, qmin, qmax)
            rows.append((f"{name} {which}", codes, ref, qmin, qmax))

    for name, m in fake_quant_modules(model):
        hooks.append(m.register_forward_hook(lambda mod, a, o, n=name: hook(mod, a, o, n)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return rows


@pytest.mark.ort_isa
@pytest.mark.parametrize("fmt", FORMATS, ids=fmt_id)
def test_ort_matches_simulation_and_codes_stay_in_range(tmp_path, tiny_cnn, toy_data, fmt):
    bits, sym = fmt
    fresh = copy.deepcopy(tiny_cnn)
    model, step, ctx = quantize(tiny_cnn, toy_data["calib"], activations={"bits": bits, "symmetric": sym})
    qmin, qmax = act_qrange(bits, sym)
    for name, m in fake_quant_modules(model):
        assert m.ascheme == ActScheme(bits, sym) and f"a{bits} per-tensor {'sym' if sym else 'asym'}" in repr(m)
        assert ctx.report.layers[name]["act_bits"] == bits
        if sym:
            assert int(m.input_zero_point_) == 0
    # 2.5x the calibration amplitude: activations leave the calibrated range, so codes saturate.
    xs = [2.5 * b[0] for b in toy_data["eval"]]
    figs = export_onnx(model, tmp_path / "m.onnx", xs[0], samples=xs[1:])  # the pipeline's parity check
    if bits <= 8:  # 8-bit containers keep ORT's integer kernels on the convs and the last Linear
        assert figs["ort_int8_ops"].get("QLinearConv") == 2 and figs["ort_int8_ops"].get("QGemm", 0) >= 1
    else:
        assert not figs["ort_int8_ops"] and any("16-bit activations" in str(n) for n in ctx.report.notes)
    ort = OrtModule((tmp_path / "m.onnx").read_bytes())
    saturated = 0
    for x in xs:
        with torch.no_grad():
            ref = model(x)
        one_step = float(ref.max() - ref.min()) / (qmax - qmin)  # one step of the output on this grid
        assert float((ort(x) - ref).abs().max()) <= one_step
        for where, codes, refc, lo, hi in capture_codes(model, x):
            on_grid = torch.round(codes)
            assert float((codes - on_grid).abs().max()) < 1e-2, where  # integer codes...
            assert lo == qmin and hi == qmax and on_grid.min() >= qmin and on_grid.max() <= qmax, where  # ...in range
            saturated += int((on_grid == qmax).any() and where.endswith("input"))
            if refc is not None:
                # float64 reference: equal but near .5 ties, where the fp32 division (ORT's and the
                # simulation's) errs by up to |code| * 2**-24 <= 2**(bits - 24): at most that window's share
                diff = (on_grid - refc).abs()
                ties = max(1e-3, 2.0 ** (bits - 23))
                assert float(diff.max()) <= 1 and float((diff > 0).double().mean()) <= ties, where
    assert saturated > 0  # some layer input was clipped at qmax (and ORT still agreed)
    # artifact: pack, JSON record, rebuild on a fresh model, unpack -> identical outputs
    sd = pack_state(model)
    rebuilt = Quantize.rebuild(fresh, Quantize.Config.model_validate(json.loads(step.config.model_dump_json())),
                               json.loads(json.dumps(step.record())))
    rebuilt.load_state_dict(unpack_state(rebuilt, sd), strict=True)
    rebuilt.eval()
    for name, m in fake_quant_modules(rebuilt):
        assert m.ascheme == ActScheme(bits, sym), name
    with torch.no_grad():
        assert torch.equal(rebuilt(xs[0]), model(xs[0]))


def test_layer_activations_override_and_old_records(tiny_cnn, toy_data):
    fresh, fresh2 = copy.deepcopy(tiny_cnn), copy.deepcopy(tiny_cnn)
    model, step, ctx = quantize(tiny_cnn, toy_data["calib"], activations={"bits": 4, "symmetric": True},
                                layer_activations={"classifier.3": {"bits": 16}})
    assert model.classifier[3].ascheme == ActScheme(16, False) and model.features[3].ascheme == ActScheme(4, True)
    assert ctx.report.layers["classifier.3"]["scheme"].endswith("a16 per-tensor asym")
    assert ctx.report.layers["classifier.3"]["ort_kernels"].startswith("float")
    assert "a4 per-tensor sym + a16 per-tensor asym" in ctx.report.steps[0]["figures"]["scheme"]
    # records written before activation formats existed rebuild as uint8
    rec = json.loads(json.dumps(step.record()))
    for v in rec["layers"].values():
        del v["act_scheme"]  # recorded only for formats other than uint8
    old = Quantize.rebuild(fresh, step.config, rec)
    assert all(m.ascheme == ActScheme() for _, m in fake_quant_modules(old))
    with pytest.raises(RecipeError, match="not quantized layers"):
        quantize(fresh2, toy_data["calib"], layer_activations={"nope": {"bits": 8}})


@pytest.mark.parametrize("bits", [9, 1, 17, 0])
def test_bad_activation_bits_name_field_and_fix(bits):
    with pytest.raises(RecipeError) as e:
        Recipe.from_dict({"version": 1, "steps": [{"quantize": {"activations": {"bits": bits}}}]})
    assert e.value.where.endswith("quantize.activations.bits")
    assert "16" in e.value.fix and "8" in e.value.fix
    with pytest.raises(RecipeError) as e:
        Recipe.from_dict({"version": 1, "steps": [{"quantize": {"layer_activations": {"fc": {"bits": bits}}}}]})
    assert e.value.where.endswith("layer_activations.fc.bits") and "16" in e.value.fix
    with pytest.raises(ValueError, match="2..8 or 16"):
        ActScheme(bits=bits)


def test_observer_qparams_on_non_8bit_ranges_match_closed_forms():
    x = torch.linspace(-1.0, 3.0, 4001)
    for method in ("minmax", "ema-minmax"):
        obs = OBSERVERS.get(method)(name="x")
        obs.observe(x)
        s, z = obs.qparams(bits=4, symmetric=False)  # [-1, 3] on 0..15: 4/15, zp round(3.75)
        assert abs(float(s) - 4 / 15) < 1e-7 and int(z) == 4
        s, z = obs.qparams(bits=3, symmetric=True)  # absmax 3 on -4..3: scale 1
        assert abs(float(s) - 1.0) < 1e-7 and int(z) == 0
        s, z = obs.qparams(bits=16, symmetric=False)  # 4/65535, zp round(16383.75)
        assert abs(float(s) - 4 / 65535) < 1e-12 and int(z) == 16384
        s, z = obs.qparams(bits=16, symmetric=True)
        assert abs(float(s) - 3 / 32767) < 1e-12 and int(z) == 0
    # percentile: the 99.9 % quantile of |x| (numpy float64) over 2**(4-1) - 1 = 7
    u = torch.linspace(-1.0, 1.0, 20001)
    obs = OBSERVERS.get("percentile-99.9")(name="u")
    obs.observe(u)
    s, _ = obs.qparams(bits=4, symmetric=True)
    assert abs(float(s) - np.quantile(np.abs(u.double().numpy()), 0.999) / 7) < 1e-6
    # MSE on U(0, 1), unsigned b bits, L = 2**b - 1 steps over [0, a]: granular a * (a / L)**2 / 12 plus
    # clipped (1 - a)**3 / 3 is smallest at a = 2L / (2L + 1)
    v = torch.linspace(0.0, 1.0, 100001)
    for bits in (3, 4):
        obs = OBSERVERS.get("mse")(name="v")
        obs.observe(v)
        s, z = obs.qparams(bits=bits, symmetric=False)
        levels = (1 << bits) - 1
        a = 2 * levels / (2 * levels + 1)
        assert int(z) == 0 and abs(float(s) * levels - a) < 4e-3, (bits, float(s) * levels, a)
    # KL at 16 bits: 32768 levels outnumber the 2048 histogram bins, nothing is clipped
    obs = OBSERVERS.get("kl")(name="u")
    obs.observe(u)
    s, z = obs.qparams(bits=16, symmetric=True)
    assert abs(float(s) - 1.0 / 32767) < 1e-12 and int(z) == 0


@pytest.mark.ort_isa
def test_qat_lsq_with_signed_4bit_activations_keeps_codes_in_range(tmp_path, tiny_cnn, toy_data):
    ctx = Context(train_data=toy_data["train"], calib_data=toy_data["calib"], progress=False)
    ctx.report.begin_step("qat", {})
    step = Qat(Qat.Config.model_validate({"weights": {"reduce_range": u8s8_saturates()}, "lsq": True,
                                          "activations": {"bits": 4, "symmetric": True}}))
    model = step.run(tiny_cnn, ctx)
    qmin, qmax = act_qrange(4, True)
    first = model.features[0].input_step.detach().clone()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for x, y in toy_data["train"][:4]:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(model.features[0].input_step.detach(), first)  # the step size learns
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: seen.append((n, mod, a[0].detach())))
             for n, m in fake_quant_modules(model)]
    model(2.5 * toy_data["eval"][0][0])
    for h in hooks:
        h.remove()
    for name, m, xin in seen:
        with torch.no_grad():
            xq = m._quant_act(xin, "input")  # training mode: LSQ
        codes = xq.double() / m.input_step.detach().abs().double() + m.input_zero_point_.double()
        on_grid = codes.round()
        assert float((codes - on_grid).abs().max()) < 1e-3 and on_grid.min() >= qmin and on_grid.max() <= qmax
        assert (on_grid == qmax).any() or (on_grid == qmin).any(), name  # saturation exercised
    finalize_qat_(model, step.record())
    model.eval()
    xs = [b[0] for b in toy_data["eval"]]
    figs = export_onnx(model, tmp_path / "q.onnx", xs[0], samples=xs[1:])
    assert figs["ort_int8_ops"].get("QLinearConv") == 2
    ort = OrtModule((tmp_path / "q.onnx").read_bytes())
    with torch.no_grad():
        ref = model(xs[0])
    assert float((ort(xs[0]) - ref).abs().max()) <= float(ref.max() - ref.min()) / (qmax - qmin)


def test_sixteen_bit_linear_on_3d_inputs_is_not_requantized_by_ort(tmp_path):
    """A 3-D Linear exports as MatMul; with an int8-coded weight ORT would fuse it into MatMulNBits,
    which re-quantizes the 16-bit input to 8 bits (1 output step off). The float weight is exact."""
    import nnsqueeze as nsq
    from nnsqueeze.export.onnx import export_onnx

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(37, 29), nn.ReLU(), nn.Linear(29, 5)).eval()
    x = torch.randn(16, 5, 37)
    res = nsq.compress(m, {"version": 1, "steps": [{"quantize": {"activations": {"bits": 16}}}]},
                       calib_data=[(x, None)], example_inputs=x[:4], metric=None, progress=False)
    fig = export_onnx(res.model, tmp_path / "m.onnx", x[:4], samples=[x[4:]])
    assert "MatMulNBits" not in fig["ort_int8_ops"]
    assert fig["max_abs_diff"] < 1e-5  # float kernels on identical 16-bit values and grid weights
