"""N:M masks: pattern, reference by loop, existing masks respected."""

from __future__ import annotations

import pytest
import torch

from nnsqueeze.structured.nm import nm_mask


def test_two_of_four_loop_reference():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 3, 4, generator=g)  # conv-like: reduction 12
    mask = nm_mask(w, 2, 4)
    flat, mflat = w.reshape(6, -1), mask.reshape(6, -1)
    for r in range(6):
        for k in range(0, 12, 4):
            grp = flat[r, k:k + 4].abs()
            expect = torch.zeros(4, dtype=torch.bool)
            expect[torch.argsort(grp, descending=True)[:2]] = True
            assert torch.equal(mflat[r, k:k + 4], expect)


def test_existing_mask_is_never_revived_and_bad_size():
    w = torch.tensor([[5.0, 4.0, 1.0, 0.5]])
    keep = torch.tensor([[False, True, True, True]])
    assert nm_mask(w, 2, 4, keep).tolist() == [[False, True, True, False]]
    with pytest.raises(ValueError, match="multiple of 4"):
        nm_mask(torch.randn(2, 6), 2, 4)
