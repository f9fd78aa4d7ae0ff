"""int4 packing (bit-exact on odd shapes) and group-wise quantization against float64 references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nnsqueeze.ops.int4 import (groupwise_dequantize, groupwise_qparams, groupwise_quantize, pack_int4,
                                unpack_int4)


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


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits,group", [(4, 32), (4, -1), (8, 64), (4, 16)])
def test_groupwise_against_float64_reference(bits, group, symmetric):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 83, generator=g)  # K not a multiple of the group size
    s, z = groupwise_qparams(w, bits, group, symmetric)
    q = groupwise_quantize(w, s, z, bits, group)
    wd = groupwise_dequantize(q, s, z, group)
    gs = 83 if group < 0 else group
    w64 = w.double().numpy()
    for n in range(7):
        for gi, k0 in enumerate(range(0, 83, gs)):
            blk = w64[n, k0:k0 + gs]
            if symmetric:
                scale = np.abs(blk).max() / (2 ** (bits - 1) - 1)
                zp = 2 ** (bits - 1)
            else:
                lo, hi = min(blk.min(), 0), max(blk.max(), 0)
                scale = (hi - lo) / (2 ** bits - 1)
                zp = np.clip(np.round(-lo / scale), 0, 2 ** bits - 1)
            assert abs(float(s[n, gi]) - scale) <= 1e-6 * scale and int(z[n, gi]) == zp
            err = np.abs(wd[n, k0:k0 + gs].double().numpy() - blk)
            assert err.max() <= scale / 2 * (1 + 1e-5)  # nothing clipped: at most half a step
