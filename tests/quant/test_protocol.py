"""The declared quantized-module protocol (nnsqueeze.quant.protocol): every family implements its
parts (no abstract method left, since class swapping never instantiates), the declared methods
return the real values (float64 references), and export / artifact read them by isinstance."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nnsqueeze import artifact
from nnsqueeze.errors import ModelError
from nnsqueeze.llm.packed import PackedLinear, pack_linear_
from nnsqueeze.quant import attention, functional
from nnsqueeze.quant.dynamic import DynamicQuantLinear, convert_dynamic_
from nnsqueeze.quant.embedding import QuantEmbedding, convert_embedding_
from nnsqueeze.quant.half import HALF_MAP, convert_half_
from nnsqueeze.quant.modules import MODULE_MAP, convert_
from nnsqueeze.quant.protocol import ExportHints, Packable, QuantizedModule, QuantizedOp
from nnsqueeze.quant.weight_only import WeightOnlyLinear, convert_weight_only_
from nnsqueeze.steps import cluster, share

QUANTIZED = [*MODULE_MAP.values(), DynamicQuantLinear, WeightOnlyLinear, PackedLinear, QuantEmbedding,
             *HALF_MAP.values(), *cluster._CLASSES.values()]
PACKABLE = [*MODULE_MAP.values(), DynamicQuantLinear, WeightOnlyLinear, PackedLinear, QuantEmbedding,
            *cluster._CLASSES.values(), *share._CLASSES.values()]
OPS = [functional.QuantAdd, functional.QuantMatMul, attention.AttentionQuant]


@pytest.mark.parametrize("cls", sorted(set(QUANTIZED + PACKABLE + OPS), key=lambda c: c.__name__),
                         ids=lambda c: c.__name__)
def test_every_family_implements_its_parts(cls):
    assert not cls.__abstractmethods__
    assert issubclass(cls, QuantizedModule) == (cls in QUANTIZED)
    assert issubclass(cls, Packable) == (cls in PACKABLE)
    assert issubclass(cls, QuantizedOp) == (cls in OPS)
    assert issubclass(cls, ExportHints) == (cls in QUANTIZED or cls in OPS)


def _w64(layer):
    return layer.weight.detach().double()


def test_dequantized_weight_and_qparams_match_closed_forms():
    torch.manual_seed(0)
    # fake-quant, symmetric per-channel int8: round(w / s) * s with s = absmax / 127
    q = convert_(nn.Linear(9, 4))
    s = _w64(q).abs().amax(1) / 127
    ref = torch.clamp(torch.round(_w64(q) / s[:, None]), -127, 127) * s[:, None]
    assert torch.allclose(q.dequantized_weight().double(), ref, rtol=0, atol=1e-6)
    assert set(q.qparams()) == {"weight_scale_", "input_scale_", "input_zero_point_"}
    assert q.qparams()["weight_scale_"] is q.weight_scale_
    # dynamic asymmetric uint8: (codes - zp) * s, codes in [0, 255]
    d = convert_dynamic_(nn.Linear(9, 4), bits=8, signed=False)
    codes = d.weight_codes().double()
    assert codes.min() >= 0 and codes.max() <= 255
    ref = (codes - d.weight_zero_point_.double()[:, None]) * d.weight_scale_.double()[:, None]
    assert torch.equal(d.dequantized_weight().double(), ref.float().double())
    # weight-only int4 packed: the packed layer dequantizes to the same weight it was made from
    wo = convert_weight_only_(nn.Linear(64, 3), bits=4, group_size=32)
    before = wo.dequantized_weight().detach().clone()
    assert torch.equal(pack_linear_(wo).dequantized_weight(), before)
    assert set(wo.qparams()) == {"weight_scale_", "weight_zero_point_"}
    # embedding: int8 codes times per-row scales; half: the half weight widened exactly
    e = convert_embedding_(nn.Embedding(7, 5))
    assert torch.equal(e.dequantized_weight(), e.weight_codes().float() * e.weight_scale_[:, None])
    h = convert_half_(nn.Linear(5, 2), torch.float16)
    assert h.dequantized_weight().dtype == torch.float32 and torch.equal(h.dequantized_weight().half(), h.weight)
    assert h.qparams() == {}


def test_clustered_dequantized_weight_is_the_decoded_table():
    m = nn.Linear(3, 2)
    codes = torch.tensor([[0, 1, 2], [2, 1, 0]])
    cluster._convert(m, torch.tensor([0.5, -2.0]), codes)
    assert torch.equal(m.dequantized_weight(), torch.tensor([[0.0, 0.5, -2.0], [-2.0, 0.5, 0.0]]))
    assert torch.equal(m.qparams()["centroids"], torch.tensor([0.5, -2.0]))


def test_revertible_is_declared_and_revert_refuses_otherwise():
    assert convert_(nn.Linear(3, 2)).revertible and not convert_(nn.Linear(3, 2), act="relu").revertible
    assert convert_dynamic_(nn.Linear(3, 2)).revertible
    wo = convert_weight_only_(nn.Linear(32, 2), bits=4, group_size=16)
    assert not wo.revertible
    with pytest.raises(ModelError, match="cannot go back to float"):
        wo.revert_()
    q = convert_(nn.Conv1d(2, 3, 3))
    assert type(q.revert_()) is nn.Conv1d and not isinstance(q, QuantizedModule) and not list(q.buffers())


def test_export_hints_are_declared_defaults():
    assert not nn.Linear(2, 2).__class__.__dict__.get("onnx_quantized", False)
    assert convert_dynamic_(nn.Linear(3, 2)).onnx_verify_mean and convert_(nn.Linear(3, 2)).onnx_quantized
    assert not convert_(nn.Linear(3, 2)).onnx_verify_mean
    wo = convert_weight_only_(nn.Linear(32, 2), bits=4, group_size=16)
    assert not wo.onnx_quantized and dict(wo.onnx_custom_opsets) == {"com.microsoft": 1}
    assert convert_half_(nn.Linear(3, 2), torch.bfloat16).onnx_bf16_storage
    assert not convert_half_(nn.Linear(3, 2), torch.float16).onnx_bf16_storage
    c = nn.Linear(3, 2)
    cluster._convert(c, torch.zeros(2), torch.zeros(2, 3, dtype=torch.long))
    assert not c.onnx_quantized and dict(c.onnx_custom_opsets) == {}  # exports as a plain float graph


def test_artifact_packs_only_declared_packables():
    class Probe(nn.Linear):  # not Packable: a pack_state of its own is not the artifact's business
        def pack_state(self, sd, prefix):  # pragma: no cover - must not run
            raise AssertionError("called")

    torch.manual_seed(0)
    model = nn.Sequential(convert_dynamic_(nn.Linear(4, 3)), Probe(3, 2))
    sd = artifact.pack_state(model)
    assert sd["0.weight"].dtype == torch.int8 and sd["1.weight"].dtype == torch.float32
    back = artifact.unpack_state(model, dict(sd))
    assert torch.equal(back["0.weight"], model[0].dequantized_weight())
