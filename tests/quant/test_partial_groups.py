"""Per-group static weights whose row length D (C_in/groups * k) is not a multiple of group_size:
each output channel is cut into ceil(D / g) groups, the last one shorter, with its own scale (and zero
point) from its own values only. Checked against an independent float64 per-group quantizer (closed
form, numpy), for packing (bit-exact), MSE clipping, LSQ gradients, ONNX Runtime and `nsq.compress`."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from nnsqueeze.export.onnx import export_onnx
from nnsqueeze.export.ort import OrtModule
from nnsqueeze.ops.int4 import unpack_int4
from nnsqueeze.ops.rtn import row_qparams
from nnsqueeze.quant.modules import convert_
from nnsqueeze.quant.observers import MinMaxObserver
from nnsqueeze.quant.scheme import WeightScheme as W
from tests.export.test_lowbit_onnx import CODE_TYPES, decode

RTOL = 2e-6
EPS32 = float(np.finfo(np.float32).eps)


def ref_groups(w: np.ndarray, g: int, bits: int, sym: bool) -> tuple[np.ndarray, np.ndarray]:
    """Float64 per-group quantizer: each output channel's D values in chunks of g (last one shorter),
    range widened to 0, scale rounded to float32 as stored, round half even, clamp.
    Returns (fake-quantized weight, scales (C_out, G))."""
    rows = w.reshape(w.shape[0], -1).astype(np.float64)
    d = rows.shape[1]
    out, scales = np.empty_like(rows), []
    for o in range(rows.shape[0]):
        s_row = []
        for a in range(0, d, g):
            x = rows[o, a:a + g]
            lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
            if sym:
                qmax = 2 ** (bits - 1) - 1
                s = float(np.float32(max(max(-lo, hi) / qmax, EPS32)))
                out[o, a:a + g] = np.clip(np.rint(x / s), -qmax - 1, qmax) * s
            else:
                qmax = 2 ** bits - 1
                s = float(np.float32(max((hi - lo) / qmax, EPS32)))
                z = np.clip(np.rint(-lo / s), 0, qmax)
                out[o, a:a + g] = (np.clip(np.rint(x / s) + z, 0, qmax) - z) * s
            s_row.append(s)
        scales.append(s_row)
    return out.reshape(w.shape), np.array(scales)


# (layer, input, group size): D = 300 (128+128+44), 21 (8+8+5), depthwise 9 (4+4+1), grouped 18 (8+8+2)
LAYERS = {
    "linear300": (lambda: nn.Linear(300, 7), (16, 300), 128),
    "conv1d21": (lambda: nn.Conv1d(3, 5, 7), (16, 3, 12), 8),
    "depthwise": (lambda: nn.Conv2d(5, 5, 3, groups=5), (8, 5, 6, 7), 4),
    "grouped": (lambda: nn.Conv2d(6, 9, 3, groups=3, padding=1), (8, 6, 5, 5), 8),
}
CASES = [("linear300", 4, True), ("linear300", 4, False), ("conv1d21", 4, True), ("conv1d21", 3, False),
         ("depthwise", 4, True), ("depthwise", 2, False), ("grouped", 4, False), ("grouped", 8, True)]


def make(kind: str, bits: int, sym: bool, seed: int = 0, **extra):
    torch.manual_seed(seed)
    ctor, xshape, g = LAYERS[kind]
    layer, x = ctor(), torch.randn(*xshape)
    with torch.no_grad():  # heavy tails so that groups differ in range
        layer.weight.copy_(torch.randn_like(layer.weight) ** 3)
    w = layer.weight.detach().numpy().copy()
    convert_(layer, quant_output=False,
             scheme=W(bits=bits, symmetric=sym, granularity="per-group", group_size=g, **extra))
    layer.start_calibration(MinMaxObserver, kind)
    with torch.no_grad():
        layer(x)
    layer.finish_calibration()
    return nn.Sequential(layer).eval(), x, w, g


@pytest.mark.parametrize("kind,bits,sym", CASES)
def test_fake_quant_matches_per_group_reference(kind, bits, sym):
    model, _, w, g = make(kind, bits, sym)
    layer = model[0]
    d = w[0].size
    n_groups, length, pad = layer.weight_groups()
    assert (n_groups, length, pad) == (-(-d // g), g, n_groups * g - d) and pad > 0
    ref, ref_s = ref_groups(w, g, bits, sym)
    np.testing.assert_allclose(layer.fake_quant_weight().detach().double().numpy(), ref, rtol=1e-6, atol=1e-7)
    got_s = layer.weight_scale_.double().numpy().reshape(w.shape[0], n_groups)
    np.testing.assert_allclose(got_s, ref_s, rtol=1e-6)
    # the short group's scale is its own: not the channel's, nor a flat reshape's across channels
    rows = w.reshape(w.shape[0], -1)
    tail = rows[:, (n_groups - 1) * g:]
    absmax_ch = np.abs(rows).max(1)
    own = np.abs(tail).max(1) < absmax_ch
    assert own.any() and np.all(got_s[own, -1] < absmax_ch[own] / (2 ** (bits - 1) - 1 if sym else 2 ** bits - 1))
    codes = layer.weight_codes()
    assert codes.shape == layer.weight.shape


@pytest.mark.parametrize("kind,bits,sym", CASES)
def test_pack_unpack_bit_exact(kind, bits, sym):
    model, _, _, _ = make(kind, bits, sym)
    layer = model[0]
    sd = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.pack_state(sd, "")
    n = layer.weight.numel()
    assert sd["weight"].numel() == ((n + 1) // 2 if bits <= 4 else n)   # one code per real weight, no padding
    layer.unpack_state(sd, "")
    assert torch.equal(sd["weight"], layer.fake_quant_weight().detach())


@pytest.mark.parametrize("kind,bits,sym", CASES)
def test_ort_matches_torch_and_stores_real_codes(kind, bits, sym, tmp_path):
    model, x, w, g = make(kind, bits, sym)
    layer = model[0]
    path = tmp_path / "m.onnx"
    export_onnx(model, path, x[:5], samples=[x[5:]])
    with torch.no_grad():
        ref = model(x)
    got = OrtModule(str(path))(x)
    assert float((got - ref).abs().max()) <= RTOL * max(1.0, float(ref.abs().max()))
    # two code blocks: full groups (C_out*(G-1), g) and partial last groups (C_out, r); no padding codes
    c_out, d = w.shape[0], w[0].size
    n_groups = -(-d // g)
    r = d - (n_groups - 1) * g
    proto = onnx.load(str(path))
    inits = {t.name: t for t in proto.graph.initializer if t.data_type in CODE_TYPES and len(t.dims) == 2}
    by_shape = {tuple(t.dims): t for t in inits.values()}
    assert set(by_shape) == {(c_out * (n_groups - 1), g), (c_out, r)}
    full = decode(by_shape[(c_out * (n_groups - 1), g)]).reshape(c_out, -1)
    tail = decode(by_shape[(c_out, r)]).reshape(c_out, r)
    codes = np.concatenate([full, tail], 1).reshape(-1)
    # bit-exact against the artifact's packed codes
    sd = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.pack_state(sd, "")
    if bits <= 4:
        art = unpack_int4(sd["weight"], layer.weight.numel()).numpy().astype(np.int64) + layer.weight_qrange[0]
    else:
        art = sd["weight"].numpy().reshape(-1).astype(np.int64)
    np.testing.assert_array_equal(codes, art)


def test_nonuniform_levels_with_partial_groups(tmp_path):
    """nf4 / kmeans: row absmax of each group (the short one too); kmeans levels learned from real weights only."""
    for levels in ("nf4", "kmeans"):
        model, x, w, g = make("conv1d21", 4, True, levels=levels)
        layer = model[0]
        rows = w.reshape(w.shape[0], -1)
        absmax = np.array([[np.abs(rows[o, a:a + g]).max() for a in range(0, rows.shape[1], g)]
                           for o in range(rows.shape[0])])
        np.testing.assert_allclose(layer.weight_scale_.numpy().reshape(absmax.shape), absmax, rtol=1e-7)
        if levels == "kmeans":  # the table is learned from the real weights (each over its group's absmax) only
            from nnsqueeze.ops.kmeans import kmeans1d

            norm = np.concatenate([rows[o, a:a + g] / np.abs(rows[o, a:a + g]).max()
                                   for o in range(rows.shape[0]) for a in range(0, rows.shape[1], g)])
            cent, _ = kmeans1d(torch.from_numpy(norm.astype(np.float32)), 16, init="linear")
            np.testing.assert_allclose(layer.weight_levels_.numpy(), np.sort(cent.numpy()), rtol=1e-6, atol=1e-7)
        export_onnx(model, tmp_path / f"{levels}.onnx", x[:5], samples=[x[5:]])
        with torch.no_grad():
            ref = model(x)
        got = OrtModule(str(tmp_path / f"{levels}.onnx"))(x)
        assert float((got - ref).abs().max()) <= RTOL * max(1.0, float(ref.abs().max()))
        sd = {k: v.clone() for k, v in layer.state_dict().items()}
        layer.pack_state(sd, "")
        layer.unpack_state(sd, "")
        assert torch.equal(sd["weight"], layer.fake_quant_weight().detach())


def test_mse_clip_uses_the_short_groups_own_values():
    model, _, w, g = make("linear300", 3, True, clip="mse")
    layer = model[0]
    rows = torch.from_numpy(w.reshape(w.shape[0], -1))
    n_groups = -(-rows.shape[1] // g)
    got = layer.weight_scale_.reshape(w.shape[0], n_groups)
    full = rows[:, :(n_groups - 1) * g].reshape(-1, g)
    tail = rows[:, (n_groups - 1) * g:]
    s_full, _ = row_qparams(full, 3, True, clip_grid=20, clip_min=0.3)   # clip: mse's search
    s_tail, _ = row_qparams(tail, 3, True, clip_grid=20, clip_min=0.3)
    assert torch.equal(got[:, :-1].reshape(-1), s_full) and torch.equal(got[:, -1], s_tail)
    # and the search clipped something (a ratio < 1 somewhere), so this is not plain minmax
    minmax = torch.maximum(-tail.amin(1).clamp(max=0), tail.amax(1).clamp(min=0)) / 3
    assert bool((s_tail < minmax * (1 - 1e-6)).any())


def test_lsq_step_gradient_of_the_short_group_comes_from_its_own_values():
    from nnsqueeze.steps.qat import add_lsq_

    model, x, w, g = make("conv1d21", 4, False)
    layer = model[0].train()
    add_lsq_(layer)
    torch.manual_seed(1)
    c = torch.randn_like(layer.weight)
    (layer.fake_quant_weight() * c).sum().backward()
    # float64 reference of LSQ's step gradient, group by group over real weights only
    s = layer.weight_step.detach().double().numpy().reshape(w.shape[0], -1)
    z = layer.weight_zero_point_.double().numpy().reshape(w.shape[0], -1)
    qmax = 15
    gscale = 1.0 / np.sqrt(layer.weight.numel() / layer.weight_scale_.numel() * qmax)
    rows, cr = w.reshape(w.shape[0], -1).astype(np.float64), c.double().numpy().reshape(w.shape[0], -1)
    ref = np.zeros_like(s)
    for o in range(rows.shape[0]):
        for j, a in enumerate(range(0, rows.shape[1], g)):
            v = rows[o, a:a + g] / s[o, j]
            q = np.rint(v) + z[o, j]
            d = np.where(q < 0, -z[o, j], np.where(q > qmax, qmax - z[o, j], np.rint(v) - v))
            ref[o, j] = (cr[o, a:a + g] * d).sum() * gscale
    np.testing.assert_allclose(layer.weight_step.grad.double().numpy().reshape(ref.shape), ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("adaround", [None, {"iters": 30, "samples": 32}])
def test_compress_w4_g128_on_a_300_wide_linear(adaround, tmp_path):
    import nnsqueeze as nsq

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 40), nn.ReLU(), nn.Linear(40, 7)).eval()
    data = [(torch.randn(32, 300), torch.randint(0, 7, (32,))) for _ in range(2)]
    weights = {"bits": 4, "granularity": "per-group", "group_size": 128}
    if adaround:
        weights["adaround"] = adaround
    recipe = {"version": 1, "steps": [{"quantize": {"weights": weights}}],
              "evaluate": {"warmup": 0, "runs": 1, "threads": 1, "per_step": False}}
    res = nsq.compress(model, recipe, calib_data=data, eval_data=data[:1], progress=False)
    figs = next(s for s in res.report["steps"] if s["name"] == "quantize")["figures"]
    assert figs["scheme"].startswith("w4 g128 sym")                     # the real scheme, no per-channel fallback
    assert not any("group_size" in n["note"] for n in res.report["notes"])
    if adaround:
        assert "adaround_layers" in figs
    exp = res.report["export"]["compressed"]
    assert exp["max_abs_diff"] <= exp["tolerance"]                      # the pipeline's ORT parity check
    assert exp["lowbit_weights"] == {"int4": 2}
    layer = res.model[0]
    assert layer.weight_groups() == (3, 128, 84) and layer.weight_scale_.numel() == 40 * 3
    # ORT == torch on the compressed model, bit for bit up to float32 summation order
    (tmp_path / "c.onnx").write_bytes(res.onnx)
    x = data[0][0]
    with torch.no_grad():
        ref = res.model.eval()(x)
    assert float((OrtModule(str(tmp_path / "c.onnx"))(x) - ref).abs().max()) <= RTOL * max(1.0, float(ref.abs().max()))


def test_qat_grid_distance_ignores_the_padding():
    from nnsqueeze.steps.qat import grid_distance

    model, _, w, g = make("depthwise", 3, True)
    layer = model[0]
    with torch.no_grad():  # move the weights off the grid (scales stay)
        per_weight = layer.weight_scale_.reshape(5, -1).repeat_interleave(g, 1)[:, :9]
        layer.weight.add_(0.37 * per_weight.reshape(layer.weight.shape))
    s = layer.weight_scale_.double().numpy().reshape(5, -1).repeat(g, 1)[:, :9]
    wr = layer.weight.detach().double().numpy().reshape(5, 9)
    q = np.clip(np.rint(wr / s), -4, 3) * s
    ref = (((wr - q) / s) ** 2).mean()   # over the 45 real weights only
    np.testing.assert_allclose(float(grid_distance(layer).detach()), ref, rtol=1e-5)


def test_adaround_on_padded_rows_counts_real_weights_only():
    from nnsqueeze.ops.adaround import adaround
    from nnsqueeze.ops.quant import quantize

    model, x, w, g = make("conv1d21", 3, True)
    layer = model[0]
    ref_w = layer.weight.detach().clone()
    with torch.no_grad():
        target = nn.functional.conv1d(x, ref_w, layer.bias)
    rows, mask = layer.weight_rows(ref_w), layer.weight_row_mask()
    assert rows.shape == (5 * 3, 8) and int(mask.sum()) == ref_w.numel()
    assert torch.equal(rows[~mask], torch.zeros(int((~mask).sum())))  # padding: zeros, dropped again below

    def fn(w_rows, xb):
        return nn.functional.conv1d(xb, layer.weight_from_rows(w_rows), layer.bias)

    res = adaround(rows, layer.weight_scale_, layer._weight_zp(), -4, 3, fn, x, target, iters=60, lr=5e-2, mask=mask)
    nearest = quantize(rows, layer.weight_scale_, layer._weight_zp(), -4, 3, axis=0)
    assert res.flipped == pytest.approx(float((res.codes != nearest)[mask].float().mean()))
    assert res.error <= res.nearest_error
    layer.set_weight_codes_(res.codes)   # (R, L) rows with padding -> the weight, bit-exact on the grid
    assert torch.equal(layer.weight_codes().to(torch.int32), layer.weight_from_rows(res.codes))
