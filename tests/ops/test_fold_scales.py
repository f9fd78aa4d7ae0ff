"""fold_scales (nnsqueeze.ops.equalize): the one fold of per-channel scales behind CLE, the
``smoothquant`` step and ``quantize-dynamic``'s in-layer smoothing.

References: the unfolded function in float64 (exact up to float64 rounding), the float64 quotient
/ product rounded once to each tensor's dtype (bit for bit), and the three users' own results."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnsqueeze.ops.equalize import fold_scales, smoothquant_scales


def _scales(c: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.exp(torch.randn(c, generator=g, dtype=torch.float64) * 2)   # (c,) over ~e^-6..e^6


def test_conv_relu_conv_function_is_unchanged_in_float64():
    torch.manual_seed(0)
    w1, b1 = torch.randn(6, 3, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    w2 = torch.randn(4, 6, 5, dtype=torch.float64)
    x = torch.randn(2, 3, 20, dtype=torch.float64)
    (v1, c1), (v2,) = fold_scales(_scales(6), [w1, b1], [w2])
    ref = F.conv1d(F.relu(F.conv1d(x, w1, b1)), w2)           # relu(z / s) = relu(z) / s for s > 0
    got = F.conv1d(F.relu(F.conv1d(x, v1, c1)), v2)
    assert (got - ref).abs().max() <= 1e-12 * ref.abs().max()


def test_norm_into_several_linears_float64():
    # A LayerNorm feeding q/k/v: 1/s into its weight and bias (C,), s into each Linear's columns.
    torch.manual_seed(1)
    norm = nn.LayerNorm(8).double()
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    ws = [torch.randn(n, 8, dtype=torch.float64) for n in (5, 5, 3)]
    x = torch.randn(4, 8, dtype=torch.float64)
    (nw, nb), vs = fold_scales(_scales(8, 1), [norm.weight, norm.bias], ws)
    y = F.layer_norm(x, (8,), nw, nb)
    for w, v in zip(ws, vs):
        ref = norm(x) @ w.T
        assert (y @ v.T - ref).abs().max() <= 1e-12 * ref.abs().max()


def test_rounded_once_from_float64_in_each_dtype():
    torch.manual_seed(2)
    s = _scales(6, 2)
    w1, w2 = torch.randn(6, 4), torch.randn(3, 6, 2, 2).half()
    (v1, c1), (v2,) = fold_scales(s, [w1, None], [w2])
    assert c1 is None                                           # a missing bias stays missing
    assert v1.dtype == torch.float32 and v2.dtype == torch.float16
    assert torch.equal(v1, (w1.double() / s.reshape(-1, 1)).float())
    assert torch.equal(v2, (w2.double() * s.reshape(1, -1, 1, 1)).half())


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_scales_must_be_positive_and_finite(bad):
    s = torch.ones(4, dtype=torch.float64)
    s[2] = bad
    with pytest.raises(ValueError, match="positive and finite"):
        fold_scales(s, [torch.ones(4)], [torch.ones(2, 4)])


def test_channel_counts_must_match():
    s = torch.ones(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="4 rows"):
        fold_scales(s, [torch.ones(5)], [])
    with pytest.raises(ValueError, match="4 columns"):
        fold_scales(s, [], [torch.ones(4, 3)])


def test_the_three_users_fold_the_same_way():
    from nnsqueeze.quant.dynamic import convert_dynamic_
    from nnsqueeze.quant.equalize import equalize

    # quantize-dynamic's in-layer smoothing: the layer's own multiplier of ones is the producer
    torch.manual_seed(3)
    lin = nn.Linear(12, 5)
    w0, s = lin.weight.detach().clone(), _scales(12, 3)
    convert_dynamic_(lin, bits=8, smooth=s)
    (r,), (w,) = fold_scales(s, [torch.ones(12)], [w0])
    assert torch.equal(lin.input_multiplier_, r) and torch.equal(lin.weight.detach(), w)

    # quantize's equalize (method smoothquant) on a Linear -> ReLU -> Linear pair
    torch.manual_seed(4)
    m = nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 3))
    before = [t.detach().clone() for t in (m[0].weight, m[0].bias, m[2].weight)]
    x = torch.randn(10, 6)
    with torch.no_grad():
        act = torch.relu(m[0](x)).abs().amax(0).double()       # (7,) what the second Linear reads
    equalize(m, ["0", "2"], "smoothquant", alpha=0.5, data=[(x, None)])
    (v1, c1), (v2,) = fold_scales(smoothquant_scales(act, before[2], 0.5), before[:2], before[2:])
    assert torch.equal(m[0].weight.detach(), v1) and torch.equal(m[0].bias.detach(), c1)
    assert torch.equal(m[2].weight.detach(), v2)
