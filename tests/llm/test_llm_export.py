"""ONNX export of a weight-only int4 LLaMA (Hugging Face, random tiny config): one MatMulNBits per
packed layer, no float weight copies, ORT logits equal to the torch packed model within 1e-4."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nnsqueeze.context import Context
from nnsqueeze.export.causal_lm import export_causal_lm_onnx
from nnsqueeze.llm.packed import PackedLinear
from nnsqueeze.registry import EXPORTERS, STEPS

transformers = pytest.importorskip("transformers", reason="transformers is not installed (optional extra)")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

VOCAB = 97
ATOL = 1e-4   # logits are O(1); ORT accumulates in another order than torch


def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def calib():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, VOCAB, (2, 16), generator=g) for _ in range(2)]


@pytest.mark.parametrize("step,cfg", [("gptq", {"bits": 4, "group_size": 16, "symmetric": False, "samples": 4}),
                                      ("awq", {"bits": 4, "group_size": 32, "n_grid": 4, "samples": 4, "pack": True})],
                         ids=["gptq-g16-asym", "awq-g32-sym"])
def test_int4_llama_exports_to_matmulnbits(step, cfg, tmp_path):
    model = llama()
    ctx = Context(calib_data=calib(), progress=False)
    ctx.report.begin_step(step, cfg)
    cls = STEPS.get(step)
    model = cls(cls.Config(**cfg), 0).run(model, ctx)
    assert sum(isinstance(m, PackedLinear) for m in model.modules()) == 14

    path = tmp_path / "m.onnx"
    assert EXPORTERS.get("onnx-causal-lm") is export_causal_lm_onnx
    fig = export_causal_lm_onnx(model, path, vocab_size=VOCAB)
    assert fig["ort_int8_ops"].get("MatMulNBits") == 14 and fig["max_abs_diff"] <= ATOL

    proto = onnx.load(str(path))
    nodes = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 14 and all(n.domain == "com.microsoft" for n in nodes)
    if step == "awq":
        assert sum(n.op_type == "Div" for n in proto.graph.node) >= 14        # x / s before each MatMulNBits
    # no float copy of the packed weights: float initializers are the embeddings, lm_head, norms, scales
    floats = sum(np.prod(t.dims) for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    packed_fp32 = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, PackedLinear))
    assert floats < 2 * VOCAB * 64 + packed_fp32 / 4

    # independent check on another sequence length (dynamic axis), straight through ONNX Runtime
    ids = torch.randint(0, VOCAB, (1, 13), generator=torch.Generator().manual_seed(9))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})[0]
    with torch.no_grad():
        ref = model(ids).logits.numpy()
    assert got.shape == ref.shape and np.abs(got - ref).max() <= ATOL
