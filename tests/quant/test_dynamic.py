"""Dynamic int8 Linear: bit-exact against ONNX Runtime, fused kernels, compact packing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nnsqueeze.export.onnx import export_onnx
from nnsqueeze.errors import ExportError
from nnsqueeze.export.ort import OrtModule
from nnsqueeze.isa import describe, u8s8_saturates
from nnsqueeze.quant.dynamic import DynamicQuantLinear, convert_dynamic_


def _mlp():
    return nn.Sequential(nn.Linear(37, 29), nn.GELU(), nn.Linear(29, 11)).eval()


@pytest.mark.ort_isa
@pytest.mark.parametrize("bits,signed", [(8, False), (7, True), (8, True)])
def test_export_is_bit_exact_and_fused(tmp_path, bits, signed):
    torch.manual_seed(0)
    m = _mlp()
    fp32 = export_onnx(m, tmp_path / "f.onnx", torch.randn(3, 5, 37))["size_bytes"]
    for layer in (m[0], m[2]):
        convert_dynamic_(layer, bits=bits, signed=signed)
    x = torch.randn(3, 5, 37)
    if bits == 8 and signed and u8s8_saturates():
        # ORT's u8s8 kernels here (x86 without VNNI) saturate with 8-bit weight codes: the parity
        # check must refuse the export and say why, naming this CPU's ISA.
        with pytest.raises(ExportError, match="differs") as e:
            export_onnx(m, tmp_path / "m.onnx", x, samples=[torch.randn(2, 5, 37) * 4])
        assert describe()["isa"] in e.value.fix and "reduce_range" in e.value.fix
        assert not (tmp_path / "m.onnx").exists()
        return
    fig = export_onnx(m, tmp_path / "m.onnx", x, samples=[torch.randn(2, 5, 37) * 4])
    assert fig["ort_int8_ops"] == {"DynamicQuantizeMatMul": 2}
    assert fig["max_abs_diff"] < 1e-6  # same integer arithmetic as ORT (GELU in float differs by 1 ulp)
    assert fig["size_bytes"] < 0.7 * fp32  # small layers: graph overhead dominates


def test_weight_codes_and_pack_round_trip():
    layer = convert_dynamic_(nn.Linear(19, 7), bits=8, signed=False)
    q = layer.weight_codes()
    assert int(q.min()) >= 0 and int(q.max()) <= 255
    sd = layer.state_dict()
    layer.pack_state(sd, "")
    assert sd["weight"].dtype == torch.uint8
    layer.unpack_state(sd, "")
    assert torch.equal(sd["weight"], layer.fake_quant_weight().detach())
    assert isinstance(layer, DynamicQuantLinear) and "uint8 asym" in repr(layer)


def test_only_plain_linear():
    class MyLinear(nn.Linear):
        pass

    with pytest.raises(TypeError):
        convert_dynamic_(MyLinear(3, 3))


@pytest.mark.ort_isa
def test_single_layer_bit_exact(tmp_path):
    layer = convert_dynamic_(nn.Linear(1536, 384), bits=8, signed=False).eval()
    x = torch.randn(2, 33, 1536).abs() * 3
    export_onnx(layer, tmp_path / "l.onnx", x)
    with torch.no_grad():
        assert torch.equal(OrtModule(tmp_path / "l.onnx")(x), layer(x))


def _graph(module: nn.Module, x, path) -> list:
    import onnx

    export_onnx(module, path, x, verify=False)
    return [n for n in onnx.load(str(path)).graph.node if n.op_type != "Constant"]  # the constants: inputs


def test_one_dynamic_matmul_symbolic(tmp_path):
    """The dynamic Linear and the dynamic attention matmul write the same pattern (one symbolic):
    DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul(scale_a * scale_b); the Linear's second
    operand is its weight codes and scales, and it adds the bias."""
    from nnsqueeze.quant.attention import AttentionQuant

    class Matmul(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = AttentionQuant("dynamic")

        def forward(self, a, b):
            return self.q.matmul(a, b, "query", "key")

    torch.manual_seed(0)
    lin = convert_dynamic_(nn.Linear(6, 4), bits=8).eval()
    nodes = _graph(lin, torch.randn(3, 6), tmp_path / "l.onnx")
    assert [n.op_type for n in nodes] == ["DynamicQuantizeLinear", "MatMulInteger", "Cast", "Mul", "Mul", "Add"]
    dql, mmi, cast, scale, mul, add = nodes
    assert mmi.input[0] == dql.output[0] and mmi.input[2] == dql.output[2]      # a's codes, zero point
    assert scale.input[0] == dql.output[1] and list(mul.input) == [cast.output[0], scale.output[0]]
    assert add.input[0] == mul.output[0]

    nodes = _graph(Matmul().eval(), (torch.randn(2, 3, 5), torch.randn(2, 5, 4)), tmp_path / "m.onnx")
    assert [n.op_type for n in nodes] == ["DynamicQuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
                                          "Cast", "Mul", "Mul"]
    qa, qb, mmi, cast, scale, mul = nodes
    assert list(mmi.input) == [qa.output[0], qb.output[0], qa.output[2], qb.output[2]]
    assert list(scale.input) == [qa.output[1], qb.output[1]] and list(mul.input) == [cast.output[0], scale.output[0]]
