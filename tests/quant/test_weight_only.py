"""Weight-only int8/int4 group-wise Linear: MatMulNBits parity in ORT, packed storage."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nnsqueeze.export.onnx import export_onnx
from nnsqueeze.ops.int4 import unpack_int4
from nnsqueeze.quant.weight_only import convert_weight_only_, matmul_nbits_blob


@pytest.mark.parametrize("bits,group,sym", [(4, 128, True), (4, 32, False), (8, -1, True), (8, 64, False),
                                            (4, -1, False)])
def test_matmul_nbits_parity(tmp_path, bits, group, sym):
    m = nn.Sequential(nn.Linear(300, 29), nn.GELU(), nn.Linear(29, 11, bias=False)).eval()  # odd K, N
    fp32 = export_onnx(m, tmp_path / "f.onnx", torch.randn(3, 5, 300))["size_bytes"]
    for layer in (m[0], m[2]):
        convert_weight_only_(layer, bits, group, sym)
    x = torch.randn(3, 5, 300)
    fig = export_onnx(m, tmp_path / "m.onnx", x, samples=[torch.randn(2, 5, 300)])
    assert fig["ort_int8_ops"] == {"MatMulNBits": 2}
    assert fig["max_abs_diff"] < 1e-5  # same dequantized weights, float accumulation order only
    assert fig["size_bytes"] < fp32 * (0.3 if bits == 4 else 0.5)


def test_blob_layout_matches_nibble_order():
    codes = torch.randint(0, 16, (3, 40), dtype=torch.uint8)
    blob = matmul_nbits_blob(codes, 4, 32)  # K = 40 -> 2 blocks of 32, zero padded
    assert blob.shape == (3, 2, 16)
    assert torch.equal(unpack_int4(blob.reshape(3, -1), 64)[:, :40], codes)


@pytest.mark.parametrize("bits,sym", [(4, True), (4, False), (8, False)])
def test_pack_state_round_trip_bit_exact(bits, sym):
    layer = convert_weight_only_(nn.Linear(77, 5), bits, 32, sym)  # 3 groups, odd K
    sd = layer.state_dict()
    layer.pack_state(sd, "")
    assert sd["weight"].dtype == torch.uint8
    assert sd["weight"].shape == ((5, 39) if bits == 4 else (5, 77))
    layer.unpack_state(sd, "")
    assert torch.equal(sd["weight"], layer.dequantized_weight())


def test_bad_group_size():
    with pytest.raises(ValueError):
        convert_weight_only_(nn.Linear(8, 3), 4, 100)
