"""Metrics by name: the ``cosine`` embedding-fidelity metric against a float64 closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from nnsqueeze.errors import DataError
from nnsqueeze.metrics import get_metric, lower_is_better


def test_cosine_matches_float64_reference_on_odd_shapes():
    torch.manual_seed(0)
    model = nn.Linear(7, 5)
    xs = [torch.randn(3, 7), torch.randn(1, 7), torch.randn(4, 2, 7)]  # 3-D output: rows along the last axis
    refs = [torch.randn(*x.shape[:-1], 5) for x in xs]
    fn, name = get_metric("cosine")
    assert name == "cosine" and not lower_is_better(fn)
    got = fn(model, list(zip(xs, refs)))
    with torch.no_grad():
        a = np.concatenate([model(x).double().reshape(-1, 5).numpy() for x in xs])
    b = np.concatenate([r.double().reshape(-1, 5).numpy() for r in refs])
    want = np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))
    assert got == pytest.approx(want, abs=1e-12)
    with torch.no_grad():
        assert fn(model, [(x, model(x)) for x in xs]) == pytest.approx(1.0, abs=1e-12)  # itself: 1


def test_cosine_errors_name_the_batch():
    fn, _ = get_metric("cosine")
    model = nn.Linear(3, 2)
    with pytest.raises(DataError, match="float reference outputs"):
        fn(model, [(torch.randn(2, 3), torch.tensor([0, 1]))])
    with pytest.raises(DataError, match="do not match the reference outputs"):
        fn(model, [(torch.randn(2, 3), torch.randn(2, 4))])
    with pytest.raises(DataError, match="no examples"):
        fn(model, [])
