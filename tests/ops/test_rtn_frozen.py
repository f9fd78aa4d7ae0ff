"""TEMPORARY: the old group-wise RTN implementations (frozen verbatim copies of ops/int4.py,
llm/rtn.py, quant/modules.py + ops/quant.mse_clip_qparams, steps/gptq._pack's zero-point conversion)
against nnsqueeze.ops.rtn and its callers, bit for bit, on random weights of odd shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnsqueeze.ops.quant import fake_quantize, qparams, qrange
from nnsqueeze.ops import rtn as core

Tensor = torch.Tensor


# ---- frozen: ops/int4.py ---------------------------------------------------------------------
def old_groupwise_qparams(w, bits, group_size, symmetric):
    n, k = w.shape
    g = k if group_size <= 0 else min(group_size, k)
    groups = -(-k // g)
    wp = F.pad(w.detach().to(torch.float32), (0, groups * g - k)).reshape(n, groups, g)
    qmax = (1 << bits) - 1
    if symmetric:
        half = 1 << (bits - 1)
        scale = wp.abs().amax(-1) / (half - 1)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zp = torch.full_like(scale, half, dtype=torch.uint8)
        return scale, zp
    lo = torch.clamp(wp.amin(-1), max=0.0)
    hi = torch.clamp(wp.amax(-1), min=0.0)
    scale = (hi - lo) / qmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zp = torch.clamp(torch.round(-lo / scale), 0, qmax).to(torch.uint8)
    return scale, zp


def old_groupwise_quantize(w, scale, zp, bits, group_size):
    n, k = w.shape
    groups = scale.shape[1]
    g = -(-k // groups) if group_size <= 0 else min(group_size, k)
    s = scale.repeat_interleave(g, dim=1)[:, :k]
    z = zp.to(torch.float32).repeat_interleave(g, dim=1)[:, :k]
    q = torch.round(w.detach().to(torch.float32) / s) + z
    return torch.clamp(q, 0, (1 << bits) - 1).to(torch.uint8)


def old_groupwise_dequantize(q, scale, zp, group_size):
    n, k = q.shape
    groups = scale.shape[1]
    g = -(-k // groups) if group_size <= 0 else min(group_size, k)
    s = scale.to(torch.float32).repeat_interleave(g, dim=1)[:, :k]
    z = zp.to(torch.float32).repeat_interleave(g, dim=1)[:, :k]
    return (q.to(torch.float32) - z) * s


# ---- frozen: llm/rtn.py ----------------------------------------------------------------------
class OldGrid:
    def __init__(self, bits, group_size, symmetric, scale_dtype="fp32", clip_grid=1, clip_min=0.5):
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.scale_dtype, self.clip_grid, self.clip_min = scale_dtype, clip_grid, clip_min
        if self.group_size == -1:
            self.group_size = None

    @property
    def qmin_qmax(self):
        return qrange(self.bits, signed=self.symmetric)

    def groups(self, columns):
        g = self.group_size or columns
        return [(s, min(s + g, columns)) for s in range(0, columns, g)]

    @property
    def clip_ratios(self):
        n = self.clip_grid
        return [1.0] if n == 1 else [1.0 - (1.0 - self.clip_min) * i / (n - 1) for i in range(n)]

    def params(self, w, importance=None):
        lo, hi = w.amin(dim=1), w.amax(dim=1)
        scale, zp = self._params_at(lo, hi)
        if self.clip_grid == 1:
            return scale, zp
        wt = (torch.ones(w.shape[1], dtype=torch.float64, device=w.device) if importance is None
              else importance.to(w.device, torch.float64))
        best = self._error(w, scale, zp, wt)
        for r in self.clip_ratios[1:]:
            s, z = self._params_at(lo * r, hi * r)
            e = self._error(w, s, z, wt)
            better = e < best
            scale, zp, best = torch.where(better, s, scale), torch.where(better, z, zp), torch.where(better, e, best)
        return scale, zp

    def _error(self, w, scale, zp, wt):
        d = w.double() - self.fake(w.float(), scale, zp).double()
        return (d * d * wt.unsqueeze(0)).sum(1)

    def _params_at(self, lo, hi):
        scale, zp = qparams(lo, hi, bits=self.bits, symmetric=self.symmetric)
        if self.scale_dtype == "fp32":
            return scale, zp
        scale = core.storable_scale(scale, self.scale_dtype)
        if not self.symmetric:
            qmin, qmax = self.qmin_qmax
            zp = torch.clamp(torch.round(qmin - torch.clamp(lo.float(), max=0.0) / scale), qmin, qmax).to(torch.int32)
        return scale, zp

    def fake(self, w, scale, zero_point):
        qmin, qmax = self.qmin_qmax
        return fake_quantize(w, scale, zero_point, qmin, qmax, axis=0)


def old_rtn_quantize(w, bits=4, group_size=128, symmetric=True, scale_dtype="fp32", clip_grid=1, clip_min=0.5):
    grid = OldGrid(bits, group_size, symmetric, scale_dtype, clip_grid, clip_min)
    w32 = w.detach().to(torch.float32)
    out = torch.empty_like(w32)
    scales, zps = [], []
    for a, b in grid.groups(w32.shape[1]):
        s, z = grid.params(w32[:, a:b])
        out[:, a:b] = grid.fake(w32[:, a:b], s, z)
        scales.append(s)
        zps.append(z)
    return out, torch.stack(scales, 1), torch.stack(zps, 1)


# ---- frozen: ops/quant.mse_clip_qparams and FakeQuantMixin.refresh_weight_scale_ ------------
def old_mse_clip_qparams(rows, bits, symmetric, ratios=20, lowest=0.3):
    rows = rows.detach().float()
    lo, hi = rows.amin(1), rows.amax(1)
    qmin, qmax = qrange(bits, signed=symmetric)
    best_err = torch.full((rows.shape[0],), float("inf"), dtype=torch.float64, device=rows.device)
    best_s = torch.ones_like(lo)
    best_z = torch.zeros_like(lo, dtype=torch.int32)
    for i in range(ratios):
        r = 1.0 - (1.0 - lowest) * i / max(ratios - 1, 1)
        s, z = qparams(lo * r, hi * r, bits=bits, symmetric=symmetric)
        err = ((fake_quantize(rows, s, z, qmin, qmax, axis=0) - rows).double() ** 2).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s, best_z


def old_fakequant_qparams(w, bits, symmetric, granularity, group_size, clip):
    d = w[0].numel()
    if group_size is None:
        g, length, pad = 1, d, 0
    else:
        length = min(group_size, d)
        g = -(-d // length)
        pad = g * length - d
    flat = w.reshape(w.shape[0], -1)
    if pad:
        flat = F.pad(flat, (0, pad))
    rows = flat.reshape(-1, length)

    def per_row(fn, rows):
        if not pad:
            return tuple(fn(rows))
        c = rows.shape[0] // g
        grid = rows.reshape(c, g, length)
        tail = tuple(fn(grid[:, -1, :length - pad]))
        if g == 1:
            return tail
        full = tuple(fn(grid[:, :-1].reshape(-1, length)))
        return tuple(torch.cat([a.reshape(c, g - 1), b.reshape(c, 1)], 1).reshape(-1) for a, b in zip(full, tail))

    rows_for_range = rows.reshape(1, -1) if granularity == "per-tensor" else rows
    if clip == "mse":
        def stats(r):
            return old_mse_clip_qparams(r, bits, symmetric)
    else:
        def stats(r):
            return qparams(r.amin(1), r.amax(1), bits=bits, symmetric=symmetric)
    scale, zp = stats(rows_for_range) if granularity == "per-tensor" else per_row(stats, rows)
    return scale.expand(rows.shape[0]), zp.expand(rows.shape[0])


SHAPES = [(7, 83), (5, 13), (3, 300), (16, 64), (1, 5)]


def _w(shape, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.rand(shape[0], *[1] * (len(shape) - 1), generator=g) * 3
    w.reshape(shape[0], -1)[0, :3] = 0.0  # exact zeros in one group
    return w


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [16, 32, 128, -1])
@pytest.mark.parametrize("symmetric", [True, False])
def test_weight_only_layer_matches_int4(seed, shape, bits, group, symmetric):
    from nnsqueeze.quant.weight_only import convert_weight_only_
    w = _w(shape, seed)
    s0, z0 = old_groupwise_qparams(w, bits, group, symmetric)
    q0 = old_groupwise_quantize(w, s0, z0, bits, group)
    d0 = old_groupwise_dequantize(q0, s0, z0, group)
    lin = nn.Linear(shape[1], shape[0])
    with torch.no_grad():
        lin.weight.copy_(w)
    lay = convert_weight_only_(lin, bits, group, symmetric)
    assert torch.equal(lay.weight_scale_, s0) and torch.equal(lay.weight_zero_point_, z0)
    assert lay.weight_zero_point_.dtype == torch.uint8
    assert torch.equal(lay.weight_codes(), q0) and torch.equal(lay.dequantized_weight(), d0)
    # an all-zero group keeps scale 1 (not EPS) on this layout
    lay.weight.data.zero_()
    lay.refresh_weight_qparams_()
    assert (lay.weight_scale_ == 1).all()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True), (8, False), (3, False), (2, True)])
@pytest.mark.parametrize("group", [None, 5, 16, 32])
@pytest.mark.parametrize("scale_dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("clip_grid", [1, 7])
def test_rtn_quantize_matches_llm_rtn(seed, shape, bits, symmetric, group, scale_dtype, clip_grid):
    w = _w(shape, seed)
    q0, s0, z0 = old_rtn_quantize(w, bits, group, symmetric, scale_dtype, clip_grid)
    r = core.rtn_quantize(w, bits, group, symmetric, scale_dtype, clip_grid)
    assert torch.equal(r.weight, q0) and torch.equal(r.scale, s0) and torch.equal(r.zero_point, z0)
    # the packed layout: the former steps/gptq._pack conversion
    u = core.rtn_quantize(w, bits, group, symmetric, scale_dtype, clip_grid, unsigned=True)
    assert torch.equal(u.weight, q0) and torch.equal(u.scale, s0)
    assert torch.equal(u.zero_point, z0 + ((1 << (bits - 1)) if symmetric else 0))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("scale_dtype", ["fp32", "fp16"])
def test_grid_params_with_importance_matches(seed, symmetric, scale_dtype):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 19, generator=g)
    imp = torch.rand(19, generator=g, dtype=torch.float64) + 0.01
    old = OldGrid(4, 8, symmetric, scale_dtype, 20, 0.5)
    new = core.QuantGrid(4, 8, symmetric, scale_dtype, 20, 0.5)
    for i in (None, imp):
        s0, z0 = old.params(w, i)
        s1, z1 = new.params(w, i)
        assert torch.equal(s0, s1) and torch.equal(z0, z1)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("shape", [(6, 3, 3, 3), (8, 300), (5, 2, 7), (4, 64)])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("gran", ["per-channel", "per-tensor", "per-group"])
@pytest.mark.parametrize("clip", ["none", "mse"])
def test_fake_quant_layer_matches(seed, shape, bits, symmetric, gran, clip):
    from nnsqueeze.quant.modules import convert_
    from nnsqueeze.quant.scheme import WeightScheme
    group = 16 if gran == "per-group" else None
    w = _w(shape, seed)
    s0, z0 = old_fakequant_qparams(w, bits, symmetric, gran, group, clip)
    layer = {2: lambda: nn.Linear(shape[1], shape[0]), 3: lambda: nn.Conv1d(shape[1], shape[0], shape[2]),
             4: lambda: nn.Conv2d(shape[1], shape[0], shape[2])}[len(shape)]()
    with torch.no_grad():
        layer.weight.copy_(w)
    q = convert_(layer, scheme=WeightScheme(bits=bits, symmetric=symmetric, granularity=gran, group_size=group,
                                            clip=clip))
    assert torch.equal(q.weight_scale_, s0)
    if not symmetric:
        assert torch.equal(q.weight_zero_point_, z0)
