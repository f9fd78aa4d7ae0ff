import pytest

from nnsqueeze.report import Report, ReportBuilder


def _report():
    rb = ReportBuilder()
    rb.baseline = {"accuracy": 0.95, "params": 1000, "nonzero_params": 1000, "size_bytes": 4096,
                   "latency_ms": {"torch": 2.0, "onnxruntime": 1.0}}
    rb.compressed = {"accuracy": 0.948, "params": 1000, "nonzero_params": 400, "size_bytes": 1024,
                     "latency_ms": {"torch": 2.5, "onnxruntime": 0.5}}
    rb.begin_step("prune", {"sparsity": 0.6})
    rb.step(sparsity=0.6)
    rb.end_step(seconds=1.5)
    rb.layer("fc", sparsity=0.6, bits=8)
    rb.skip("quantize", "norm", "LayerNorm is not supported")
    return rb.build()


def test_summary_ratios_are_computed_from_the_figures():
    rows = {k: (b, c, r) for k, b, c, r in _report().summary_rows()}
    assert rows["accuracy"][2] == "-0.20 pt"
    assert rows["size_bytes"][2] == "4.00x smaller"
    assert rows["nonzero_params"][2] == "2.50x smaller"
    assert rows["latency_ms"][2] == "torch 1.25x slower, onnxruntime 2.00x faster"


def test_markdown_and_json_round_trip():
    r = _report()
    md = r.to_markdown()
    assert "| accuracy | 95.00% | 94.80% | -0.20 pt |" in md
    assert "`norm`: LayerNorm is not supported" in md and "| fc |" in md
    assert Report.from_json(r.to_json()) == r


@pytest.mark.parametrize("text", ["[1, 2]", "\"a string\"", "{not json"])
def test_from_json_refuses_anything_but_an_object(text):
    with pytest.raises(ValueError):
        Report.from_json(text)
