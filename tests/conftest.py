"""Shared fixtures: small models and data, fixed seeds, no files left behind."""

from __future__ import annotations

import os

import pytest
import torch

import nnsqueeze  # noqa: F401 - first: declares torchvision's op schemas where its CUDA build cannot load


@pytest.fixture(autouse=True)
def _seed_and_cache(tmp_path_factory, monkeypatch):
    torch.manual_seed(0)
    # Tiny tensors: thread start-up costs more than it saves (latency figures set their own threads).
    torch.set_num_threads(1)
    # Any cache written by a test goes to a temporary directory, never the user's home.
    if "NNSQUEEZE_CACHE" not in os.environ:
        monkeypatch.setenv("NNSQUEEZE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    yield


from tiny_cnn import TinyCNN, make_data  # noqa: E402,F401 - re-exported for older imports


@pytest.fixture
def tiny_cnn():
    torch.manual_seed(0)
    m = TinyCNN()
    # Non-trivial BatchNorm statistics, so folding is actually tested.
    with torch.no_grad():
        for bn in (m.features[1], m.features[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return m.eval()


@pytest.fixture
def toy_data():
    return {"train": make_data(6, seed=1), "calib": make_data(2, seed=2), "eval": make_data(3, seed=3)}
