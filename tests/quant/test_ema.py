"""``ema-minmax`` observers against the closed form of an exponential moving average."""

from __future__ import annotations

import pytest
import torch

from nnsqueeze.errors import DataError
from nnsqueeze.registry import OBSERVERS


@pytest.mark.parametrize("name,c", [("ema-minmax", 0.01), ("ema-minmax-0.1", 0.1)])
def test_per_tensor_matches_closed_form(name, c):
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(7, 13, generator=g) * (1 + i) for i in range(5)]
    obs = OBSERVERS.get(name)(name="x")
    for b in batches:
        obs.observe(b)
    lo = float(batches[0].double().min())
    hi = float(batches[0].double().max())
    for b in batches[1:]:  # float64 reference of the recurrence
        lo = (1 - c) * lo + c * float(b.double().min())
        hi = (1 - c) * hi + c * float(b.double().max())
    assert obs.count_ == 5
    assert float(obs.min_) == pytest.approx(lo, rel=1e-6) and float(obs.max_) == pytest.approx(hi, rel=1e-6)
    # one outlier batch moves the range by c of its excess, where minmax would jump all the way
    before = float(obs.max_)
    obs.observe(torch.tensor([1000.0]))
    assert float(obs.max_) == pytest.approx((1 - c) * before + c * 1000.0, rel=1e-6)


def test_per_channel_and_errors():
    obs = OBSERVERS.get("ema-minmax-0.1")(axis=1, name="conv input")
    obs.observe(torch.tensor([[1.0, -2.0, 3.0]]))
    obs.observe(torch.tensor([[11.0, -12.0, 3.0]]))
    # each channel: 0.9 * first + 0.1 * second (a single value per channel, so min == max)
    assert torch.allclose(obs.max_, torch.tensor([2.0, -3.0, 3.0])) and torch.allclose(obs.min_, obs.max_)
    obs.observe(torch.empty(0, 3))  # nothing to fold in
    assert obs.count_ == 2
    with pytest.raises(DataError, match="channel count"):
        obs.observe(torch.ones(1, 4))
    with pytest.raises(DataError):
        obs.observe(torch.tensor([[float("nan"), 0.0, 0.0]]))
    scale, zp = obs.qparams(bits=8, symmetric=False)
    assert scale.shape == (3,) and zp.shape == (3,)
