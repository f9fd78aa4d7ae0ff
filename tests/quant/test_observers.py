"""The minmax calibration observer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nnsqueeze.errors import DataError
from nnsqueeze.ops.quant import qparams
from nnsqueeze.quant.observers import MinMaxObserver
from nnsqueeze.registry import OBSERVERS


def test_registered():
    assert OBSERVERS.get("minmax") is MinMaxObserver


def test_per_tensor_running_range():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 5, 7, generator=g) * (i + 1) for i in range(4)]
    obs = MinMaxObserver(name="layer input")
    for b in batches:
        obs.observe(b)
    allv = np.concatenate([b.numpy().ravel() for b in batches])
    assert obs.count_ == 4
    assert float(obs.min_) == allv.min() and float(obs.max_) == allv.max()
    s, z = obs.qparams(bits=8, symmetric=False)
    rs, rz = qparams(torch.tensor(allv.min()), torch.tensor(allv.max()), bits=8, symmetric=False)
    assert torch.equal(s, rs) and torch.equal(z, rz)


def test_per_channel_axis1():
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 3, 5, generator=g) for _ in range(3)]
    obs = MinMaxObserver(axis=1)
    for b in batches:
        obs.observe(b)
    allv = np.concatenate([b.numpy() for b in batches], axis=0)
    np.testing.assert_array_equal(obs.min_.numpy(), allv.min(axis=(0, 2)))
    np.testing.assert_array_equal(obs.max_.numpy(), allv.max(axis=(0, 2)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_raises_data_error_naming_the_layer(bad):
    obs = MinMaxObserver(name="features.3 input")
    x = torch.ones(2, 3)
    x[1, 2] = bad
    with pytest.raises(DataError, match="calibration produced (NaN|inf) at layer features.3 input"):
        obs.observe(x)


def test_no_data_is_an_error():
    with pytest.raises(DataError, match="saw no data"):
        MinMaxObserver(name="x").qparams()


def test_channel_count_change_is_an_error():
    obs = MinMaxObserver(axis=1, name="x")
    obs.observe(torch.zeros(2, 3))
    with pytest.raises(DataError, match="channel count"):
        obs.observe(torch.zeros(2, 4))
