"""Int8 attention matmuls of Hugging Face encoders (quant/attention.py): the dynamic math against
ONNX Runtime's own DynamicQuantizeLinear + MatMulInteger, and a tiny random BertModel (padding
mask included) quantized statically (``quantize`` with ``ops: [matmul]``) and dynamically
(``quantize-dynamic`` with ``attention: true``), exported and checked in ORT, then rebuilt."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="transformers (the 'hf' extra) is not installed")

from nnsqueeze.context import Context  # noqa: E402
from nnsqueeze.export.onnx import export_onnx  # noqa: E402
from nnsqueeze.ops.dynamic import dynamic_int_matmul  # noqa: E402
from nnsqueeze.quant.attention import IMPL, AttentionQuant  # noqa: E402
from nnsqueeze.steps.quantize import Quantize  # noqa: E402
from nnsqueeze.steps.quantize_dynamic import QuantizeDynamic  # noqa: E402

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
INT_MM = ("MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "DynamicQuantizeMatMul")


def _bert():
    cfg = transformers.BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=37, max_position_embeddings=64, attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def _batch(b=4, t=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, t - 3:] = 0  # padding
    mask[1, t - 1:] = 0
    return {"input_ids": torch.randint(0, 101, (b, t), generator=g), "attention_mask": mask,
            "token_type_ids": torch.zeros(b, t, dtype=torch.long)}


def _ort(path, batch, tmp_path):
    """ORT output on ``batch`` and the op types of the graph ORT optimized (optimized_model_filepath)."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    out = sess.run(None, {k: v.numpy() for k, v in batch.items()})[0]
    return torch.from_numpy(out), [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]


@pytest.mark.ort_isa
def test_dynamic_int_matmul_is_ort_exact():
    """Independent reference: ORT running DynamicQuantizeLinear x2 -> MatMulInteger -> scale."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    nodes = [helper.make_node("DynamicQuantizeLinear", ["A"], ["qa", "sa", "za"]),
             helper.make_node("DynamicQuantizeLinear", ["B"], ["qb", "sb", "zb"]),
             helper.make_node("MatMulInteger", ["qa", "qb", "za", "zb"], ["acc"]),
             helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["sa", "sb"], ["s"]), helper.make_node("Mul", ["accf", "s"], ["Y"])]
    f = TensorProto.FLOAT
    dims = ["d0", "d1", "d2", "d3"]
    graph = helper.make_graph(nodes, "dmm", [helper.make_tensor_value_info("A", f, dims),
                                             helper.make_tensor_value_info("B", f, dims)],
                              [helper.make_tensor_value_info("Y", f, dims)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(0)
    for sa, sb in [((2, 3, 5, 7), (2, 3, 7, 11)), ((1, 2, 13, 3), (1, 2, 3, 13))]:
        a = torch.randn(*sa, generator=g) * 3 + 0.7
        b = torch.rand(*sb, generator=g)  # all positive: the range is widened to include 0
        want = sess.run(None, {"A": a.numpy(), "B": b.numpy()})[0]
        got = dynamic_int_matmul(a, b).numpy()
        assert np.allclose(got, want, rtol=1e-6, atol=1e-6)
        # and it is a quantized product, not the float one
        assert not np.allclose(got, (a @ b).numpy(), rtol=1e-6, atol=1e-6)


def _static(model, calib, ops):
    ctx = Context(calib_data=calib)
    ctx.report.begin_step("quantize", {})
    step = Quantize(Quantize.Config(weights={"reduce_range": True}, ops=ops))
    return step.run(model, ctx), step, ctx


def test_static_bert_attention_in_ort_and_rebuild(tmp_path):
    calib = [_batch(4, 9, s) for s in range(2)]
    linear_only, _, _ = _static(_bert(), calib, [])
    model, step, ctx = _static(_bert(), calib, ["matmul"])
    rec = step.record()["ops"]["attention"]
    assert rec["mode"] == "static" and rec["previous"] == ["eager"] and len(rec["modules"]) == 2
    assert model.config._attn_implementation == IMPL
    aq = model.get_submodule(rec["modules"][0]).attn_quant
    assert isinstance(aq, AttentionQuant) and float(aq.probs_scale_) <= 1 / 255 + 1e-6  # probs in [0, 1]
    assert any("softmax" in s["layer"] for s in ctx.report.skipped)  # float by design, reported
    held = _batch(3, 11, 7)  # other batch size and sequence length, with padding
    with torch.no_grad():
        ref = model(**held).last_hidden_state
        lin = linear_only(**held).last_hidden_state
    assert float((ref - lin).abs().max()) > 1e-4  # the attention matmuls really are quantized

    path = tmp_path / "bert.onnx"
    export_onnx(model, path, _batch(), dynamic_axes={n: {1: "seq"} for n in INPUTS}, verify=False)
    got, ops = _ort(path, held, tmp_path)
    # 12 Linears (q, k, v, o, ffn in/out x 2 layers) + 4 attention matmuls, all on integer codes
    assert sum(ops.count(k) for k in INT_MM) == 16 and "MatMul" not in ops
    one_step = float(ref.max() - ref.min()) / 255
    assert float((got - ref).abs().max()) <= one_step

    fresh = _bert()
    rebuilt = Quantize.rebuild(fresh, step.config, json.loads(json.dumps(step.record())))
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(rebuilt(**held).last_hidden_state, ref)


def test_dynamic_bert_attention_in_ort_and_rebuild(tmp_path):
    model = _bert()
    fresh = copy.deepcopy(model)
    ctx = Context()
    ctx.report.begin_step("quantize-dynamic", {})
    step = QuantizeDynamic(QuantizeDynamic.Config(attention=True, weights={"reduce_range": True}))
    model = step.run(model, ctx)
    rec = step.record()["attention"]
    assert rec["mode"] == "dynamic" and len(rec["modules"]) == 2
    held = _batch(3, 11, 7)
    with torch.no_grad():
        ref = model(**held).last_hidden_state
        # the same layers without the attention quantizers: the attention must change the output
        no_attn = copy.deepcopy(model)
        for n in rec["modules"]:
            del no_attn.get_submodule(n)._modules["attn_quant"]
        assert float((no_attn(**held).last_hidden_state - ref).abs().max()) > 1e-5

    path = tmp_path / "bert_dyn.onnx"
    fig = export_onnx(model, path, _batch(), dynamic_axes={n: {1: "seq"} for n in INPUTS})
    assert fig["check"] == "mean abs diff"
    got, ops = _ort(path, held, tmp_path)
    assert sum(ops.count(k) for k in INT_MM) == 16 and "MatMul" not in ops
    # run-time ranges: torch and ORT agree up to float rounding (a code flip at most, rarely)
    one_step = float(ref.max() - ref.min()) / 255
    assert float((got - ref).abs().max()) <= one_step and float((got - ref).abs().mean()) < 1e-4

    rebuilt = QuantizeDynamic.rebuild(fresh, step.config, json.loads(json.dumps(step.record())))
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(rebuilt(**held).last_hidden_state, ref)


def test_attention_option_on_a_model_without_hf_attention_is_reported():
    ctx = Context()
    ctx.report.begin_step("quantize-dynamic", {})
    step = QuantizeDynamic(QuantizeDynamic.Config(attention=True))
    step.run(nn.Sequential(nn.Linear(4, 4)), ctx)
    assert step.record()["attention"] == {}
    assert any("AttentionInterface" in s["reason"] for s in ctx.report.skipped)


@pytest.mark.parametrize("acts", [{"bits": 8, "symmetric": True}, {"bits": 4}], ids=["s8", "u4"])
def test_static_attention_follows_the_activation_format(acts, tmp_path):
    """``activations`` other than uint8 reach the attention matmuls: codes in the scheme's range,
    recorded for the rebuild, and ORT (integer MatMuls on the codes) agrees with torch."""
    from nnsqueeze.quant.act_scheme import ActScheme

    scheme = ActScheme(**acts)
    calib = [_batch(4, 9, s) for s in range(2)]
    ctx = Context(calib_data=calib)
    ctx.report.begin_step("quantize", {})
    step = Quantize(Quantize.Config(weights={"reduce_range": True}, ops=["matmul"], activations=acts))
    model = step.run(_bert(), ctx)
    rec = step.record()["ops"]["attention"]
    assert rec["act_scheme"] == scheme.to_dict() and len(rec["modules"]) == 2
    aq = model.get_submodule(rec["modules"][0]).attn_quant
    assert aq.ascheme == scheme and "q@k^T, p@v: " + scheme.describe() in str(ctx.report.layers)
    qmin, qmax = scheme.qrange
    assert all(qmin <= int(aq._buffers[f"{n}_zero_point_"]) <= qmax for n in ("query", "key", "probs", "value"))
    if scheme.symmetric:
        assert int(aq.query_zero_point_) == 0
    held = _batch(3, 11, 7)
    with torch.no_grad():
        ref = model(**held).last_hidden_state
    path = tmp_path / "bert.onnx"
    export_onnx(model, path, _batch(), dynamic_axes={n: {1: "seq"} for n in INPUTS}, verify=False)
    got, ops = _ort(path, held, tmp_path)
    import onnx

    opt = onnx.load(str(tmp_path / "opt.onnx")).graph
    consts = {i.name for i in opt.initializer}
    # the 4 attention matmuls (both operands activations) run on integer codes in ORT
    b_input = {"QLinearMatMul": 3}  # (a, a_scale, a_zp, b, ...); the others: (a, b, ...)
    assert sum(n.op_type in INT_MM and n.input[b_input.get(n.op_type, 1)] not in consts for n in opt.node) == 4
    if not scheme.symmetric:  # and so do the 12 Linears
        assert sum(ops.count(k) for k in INT_MM) == 16 and "MatMul" not in ops
    assert float((got - ref).abs().max()) <= float(ref.max() - ref.min()) / 255

    rebuilt = Quantize.rebuild(_bert(), step.config, json.loads(json.dumps(step.record())))
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert rebuilt.get_submodule(rec["modules"][1]).attn_quant.ascheme == scheme
    with torch.no_grad():
        assert torch.equal(rebuilt(**held).last_hidden_state, ref)
