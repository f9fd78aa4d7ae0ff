"""``scale_dtype``: scales rounded up to a value of the stored type, codes chosen against it."""

from __future__ import annotations

import pytest
import torch

from nnsqueeze.llm.gptq import gptq_quantize
from nnsqueeze.ops.rtn import rtn_quantize, storable_scale


def test_storable_scale_rounds_up_to_the_type():
    s = torch.tensor([0.1, 1e-3, 3.3e-6, 1e-9, 2.0])
    for name, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        r = storable_scale(s, name)
        assert r.dtype == torch.float32 and torch.equal(r.to(dt).float(), r)
        assert bool((r >= s).all()) and r[4] == 2.0 and bool((r > 0).all())
    assert storable_scale(s, "fp32") is s
    with pytest.raises(ValueError, match="fp16 range"):
        storable_scale(torch.tensor([1e5]), "fp16")


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_fp16_scales_codes_on_the_stored_grid(bits, symmetric):
    w = torch.randn(6, 80, generator=torch.Generator().manual_seed(1))
    r = rtn_quantize(w, bits, 32, symmetric, scale_dtype="fp16")
    assert torch.equal(r.scale.half().float(), r.scale)
    s = r.scale.repeat_interleave(32, 1)[:, :80]
    z = r.zero_point.repeat_interleave(32, 1)[:, :80].float()
    codes = r.weight / s + z
    assert torch.equal(codes, codes.round())                              # weights are exact grid values
    assert (r.weight - w).abs().max() <= s.max() / 2 + 1e-6 or not symmetric
    ref = rtn_quantize(w, bits, 32, symmetric)                            # fp32 scales: close, not equal
    assert (r.weight - ref.weight).abs().max() < 2 * ref.scale.max()


def test_gptq_identity_hessian_equals_rtn_with_fp16_scales():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    g = gptq_quantize(w, torch.eye(64, dtype=torch.float64), 4, 32, True, scale_dtype="fp16")
    r = rtn_quantize(w, 4, 32, True, scale_dtype="fp16")
    assert torch.equal(g.weight, r.weight) and torch.equal(g.scale, r.scale)


def test_bad_scale_dtype():
    with pytest.raises(ValueError, match="scale_dtype"):
        rtn_quantize(torch.randn(2, 8), 4, 8, True, scale_dtype="fp8")


# ---- MSE clipping -------------------------------------------------------------------------------

def _reference_errors(w, bits, symmetric, ratios, wt):
    """Brute force in float64: every row's weighted squared error at every clip ratio, and its scale."""
    qmin, qmax = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if symmetric else (0, (1 << bits) - 1)
    w = w.double()
    errs, scales = [], []
    for r in ratios:
        lo, hi = (w.amin(1) * r).clamp(max=0), (w.amax(1) * r).clamp(min=0)
        if symmetric:
            s, z = torch.maximum(-lo, hi) / qmax, torch.zeros_like(lo)
        else:
            s = (hi - lo) / (qmax - qmin)
            z = torch.clamp(torch.round(qmin - lo / s), qmin, qmax)
        q = (torch.clamp(torch.round(w / s[:, None]) + z[:, None], qmin, qmax) - z[:, None]) * s[:, None]
        errs.append(((w - q) ** 2 * wt[None]).sum(1))
        scales.append(s)
    return torch.stack(errs, 1), torch.stack(scales, 1)       # (rows, ratios)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_mse_clip_picks_the_grid_minimizer_and_never_hurts(symmetric, weighted):
    from nnsqueeze.ops.rtn import QuantGrid
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 32, generator=g)
    wt = torch.rand(32, generator=g, dtype=torch.float64) + 0.1 if weighted else torch.ones(32, dtype=torch.float64)
    grid = QuantGrid(3, None, symmetric, clip_grid=11, clip_min=0.5)
    assert grid.clip_ratios[0] == 1.0 and abs(grid.clip_ratios[-1] - 0.5) < 1e-12 and len(grid.clip_ratios) == 11
    scale, zp = grid.params(w, wt if weighted else None)
    chosen = ((w.double() - grid.fake(w, scale, zp).double()) ** 2 * wt[None]).sum(1)
    errs, scales = _reference_errors(w, 3, symmetric, grid.clip_ratios, wt)
    best = errs.min(1).values
    assert torch.allclose(chosen, best, rtol=1e-5, atol=1e-9)              # the minimizer on the grid
    at = errs.argmin(1)
    assert torch.allclose(scale.double(), scales[torch.arange(16), at], rtol=1e-5)
    assert (chosen <= errs[:, 0] * (1 + 1e-6)).all()                        # never worse than no clipping
    assert (chosen < errs[:, 0] * 0.9).sum() >= 4                           # and clearly better on some rows


def test_rtn_and_gptq_with_clip_lower_the_error():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 64, generator=g)
    w[:, 7] *= 10
    plain = rtn_quantize(w, 4, 16).weight
    clipped = rtn_quantize(w, 4, 16, clip_grid=20).weight
    assert ((w - clipped) ** 2).sum() < ((w - plain) ** 2).sum()
    # GPTQ with the identity Hessian propagates nothing: clipped GPTQ equals clipped RTN exactly
    h = torch.eye(64, dtype=torch.float64)
    assert torch.equal(gptq_quantize(w, h, 4, 16, clip_grid=20).weight, clipped)
    assert torch.equal(gptq_quantize(w, h, 4, 16, clip_grid=20, act_order=True).weight, clipped)
    with pytest.raises(ValueError, match="clip_grid"):
        rtn_quantize(w, 4, 16, clip_grid=0)


def test_clip_with_fp16_scales_stays_storable():
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(2))
    r = rtn_quantize(w, 4, 16, scale_dtype="fp16", clip_grid=10)
    assert torch.equal(r.scale, r.scale.half().float())
