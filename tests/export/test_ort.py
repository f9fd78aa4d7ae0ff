"""OrtModule, ORT latency and the CPU saturation check."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nnsqueeze.errors import DataError, ExportError
from nnsqueeze.export.onnx import export_onnx
from nnsqueeze.export.ort import OrtModule, optimized_op_types, ort_latency_ms


class TwoInTwoOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(2, 3)

    def forward(self, x, mask):
        h = self.a(x) + self.b(mask)
        return h, h.sum(-1)


@pytest.fixture
def two_io(tmp_path):
    torch.manual_seed(0)
    model = TwoInTwoOut().eval()
    path = tmp_path / "m.onnx"
    export_onnx(model, path, (torch.randn(2, 4), torch.randn(2, 2)))
    return model, path


def test_positional_and_keyword_inputs(two_io):
    model, path = two_io
    m = OrtModule(path, threads=1)
    x, mask = torch.randn(5, 4), torch.randn(5, 2)
    ref = model(x, mask)
    for got in (m(x, mask), m(input_0=x, input_1=mask), m({"input_0": x, "input_1": mask})):
        assert isinstance(got, tuple) and len(got) == 2
        assert all(torch.allclose(g, r, atol=1e-5) for g, r in zip(got, ref))
    assert m.eval() is m and m.to("cpu") is m


def test_bad_inputs_are_data_errors(two_io):
    m = OrtModule(two_io[1])
    with pytest.raises(DataError, match="got 1 inputs"):
        m(torch.randn(2, 4))
    with pytest.raises(DataError, match="missing inputs"):
        m(input_0=torch.randn(2, 4))


def test_dict_example_inputs_use_forward_argument_names(tmp_path):
    torch.manual_seed(1)

    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, features, scale):
            return self.lin(features) * scale

    model = KW().eval()
    inputs = {"scale": torch.rand(4, 1), "features": torch.randn(4, 3)}  # not in signature order
    figs = export_onnx(model, tmp_path / "kw.onnx", inputs, samples=[{"features": torch.randn(6, 3),
                                                                      "scale": torch.rand(6, 1)}])
    m = OrtModule(tmp_path / "kw.onnx")
    assert m.input_names == ["features", "scale"] and figs["verified_samples"] == 10
    assert torch.allclose(m(**inputs), model(**inputs), atol=1e-6)


def test_latency_and_optimized_ops(two_io):
    _, path = two_io
    ms = ort_latency_ms(path, (torch.randn(8, 4), torch.randn(8, 2)), threads=1, warmup=1, runs=3)
    assert isinstance(ms, float) and ms > 0
    ops = optimized_op_types(path)
    assert set(ops) & {"Gemm", "FusedGemm", "MatMul"}, ops


def test_unloadable_model_is_an_export_error(tmp_path):
    p = tmp_path / "junk.onnx"
    p.write_bytes(b"not onnx")
    with pytest.raises(ExportError, match="cannot load"):
        OrtModule(p)
