"""LSQ: forward equals fake_quantize; gradients equal the closed form (Esser et al. 2020, eq. 3)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nnsqueeze.ops.lsq import lsq_fake_quantize, lsq_grad_scale
from nnsqueeze.ops.quant import fake_quantize


def closed_form(x: np.ndarray, s: float, z: int, qmin: int, qmax: int, g: float, up: np.ndarray):
    """d(sum(up * x_hat))/dx and /ds, element by element in float64."""
    gx, gs = np.zeros_like(x), 0.0
    for i, v in np.ndenumerate(x):
        t = np.float32(np.float32(v) / np.float32(s))
        q = np.rint(t) + z
        if q < qmin:
            gs += up[i] * (qmin - z)
        elif q > qmax:
            gs += up[i] * (qmax - z)
        else:
            gx[i] = up[i]
            gs += up[i] * (np.rint(t) - t)
    return gx, gs * g


@pytest.mark.parametrize("z,qmin,qmax", [(0, -8, 7), (3, 0, 15), (0, -2, 1)])
def test_gradients_match_closed_form(z, qmin, qmax):
    g = torch.Generator().manual_seed(z + qmax)
    x = (torch.randn(3, 5, generator=g) * 2).requires_grad_(True)
    s = torch.tensor(0.37, requires_grad=True)
    up = torch.randn(3, 5, generator=g)
    y = lsq_fake_quantize(x, s, torch.tensor(z), qmin, qmax)
    assert torch.equal(y.detach(), fake_quantize(x.detach(), s.detach(), torch.tensor(z), qmin, qmax))
    (y * up).sum().backward()
    gscale = 1.0 / math.sqrt(15 * qmax)
    assert lsq_grad_scale(15, 1, qmax) == pytest.approx(gscale)
    gx, gs = closed_form(x.detach().numpy().astype(np.float64), 0.37, z, qmin, qmax, gscale, up.numpy())
    np.testing.assert_allclose(x.grad.numpy(), gx, rtol=0, atol=0)
    assert float(s.grad) == pytest.approx(gs, rel=1e-5, abs=1e-7)


def test_per_channel_gradient_sums_per_channel():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=g)
    s = torch.tensor([0.1, 0.2, 0.3, 0.5], requires_grad=True)
    lsq_fake_quantize(x, s, torch.zeros(4, dtype=torch.int32), -8, 7, axis=0, grad_scale=1.0).sum().backward()
    for c in range(4):
        gx, gs = closed_form(x[c].numpy().astype(np.float64), float(s[c].detach()), 0, -8, 7, 1.0, np.ones(6))
        assert float(s.grad[c]) == pytest.approx(gs, rel=1e-5, abs=1e-6)
