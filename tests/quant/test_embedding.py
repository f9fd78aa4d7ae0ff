"""int8 per-row embedding: exact lookups in ORT, packed storage."""

from __future__ import annotations

import torch
from torch import nn

from nnsqueeze.export.onnx import export_onnx
from nnsqueeze.quant.embedding import convert_embedding_


class Emb(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(101, 13)
        self.head = nn.Linear(13, 3)

    def forward(self, ids):
        return self.head(self.emb(ids))


def test_embedding_export_exact(tmp_path):
    m = Emb().eval()
    ids = torch.randint(0, 101, (4, 9))
    fp32 = export_onnx(m, tmp_path / "f.onnx", ids)["size_bytes"]
    convert_embedding_(m.emb)
    fig = export_onnx(m, tmp_path / "m.onnx", ids)
    assert fig["max_abs_diff"] < 1e-6
    assert fig["size_bytes"] < 0.5 * fp32


def test_embedding_error_within_half_step_and_pack():
    e = convert_embedding_(nn.Embedding(17, 5))
    w = e.weight.detach()
    step = w.abs().amax(1, keepdim=True) / 127
    assert ((e.dequantized_weight() - w).abs() <= step / 2 + 1e-7).all()
    sd = e.state_dict()
    e.pack_state(sd, "")
    assert sd["weight"].dtype == torch.int8
    e.unpack_state(sd, "")
    assert torch.equal(sd["weight"], e.dequantized_weight())
