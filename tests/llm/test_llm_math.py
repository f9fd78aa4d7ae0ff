"""Pure-math tests of nnsqueeze.llm: RTN, GPTQ, SparseGPT, Wanda, AWQ, SmoothQuant on tiny tensors."""

from __future__ import annotations


import pytest
import torch

from nnsqueeze.errors import ModelError
from nnsqueeze.llm.awq import AWQAccumulator, awq_search
from nnsqueeze.llm.gptq import HessianAccumulator, HessianError, gptq_quantize, output_error
from nnsqueeze.llm.smoothquant import AbsMaxAccumulator, smooth_activation, smooth_scales, smooth_weight
from nnsqueeze.llm.sparsegpt import sparsegpt_prune
from nnsqueeze.llm.wanda import InputNormAccumulator, wanda_prune
from nnsqueeze.ops.quant import qrange
from nnsqueeze.ops.rtn import rtn_quantize


def correlated(tokens: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g)
    return (torch.randn(tokens, cols, generator=g) @ mix) * (0.2 + 3 * torch.rand(cols, generator=g))


def hessian(x: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[1])
    for chunk in x.split(97):  # uneven batches: the running mean must not depend on them
        acc.add(chunk)
    return acc.hessian


# ---- RTN ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True), (8, False), (3, False)])
@pytest.mark.parametrize("group_size", [None, 4, 5, 16])
def test_rtn_on_grid_and_odd_shapes(bits, symmetric, group_size):
    w = torch.randn(7, 13)
    r = rtn_quantize(w, bits, group_size, symmetric)
    qmin, qmax = qrange(bits, symmetric)
    n_groups = 1 if group_size is None else -(-13 // group_size)
    assert r.scale.shape == r.zero_point.shape == (7, n_groups)
    g = group_size or 13
    scale = r.scale.repeat_interleave(g, 1)[:, :13]
    zp = r.zero_point.repeat_interleave(g, 1)[:, :13]
    codes = r.weight / scale + zp
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.round().min() >= qmin and codes.round().max() <= qmax
    # Error bounded by half a step (no clipping: the range covers the group's min/max).
    assert ((r.weight - w).abs() <= scale / 2 + 1e-6).all()


def test_rtn_rejects_bad_input():
    with pytest.raises(ValueError):
        rtn_quantize(torch.randn(3, 4, 5))
    with pytest.raises(ValueError):
        rtn_quantize(torch.randn(3, 4), bits=9)


# ---- GPTQ -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("group_size,symmetric,act_order", [(None, True, False), (4, False, False),
                                                             (5, True, True), (16, False, True)])
def test_gptq_identity_hessian_equals_rtn(group_size, symmetric, act_order):
    w = torch.randn(9, 21)
    g = gptq_quantize(w, torch.eye(21), bits=4, group_size=group_size, symmetric=symmetric,
                      act_order=act_order, block_size=8)
    r = rtn_quantize(w, 4, group_size, symmetric)
    assert torch.equal(g.weight, r.weight)
    assert torch.equal(g.scale, r.scale) and torch.equal(g.zero_point, r.zero_point)


@pytest.mark.parametrize("group_size,act_order", [(None, False), (8, False), (8, True), (7, True)])
def test_gptq_beats_rtn_on_correlated_inputs(group_size, act_order):
    x = correlated(1500, 35)
    w = torch.randn(12, 35)
    g = gptq_quantize(w, hessian(x), bits=4, group_size=group_size, act_order=act_order, block_size=16)
    r = rtn_quantize(w, 4, group_size)
    ratio = output_error(x, w, g.weight) / output_error(x, w, r.weight)
    assert ratio < 0.9, ratio


def test_gptq_recovers_from_singular_hessian():
    x = torch.randn(4, 10)            # 4 tokens for 10 features: rank 4, singular H
    h = hessian(x)
    notes = []
    g = gptq_quantize(torch.randn(3, 10), h, damp_percent=0.0, on_note=notes.append, where="blk.q")
    assert g.damp_percent > 0 and notes and "blk.q" in notes[0]
    with pytest.raises(HessianError, match="not positive definite"):
        gptq_quantize(torch.randn(3, 10), -torch.eye(10), max_damp_percent=1.0)


def test_gptq_dead_inputs_and_nonfinite():
    x = correlated(300, 8)
    x[:, 2] = 0
    g = gptq_quantize(torch.randn(4, 8), hessian(x), group_size=4)
    assert (g.weight[:, 2] == 0).all() and torch.isfinite(g.weight).all()
    with pytest.raises(HessianError):
        gptq_quantize(torch.randn(4, 8), torch.full((8, 8), float("nan")))


# ---- SparseGPT / Wanda ----------------------------------------------------------------------------

def magnitude(w, **kw):
    return wanda_prune(w, torch.ones(w.shape[1]), **kw)  # all-ones norms: per-row magnitude


@pytest.mark.parametrize("kw", [dict(sparsity=0.5), dict(prune_n=2, prune_m=4)])
def test_sparsegpt_and_wanda_beat_magnitude(kw):
    x = correlated(2000, 32, seed=1)
    w = torch.randn(16, 32)
    acc = InputNormAccumulator(32)
    acc.add(x)
    s = sparsegpt_prune(w, hessian(x), block_size=16, **kw)
    wa = wanda_prune(w, acc.norms, **kw)
    mg = magnitude(w, **kw)
    e_mag = output_error(x, w, mg.weight)
    assert output_error(x, w, s.weight) < 0.8 * e_mag
    assert output_error(x, w, wa.weight) < 0.9 * e_mag
    for r in (s, wa, mg):
        assert int((r.weight == 0).sum()) >= 16 * 16 and torch.equal(r.weight != 0, r.mask & (w != 0))
        if "prune_m" in kw:
            assert (r.mask.reshape(16, 8, 4).sum(-1) == 2).all()


def test_pruning_odd_shapes_and_errors():
    x = correlated(200, 13)
    w = torch.randn(5, 13)
    s = sparsegpt_prune(w, hessian(x), sparsity=0.3, block_size=4)
    assert abs(float((~s.mask).float().mean()) - 0.3) < 0.05
    wa = wanda_prune(w, torch.rand(13), sparsity=0.3)
    assert ((~wa.mask).sum(1) == 4).all()  # round(0.3 * 13) per row
    with pytest.raises(ModelError, match="multiple of M"):
        sparsegpt_prune(w, hessian(x), prune_n=2, prune_m=4)
    with pytest.raises(ModelError, match="multiple of M"):
        wanda_prune(w, torch.rand(13), prune_n=2, prune_m=4)
    with pytest.raises(ModelError):
        wanda_prune(torch.randn(4, 8), torch.rand(8), prune_n=4, prune_m=4)


# ---- AWQ ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("group_size", [None, 16, 10])
def test_awq_not_worse_than_rtn_with_outlier_channels(group_size):
    x = torch.randn(1024, 40)
    x[:, [3, 17, 33]] *= 25
    w = torch.randn(24, 40)
    acc = AWQAccumulator(40)
    acc.add(x)
    r = awq_search(w, acc.abs_mean, acc.hessian, bits=4, group_size=group_size)
    rtn = rtn_quantize(w, 4, group_size)
    assert output_error(x, w, r.weight) <= output_error(x, w, rtn.weight) * (1 + 1e-6)
    assert r.error < r.rtn_error and r.alpha > 0
    assert torch.allclose(r.weight * r.scales, r.scaled_weight, rtol=1e-5, atol=1e-6)


# ---- SmoothQuant ----------------------------------------------------------------------------------

def test_smoothquant_keeps_outputs_and_flattens_activations():
    x = torch.randn(200, 24, dtype=torch.float64)
    x[:, [1, 9]] *= 80
    ws = [torch.randn(16, 24, dtype=torch.float64), torch.randn(8, 24, dtype=torch.float64)]
    acc = AbsMaxAccumulator(24)
    acc.add(x)
    s = smooth_scales(acc.absmax, ws, alpha=0.5)
    xs = smooth_activation(x, s)
    for w in ws:
        assert (xs @ smooth_weight(w, s).T - x @ w.T).abs().max() < 1e-5
    def ratio(a):
        return float(a.abs().amax(0).max() / a.abs().amax(0).median())

    assert ratio(xs) < ratio(x) / 4
    with pytest.raises(ValueError):
        smooth_scales(acc.absmax, ws, alpha=1.5)


def test_gptq_keeps_pruned_zeros():
    x = correlated(800, 24)
    w = torch.randn(10, 24)
    keep = wanda_prune(w, torch.ones(24), prune_n=2, prune_m=4).mask
    g = gptq_quantize(w * keep, hessian(x), bits=4, group_size=8, mask=keep, act_order=True, block_size=8)
    assert torch.equal(g.weight != 0, keep & (g.weight != 0)) and ((g.weight == 0) | keep).all()
    assert not (g.weight[~keep] != 0).any()


def test_hessian_product_shared_by_layers_reading_one_tensor_is_bit_identical():
    """q/k/v (gate/up) read the same tensor: the second accumulator reuses the first one's x^T x. The
    Hessians equal the ones fed fresh copies, bit for bit, and an in-place change of the input (its
    version counter moves) is never served from the cache."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 7, 13, generator=g) for _ in range(3)]
    shared = [HessianAccumulator(13), HessianAccumulator(13)]
    fresh = [HessianAccumulator(13), HessianAccumulator(13)]
    for x in batches:
        for a in shared:
            a.add(x)
        for a in fresh:
            a.add(x.clone())
    ref = sum(2 * x.reshape(-1, 13).double().T @ x.reshape(-1, 13).double() for x in batches) / 42
    for a, b in zip(shared, fresh):
        assert torch.equal(a.hessian, b.hessian) and a.tokens == 42
        # float32 products (n = 14 tokens per batch: error below n * 2**-24 of the |x||x| sums)
        assert torch.allclose(a.hessian, ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))
    x = torch.randn(5, 13, generator=g)
    first, second = HessianAccumulator(13), HessianAccumulator(13)
    first.add(x)
    x.mul_(2)                                   # same object, new values: must be recomputed
    second.add(x)
    want = 2 * x.double().T @ x.double() / 5
    assert torch.allclose(second.hessian, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))
    assert not torch.allclose(second.hessian, want / 4, rtol=0.1)  # not the cached product of the old values


def test_relative_errors_match_a_float64_reference():
    """||X (W - W_hat)^T|| / ||X W^T|| from the Hessian (float32 products, float64 sums) vs float64 on X."""
    from nnsqueeze.steps._llm import relative_errors
    g = torch.Generator().manual_seed(1)
    x = torch.randn(301, 37, generator=g) @ torch.randn(37, 37, generator=g)
    w = torch.randn(23, 37, generator=g)
    hats = [w + 0.01 * torch.randn(23, 37, generator=g), torch.round(w * 4) / 4, w.clone()]
    acc = HessianAccumulator(37)
    acc.add(x)
    got = relative_errors(w, hats, acc.hessian)
    x64 = x.double()
    for e, h in zip(got, hats):
        ref = float(torch.linalg.norm(x64 @ (w.double() - h.double()).T) / torch.linalg.norm(x64 @ w.double().T))
        assert abs(e - ref) <= 1e-5 * max(ref, 1e-3)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
@pytest.mark.parametrize("act_order,group_size,dead,masked", [(False, 8, False, False), (True, 5, True, False),
                                                               (True, None, False, True), (False, 16, True, True)])
def test_gptq_quad_error_equals_the_hessian_quadratic_form(dtype, rtol, act_order, group_size, dead, masked):
    """``quad_error`` (from GPTQ's own per-column losses, less the dampening's share) equals
    tr((W - Q) H (W - Q)^T) on the undamped Hessian, computed directly in float64; odd shapes, a dead
    input (its H row/column zero), pruned weights kept at zero."""
    x = correlated(301, 21, seed=3)
    if dead:
        x[:, 4] = 0.0
    h = hessian(x)
    w = torch.randn(11, 21, generator=torch.Generator().manual_seed(4))
    mask = (torch.rand(11, 21, generator=torch.Generator().manual_seed(5)) > 0.3) if masked else None
    r = gptq_quantize(w, h, bits=3, group_size=group_size, act_order=act_order, mask=mask, dtype=dtype,
                      damp_percent=0.05)
    d = w.double() - r.weight.double()
    direct = float(((d @ h) * d).sum())
    assert r.quad_error == pytest.approx(direct, rel=rtol)
