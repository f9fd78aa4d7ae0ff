"""int4 packing, bit-exact on odd shapes (the group-wise grid: tests/ops/test_rtn.py)."""

from __future__ import annotations

import pytest
import torch

from nnsqueeze.ops.int4 import pack_int4, unpack_int4


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (2, 3, 9), (4, 128), (1, 0)])
def test_pack_unpack_round_trip_bit_exact(shape):
    q = torch.randint(0, 16, shape, dtype=torch.uint8)
    p = pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape[-1] == (shape[-1] + 1) // 2
    assert torch.equal(unpack_int4(p, shape[-1]), q)


def test_pack_layout_low_nibble_first():
    q = torch.tensor([1, 2, 3], dtype=torch.uint8)
    assert pack_int4(q).tolist() == [0x21, 0x03]


def test_pack_rejects_wide_codes():
    with pytest.raises(ValueError):
        pack_int4(torch.tensor([16], dtype=torch.uint8))
    with pytest.raises(ValueError):
        unpack_int4(torch.zeros(3, dtype=torch.uint8), 8)
