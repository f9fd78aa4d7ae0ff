"""Shared fixtures: small models and data, fixed seeds, no files left behind."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _seed_and_cache(tmp_path_factory, monkeypatch):
    torch.manual_seed(0)
    # Tiny tensors: thread start-up costs more than it saves (latency figures set their own threads).
    torch.set_num_threads(1)
    # Any cache written by a test goes to a temporary directory, never the user's home.
    if "NNSQUEEZE_CACHE" not in os.environ:
        monkeypatch.setenv("NNSQUEEZE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    yield


class TinyCNN(nn.Module):
    """Conv1d + BN + ReLU + Linear: the shapes every step handles (odd widths on purpose)."""

    def __init__(self, length: int = 37, classes: int = 5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, 7, 3, padding=1), nn.BatchNorm1d(7), nn.ReLU(),
            nn.Conv1d(7, 13, 3, stride=2, padding=1), nn.BatchNorm1d(13), nn.ReLU(),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(13 * ((length + 1) // 2), 11), nn.ReLU(),
                                        nn.Linear(11, classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def make_data(n_batches: int = 4, batch: int = 32, length: int = 37, classes: int = 5, seed: int = 0):
    """A learnable toy task: the class is the position of a bump in the signal."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        y = torch.randint(0, classes, (batch,), generator=g)
        x = 0.3 * torch.randn(batch, 1, length, generator=g)
        pos = (y * (length // classes)).long()
        for i in range(batch):
            x[i, 0, pos[i]:pos[i] + 4] += 2.0
        out.append((x, y))
    return out


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
