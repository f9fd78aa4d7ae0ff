"""Hugging Face BERT-family encoders: dict inputs and ModelOutput objects through quantization,
ONNX export and ONNX Runtime (a tiny random BertModel; needs the optional ``hf`` extra)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers (the 'hf' extra) is not installed")

import nnsqueeze as nsq  # noqa: E402
from nnsqueeze.export.onnx import export_onnx  # noqa: E402
from nnsqueeze.export.ort import OrtModule  # noqa: E402

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _bert():
    cfg = transformers.BertConfig(vocab_size=101, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                                  attn_implementation="eager",
                                  intermediate_size=67, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def _batch(b=4, t=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, t - 3:] = 0  # padding
    return {"input_ids": torch.randint(0, 101, (b, t), generator=g), "attention_mask": mask,
            "token_type_ids": torch.zeros(b, t, dtype=torch.long)}


def test_bert_exports_with_dict_inputs_and_dynamic_sequence(tmp_path):
    model = _bert()
    dyn = {n: {1: "seq"} for n in INPUTS}
    fig = export_onnx(model, tmp_path / "bert.onnx", _batch(), samples=[_batch(3, 13, 1)], dynamic_axes=dyn)
    assert fig["max_abs_diff"] < 1e-4
    ort_model = OrtModule(tmp_path / "bert.onnx")
    assert ort_model.input_names == list(INPUTS)
    out = ort_model(**_batch(2, 5, 2))
    assert out.shape[:2] == (2, 5)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["int8-dynamic", "w4-g128"])
def test_bert_preset_runs_in_ort(preset):
    model = _bert()
    calib = [_batch(4, 9, s) for s in range(2)]
    res = nsq.compress(model, preset, calib_data=calib, progress=False)
    exp = res.report["export"]["compressed"]
    ops = exp["ort_int8_ops"]  # ORT may share one DynamicQuantizeLinear across Q/K/V (MatMulIntegerToFloat)
    kinds = {"DynamicQuantizeMatMul", "MatMulIntegerToFloat"} if preset == "int8-dynamic" else {"MatMulNBits"}
    assert sum(ops.get(k, 0) for k in kinds) == 12 and set(ops) <= kinds


def _fast(preset: str) -> dict:
    r = nsq.load_recipe(preset).to_dict()
    r["evaluate"].update(warmup=0, runs=1, per_step=False)
    return r


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["int8", "int8-dynamic"])
def test_bert_int8_static_and_dynamic_parity_in_ort(preset):
    """Static W8A8 (calibrated QDQ) and dynamic int8 on a BertModel: dict inputs, a ModelOutput
    from torch, the exported graph's output checked against the quantized torch model."""
    model = _bert()
    calib = [_batch(4, 9, s) for s in range(3)]
    res = nsq.compress(model, _fast(preset), calib_data=calib, metric=None, progress=False)
    exp = res.report["export"]["compressed"]
    assert exp["quantized"] and sum(exp["ort_int8_ops"].values()) == 12  # q, k, v, o, ffn in/out x 2 layers
    held_out = _batch(3, 9, 7)  # other tokens and batch size than the export's (sequence length fixed)
    with torch.no_grad():
        out = res.model(**held_out)
        ref = model(**held_out).last_hidden_state
    assert isinstance(out, transformers.utils.ModelOutput)
    got = OrtModule(res.onnx)(**held_out)
    got = got[0] if isinstance(got, tuple) else got
    q = out.last_hidden_state
    # ORT runs what the torch simulation runs (up to run-time quantization code flips)...
    assert float((got - q).abs().mean()) < 0.02 * float(q.abs().mean())
    # ...and both stay close to the float model (cosine per token).
    cos = torch.nn.functional.cosine_similarity(got.flatten(0, 1), ref.flatten(0, 1), dim=-1)
    assert float(cos.min()) > 0.98, float(cos.min())


def test_bert_preset_smooths_and_keeps_outlier_channels_in_float(tmp_path):
    """``int8-dynamic-bert``: an FFN whose GELU output has one channel ~20x the others gets that
    channel in float on its down-projection; the attention output projection is not smoothed."""
    model = _bert()
    with torch.no_grad():
        for layer in model.encoder.layer:  # plant the outlier: intermediate channel 5 scaled up
            layer.intermediate.dense.weight[5] *= 25.0
            layer.intermediate.dense.bias[5] = 3.0
    calib = [_batch(4, 9, s) for s in range(2)]
    recipe = _fast("int8-dynamic-bert")
    recipe["latency_guard"] = False  # a 2-layer toy is faster in fp32; the guard would undo what is tested
    res = nsq.compress(model, recipe, calib_data=calib, progress=False)
    q = res.model
    for layer in q.encoder.layer:
        assert 5 in layer.output.dense.outlier_index_.tolist()
        assert getattr(layer.attention.output.dense, "input_multiplier_", None) is None
        assert layer.attention.self.query.input_multiplier_ is not None
    exp = res.report["export"]["compressed"]
    assert exp["max_abs_diff"] <= exp["tolerance"] and sum(exp["ort_int8_ops"].values()) >= 12
    res.save(tmp_path / "a")
    back = nsq.load(tmp_path / "a", _bert())
    x = _batch(3, 7, 5)
    with torch.no_grad():
        assert torch.equal(back(**x).last_hidden_state, q(**x).last_hidden_state)


def test_bert_preset_on_another_model_names_the_pattern():
    from torch import nn

    from nnsqueeze.errors import TargetError

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    with pytest.raises(TargetError, match="matches no module"):
        nsq.compress(model, _fast("int8-dynamic-bert"), calib_data=[(torch.randn(4, 8), None)], progress=False,
                     metric=None)
