"""BatchNorm scale (Network Slimming, Liu et al. 2017): |gamma| of the BatchNorm that follows.

Groups without a BatchNorm fall back to L1 magnitude. The BN part rows are ``[gamma, beta]``::

    >>> import torch
    >>> from nnsqueeze.structured.importance import Part
    >>> from nnsqueeze.structured.importance.bn_scale import score
    >>> score([Part("bn", "out", torch.tensor([[-2.0, 1.0], [0.5, 9.0]]))])
    tensor([2.0000, 0.5000])
"""

from __future__ import annotations

import torch

from . import l1


def score(parts: list) -> torch.Tensor:
    bns = [p.data[:, 0].double().abs() for p in parts if p.kind == "bn"]
    return sum(bns).float() if bns else l1.score(parts)
