"""fp16/bf16 layers: fp32 I/O, ORT parity, half-size exports."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nnsqueeze.export.onnx import export_onnx
from nnsqueeze.quant.half import convert_half_


def _model():
    return nn.Sequential(nn.Conv1d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(88, 64), nn.GELU(),
                         nn.Linear(64, 5)).eval()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_export_parity_and_size(tmp_path, dtype):
    m = _model()
    x = torch.randn(4, 3, 11)
    fp32 = export_onnx(m, tmp_path / "f.onnx", x)["size_bytes"]
    with torch.no_grad():
        ref = m(x)
    for i in (0, 3, 5):
        convert_half_(m[i], dtype)
    assert m[3].weight.dtype == dtype and m(x).dtype == torch.float32
    fig = export_onnx(m, tmp_path / "h.onnx", x, samples=[torch.randn(7, 3, 11)])
    assert fig["size_bytes"] < 0.65 * fp32
    with torch.no_grad():
        rel = float((m(x) - ref).abs().max() / ref.abs().max())
    assert rel < (2e-3 if dtype == torch.float16 else 2e-2)  # half-precision rounding only
    if dtype == torch.bfloat16:
        assert fig["bf16_constants"] >= 3 and fig["max_abs_diff"] < 1e-5


def test_rejects_other_layers():
    with pytest.raises(TypeError):
        convert_half_(nn.LayerNorm(4), torch.float16)
