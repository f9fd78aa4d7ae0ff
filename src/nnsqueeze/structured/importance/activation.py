"""Activation-based criteria over calibration data, from the producers' output channels.

- ``energy``: mean squared output of a channel (low energy = little signal downstream);
- ``apoz``: 1 - Average Percentage of Zeros after ReLU (Hu et al. 2016), i.e. the fraction of
  outputs > 0 (the producer output before the activation).

Parts of kind ``activation`` have one row per channel holding that channel's sampled outputs::

    >>> import torch
    >>> from nnsqueeze.structured.importance import Part
    >>> from nnsqueeze.structured.importance.activation import apoz, energy
    >>> acts = [Part("activation", "out", torch.tensor([[1.0, -1.0, 2.0, 0.0], [0.0, 0.0, -1.0, 0.5]]))]
    >>> energy(acts), apoz(acts)
    (tensor([1.5000, 0.3125]), tensor([0.5000, 0.2500]))
"""

from __future__ import annotations

import torch


def _acts(parts: list) -> list[torch.Tensor]:
    a = [p.data.double() for p in parts if p.kind == "activation"]
    if not a:
        raise ValueError("activation importance needs 'activation' parts (calibration outputs)")
    return a


def energy(parts: list) -> torch.Tensor:
    return sum(x.pow(2).mean(1) for x in _acts(parts)).float()


def apoz(parts: list) -> torch.Tensor:
    return sum((x > 0).double().mean(1) for x in _acts(parts)).float()
