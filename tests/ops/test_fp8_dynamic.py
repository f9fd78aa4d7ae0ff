"""Dynamic FP8 (nnsqueeze.ops.fp8.fp8_dynamic_scale / fp8_dynamic_fake_quantize) against an independent
float64 reference: the E4M3 / E5M2 grids written out in closed form, nearest value with ties to the even
code, the scale amax / max_finite computed per tensor or per row in numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nnsqueeze.ops.fp8 import fp8_dynamic_fake_quantize, fp8_dynamic_scale

TINY = float(np.finfo(np.float32).tiny)


def _grid(ebits: int, mbits: int, bias: int, fn: bool) -> np.ndarray:
    """Every non-negative finite value of the format in float64, ascending, by its defining formula
    (code order: index i is the code i). E4M3 'fn' drops only S.1111.111 (NaN); IEEE-like E5M2 drops
    the whole top exponent (inf, NaN)."""
    vals = []
    for e in range(2 ** ebits):
        for m in range(2 ** mbits):
            if fn and e == 2 ** ebits - 1 and m == 2 ** mbits - 1:
                continue
            if not fn and e == 2 ** ebits - 1:
                continue
            vals.append(m / 2 ** mbits * 2.0 ** (1 - bias) if e == 0 else (1 + m / 2 ** mbits) * 2.0 ** (e - bias))
    return np.array(vals, dtype=np.float64)


GRIDS = {"fp8-e4m3": _grid(4, 3, 7, True), "fp8-e5m2": _grid(5, 2, 15, False)}


def _round(v: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Round to the nearest grid value, ties to the even code, saturating at the largest (float64)."""
    a = np.minimum(np.abs(v), grid[-1])
    hi = np.clip(np.searchsorted(grid, a), 1, len(grid) - 1)
    lo = hi - 1
    d_lo, d_hi = a - grid[lo], grid[hi] - a
    pick = np.where(d_lo < d_hi, lo, np.where(d_hi < d_lo, hi, np.where(lo % 2 == 0, lo, hi)))
    return np.sign(v) * grid[pick]


def _reference(x: torch.Tensor, fmt: str, per_token: bool) -> tuple[np.ndarray, np.ndarray]:
    """(scale, dequantized) in the arithmetic ONNX prescribes: float32 scale and division, float64 rounding."""
    a = np.abs(x.numpy().astype(np.float32))
    amax = a.max(axis=-1, keepdims=True) if per_token else a.max()
    s = np.maximum(np.float32(amax) / np.float32(GRIDS[fmt][-1]), np.float32(TINY)).astype(np.float32)
    v = (x.numpy().astype(np.float32) / s).astype(np.float64)
    return s, (_round(v, GRIDS[fmt]).astype(np.float32) * s).astype(np.float64)


def test_closed_form_grids_have_the_documented_ends():
    e4, e5 = GRIDS["fp8-e4m3"], GRIDS["fp8-e5m2"]
    assert (len(e4), e4[1], e4[8], e4[-1]) == (127, 2.0 ** -9, 2.0 ** -6, 448.0)
    assert (len(e5), e5[1], e5[4], e5[-1]) == (124, 2.0 ** -16, 2.0 ** -14, 57344.0)


@pytest.mark.parametrize("fmt", ["fp8-e4m3", "fp8-e5m2"])
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("shape", [(3, 5, 7), (1, 13), (2, 1, 1), (4, 31)])
def test_dynamic_fake_quantize_matches_float64_reference(fmt, per_token, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g) * torch.logspace(-3, 3, shape[-1])   # six decades per row
    s_ref, y_ref = _reference(x, fmt, per_token)
    s = fp8_dynamic_scale(x, fmt, per_token=per_token)
    assert s.dtype == torch.float32 and tuple(s.shape) == ((*shape[:-1], 1) if per_token else ())
    assert np.array_equal(s.numpy(), s_ref)
    y = fp8_dynamic_fake_quantize(x, fmt, per_token=per_token)
    assert y.dtype == torch.float32 and y.shape == x.shape
    np.testing.assert_array_equal(y.double().numpy(), y_ref)   # bit-exact: one rounding, same float32 steps
    # each row's (or the tensor's) largest magnitude lands on the format's largest value
    top = np.abs(y.numpy()).max(axis=-1, keepdims=True) if per_token else np.abs(y.numpy()).max()
    np.testing.assert_allclose(top / s_ref, GRIDS[fmt][-1], rtol=1e-6)


@pytest.mark.parametrize("fmt", ["fp8-e4m3", "fp8-e5m2"])
def test_grid_points_are_fixed_points_and_midpoints_round_to_even(fmt):
    grid = GRIDS[fmt]
    # a row holding every grid value (the max among them sets the scale to exactly 1)
    x = torch.from_numpy(np.concatenate([grid, -grid[1:]]).astype(np.float32))[None]
    assert float(fp8_dynamic_scale(x, fmt)) == 1.0
    assert np.array_equal(fp8_dynamic_fake_quantize(x, fmt).numpy(), x.numpy())
    # midpoints between neighbours (exact in float32) go to the neighbour with the even code
    mid = (grid[1:] + grid[:-1]) / 2
    want = np.where(np.arange(len(mid)) % 2 == 0, grid[:-1], grid[1:])
    row = torch.from_numpy(np.concatenate([mid, [grid[-1]]]).astype(np.float32))[None]
    got = fp8_dynamic_fake_quantize(row, fmt, per_token=True).numpy()[0, :-1]
    assert np.array_equal(got.astype(np.float64), want)


def test_zero_rows_stay_zero_and_scale_is_floored():
    x = torch.zeros(3, 6)
    x[1] = torch.linspace(-1, 1, 6)
    s = fp8_dynamic_scale(x, "fp8-e4m3", per_token=True)
    assert float(s[0, 0]) == TINY and float(s[2, 0]) == TINY and float(s[1, 0]) == np.float32(1.0) / np.float32(448)
    y = fp8_dynamic_fake_quantize(x, "fp8-e4m3", per_token=True)
    assert torch.equal(y[0], torch.zeros(6)) and torch.equal(y[2], torch.zeros(6))


def test_scale_follows_the_input():
    # a power-of-two gain passes through exactly: the scale moves with the input (a static scale would clip)
    x = torch.randn(5, 9, generator=torch.Generator().manual_seed(3))
    for fmt in ("fp8-e4m3", "fp8-e5m2"):
        assert torch.equal(fp8_dynamic_fake_quantize(x * 1024, fmt), fp8_dynamic_fake_quantize(x, fmt) * 1024)


def test_gradient_passes_straight_through():
    x = torch.randn(4, 7, generator=torch.Generator().manual_seed(5)).requires_grad_()
    y = fp8_dynamic_fake_quantize(x, "fp8-e4m3", per_token=True)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_per_token_needs_a_last_axis():
    with pytest.raises(ValueError, match="per-token scales need a last axis"):
        fp8_dynamic_scale(torch.tensor(2.0), "fp8-e4m3", per_token=True)
