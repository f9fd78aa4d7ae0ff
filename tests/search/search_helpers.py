"""(tests/search is on sys.path under pytest) A tiny MLP task for the search tests: synthetic data,
trained in well under a second."""

from __future__ import annotations

import torch
from torch import nn

# Cheap trials: few timing runs, one thread.
EVALUATE = {"runs": 2, "warmup": 1, "threads": 1}


def data(n: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(64, 16, generator=g)
        y = (x[:, :4].sum(1) > 0).long() + (x[:, 4] > 0).long()
        out.append((x, y))
    return out


def model() -> nn.Module:
    """nn.Sequential of torch layers: picklable by reference, so spawned workers can receive it."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    for _ in range(15):
        for x, y in data(8, 1):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
    return m


def datasets() -> dict:
    return {"train": data(4, 1), "calib": data(1, 2), "eval": data(2, 3)}


def space(**extra) -> dict:
    return {"version": 1, "name": "mlp",
            "base": [{"prune": {"sparsity": 0.5}}, {"finetune": {"epochs": 1, "lr": 1.0e-3}},
                     {"quantize": {"calibration": {"samples": 64}}}],
            "params": {"prune.sparsity": {"choices": [0.3, 0.6]}, "quantize.weights.bits": {"choices": [4, 8]},
                       "finetune": {"optional": True}},
            "evaluate": EVALUATE, **extra}
