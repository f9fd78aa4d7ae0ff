"""The toy CNN and data most tests share (a module, not conftest: each conftest.py is imported as
``conftest``, so a second one would shadow these names for ``from conftest import``)."""

from __future__ import annotations

import torch
from torch import nn


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
