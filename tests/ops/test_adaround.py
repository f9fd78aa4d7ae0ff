"""AdaRound: the learned rounding's layer reconstruction error is never worse than nearest rounding's,
and is better on correlated inputs (where nearest rounding is not optimal)."""

from __future__ import annotations

import pytest
import torch

from nnsqueeze.ops.adaround import adaround, init_v, rectified_sigmoid, reconstruction_error
from nnsqueeze.ops.quant import qparams, quantize


def linear(w_rows, x):
    return x @ w_rows.T


@pytest.mark.parametrize("seed,shape,bits,sym", [(0, (5, 7), 4, True), (1, (3, 33), 3, True),
                                                 (2, (9, 13), 2, True), (3, (6, 17), 4, False), (4, (1, 5), 3, True)])
def test_never_worse_than_nearest(seed, shape, bits, sym):
    g = torch.Generator().manual_seed(seed)
    r, d = shape
    w = torch.randn(r, d, generator=g)
    mix = torch.randn(d, d, generator=g)
    x = torch.randn(200, d, generator=g) @ mix          # correlated inputs
    s, z = qparams(w.amin(1), w.amax(1), bits=bits, symmetric=sym)
    qmin, qmax = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if sym else (0, (1 << bits) - 1)
    res = adaround(w, s, z, qmin, qmax, linear, x, x @ w.T, iters=150, batch=50, seed=seed)
    nearest = quantize(w, s, z, qmin, qmax, axis=0)
    # independent float64 error of round-to-nearest
    deq = (nearest.double() - z.double()[:, None]) * s.double()[:, None]
    ref_err = float(((x.double() @ deq.T - x.double() @ w.double().T) ** 2).mean())
    assert res.nearest_error == pytest.approx(ref_err, rel=1e-4)
    assert res.error <= res.nearest_error
    assert int(res.codes.min()) >= qmin and int(res.codes.max()) <= qmax
    # every code is floor or ceil of w/s (+ zero point): rounding only, no other change
    v = w / s[:, None] + z[:, None].float()
    down, up = torch.floor(v).clamp(qmin, qmax), torch.ceil(v).clamp(qmin, qmax)
    assert bool(((res.codes == down) | (res.codes == up)).all())


def test_learned_rounding_beats_nearest_on_correlated_inputs():
    g = torch.Generator().manual_seed(7)
    w = torch.randn(8, 24, generator=g)
    x = torch.randn(512, 4, generator=g) @ torch.randn(4, 24, generator=g) + 0.1 * torch.randn(512, 24, generator=g)
    s, z = qparams(w.amin(1), w.amax(1), bits=3, symmetric=True)
    res = adaround(w, s, z, -4, 3, linear, x, x @ w.T, iters=400)
    assert res.learned and res.error < 0.8 * res.nearest_error
    deq = (res.codes.float() - z[:, None]) * s[:, None]
    assert reconstruction_error(linear, deq, x, x @ w.T) == pytest.approx(res.error, rel=1e-6)


def test_rectified_sigmoid_inverts_init():
    frac = torch.linspace(0.01, 0.99, 11)
    assert torch.allclose(rectified_sigmoid(init_v(frac)), frac, atol=1e-5)
    assert float(rectified_sigmoid(torch.tensor(50.0))) == 1.0 and float(rectified_sigmoid(torch.tensor(-50.0))) == 0.0


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="adaround"):
        adaround(torch.randn(3, 4), torch.ones(4), torch.zeros(4, dtype=torch.int32), -8, 7, linear,
                 torch.randn(5, 4), torch.randn(5, 3))
