"""compressed-tensors ``float-quantized`` (FP8 E4M3) export: compressed-tensors' own decompressor gives
nnsqueeze's dequantized weights bit for bit, transformers (CPU, compressed-tensors 0.20) loads the
directory to bit-equal logits and the same 16 greedy tokens, and what the format cannot hold is an
ExportError naming the scheme that fits, before the run (pre-flight) and at export."""

from __future__ import annotations

import functools
import json

import pytest
import torch
import transformers
from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
from compressed_tensors.quantization import QuantizationConfig
from safetensors.torch import load_file
from torch import nn

import nnsqueeze as nsq
from nnsqueeze.errors import ExportError
from nnsqueeze.export.hf_formats import check_recipe, save_pretrained
from nnsqueeze.quant.floatq import FloatQuantMixin
from llm_fixtures import IDS, VOCAB, hf_llama

STATIC = {"format": "fp8-e4m3"}
DYN_TENSOR = {"format": "fp8-e4m3", "dynamic": True}
DYN_TOKEN = {"format": "fp8-e4m3", "dynamic": True, "granularity": "per-token"}
CALIB = [torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(i)) for i in range(4)]


def _odd_llama():
    """Odd sizes: hidden 44 (2 heads of 22), MLP 70, vocab 97 (FP8 scales are per tensor / row: any shape)."""
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=44, intermediate_size=70, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                   bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(cfg).eval()


@functools.lru_cache(maxsize=None)
def _fp8(weights: str, acts: str | None, odd: bool, lm_head: bool = False):
    """A FP8 CompressionResult (shared between tests: read only)."""
    a = {"static": STATIC, "tensor": DYN_TENSOR, "token": DYN_TOKEN}.get(acts)
    step = {"weights": {"format": "fp8-e4m3", "granularity": weights}, **({"activations": a} if a else {})}
    if not lm_head:
        step["ignore"] = ["lm_head"]
    return nsq.compress(_odd_llama() if odd else hf_llama(), {"version": 1, "steps": [{"quantize": step}],
                        "export": {"onnx": None}, "evaluate": {"warmup": 0, "runs": 1, "per_step": False}},
                        calib_data=CALIB, metric=None, progress=False, example_inputs=IDS[:1])


CASES = [("per-channel", "static", False), ("per-tensor", "static", True), ("per-channel", "token", True),
         ("per-tensor", "tensor", False), ("per-channel", None, True)]


@pytest.mark.parametrize("weights,acts,odd", CASES, ids=[f"{w}-{a}-{'odd' if o else 'h64'}" for w, a, o in CASES])
def test_decompressor_gives_nnsqueeze_weights(tmp_path, weights, acts, odd):
    res = _fp8(weights, acts, odd)
    out = save_pretrained(res.model, tmp_path / "ct", format="compressed-tensors")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    config = QuantizationConfig.model_validate(qc)   # compressed-tensors' own schema accepts it
    assert config.format == "float-quantized" and config.ignore == ["lm_head"]
    (group,) = config.config_groups.values()
    assert group.weights.type == "float" and group.weights.num_bits == 8
    assert group.weights.strategy == weights.removeprefix("per-")
    if acts is None:
        assert group.input_activations is None
    else:
        ia = group.input_activations
        assert (ia.strategy, ia.dynamic) == ({"static": "tensor", "tensor": "tensor", "token": "token"}[acts],
                                             acts != "static")
    sd = load_file(out / "model.safetensors")
    layers = {n: m for n, m in res.model.named_modules() if isinstance(m, FloatQuantMixin)}
    assert set(group.targets) == set(layers) and len(layers) == 14
    for name, m in layers.items():
        part = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
        assert part["weight"].dtype == torch.float8_e4m3fn and part["weight"].shape == m.weight.shape
        assert part["weight_scale"].shape == ((m.out_features, 1) if weights == "per-channel" else (1,))
        assert ("input_scale" in part) is (acts == "static")
        if acts == "static":
            assert torch.equal(part["input_scale"], m.input_scale_.reshape(1))
        w = FloatQuantizationCompressor.decompress(part, group)["weight"]
        assert w.dtype == torch.float32 and torch.equal(w, m.dequantized_weight()), name
        # independent of both: torch's decoding of the stored E4M3 bytes times the scale, exact in float64
        # (4 + 24 significant bits), rounded once to float32: what a float32 multiply gives
        ref = part["weight"].to(torch.float64) * part["weight_scale"].to(torch.float64)
        assert torch.equal(ref.to(torch.float32), m.dequantized_weight()), name
    assert torch.equal(sd["lm_head.weight"], res.model.lm_head.weight)


@pytest.mark.parametrize("weights,acts,odd", CASES, ids=[f"{w}-{a}" for w, a, _ in CASES])
def test_transformers_loads_bit_equal_logits_and_tokens(tmp_path, weights, acts, odd):
    """Measured: transformers 5.25 + compressed-tensors 0.20 on CPU decompress to float32 and
    fake-quantize the activations as nnsqueeze does (x / s, saturate, to E4M3, * s; dynamic s = amax / 448),
    so the tolerance is 0: logits bit-equal."""
    res = _fp8(weights, acts, odd)
    out = res.save(tmp_path / "ct", format="compressed-tensors")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any(isinstance(m, FloatQuantMixin) for m in loaded.modules())
    q = loaded.model.layers[0].self_attn.q_proj
    assert q.quantization_scheme.weights.type == "float"
    with torch.no_grad():
        logits = loaded(IDS).logits
        assert torch.equal(logits, res.model(IDS).logits)
        assert not torch.equal(logits, (_odd_llama() if odd else hf_llama())(IDS).logits)   # FP8 changed them
        kw = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)   # 16, EOS or not
        a, b = loaded.generate(IDS[:1], **kw), res.model.generate(IDS[:1], **kw)
    assert a.shape == (1, IDS.shape[1] + 16) and torch.equal(a, b)
    # the weights compressed-tensors' ModelCompressor decompressed into the loaded model (on the first forward)
    for name, m in res.model.named_modules():
        if isinstance(m, FloatQuantMixin):
            w = loaded.get_submodule(name).weight
            assert w.dtype == torch.float32 and torch.equal(w, m.dequantized_weight()), name


def test_fp8_lm_head_is_written_and_loads(tmp_path):
    res = _fp8("per-channel", "token", False, lm_head=True)
    out = res.save(tmp_path / "ct", format="compressed-tensors")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["ignore"] == [] and "lm_head" in qc["config_groups"]["group_0"]["targets"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, res.model(IDS).logits)


def _smol_shaped(tie=True):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).eval()


def _preflight_error(model, recipe):
    with pytest.raises(ExportError) as e:
        check_recipe(model, recipe, "compressed-tensors")
    return e.value, " ".join(str(e.value).split())


@pytest.mark.parametrize("step, where, words", [
    ({"weights": {"format": "fp8-e5m2"}, "ignore": ["lm_head"]}, "steps[0].quantize.weights.format",
     "quantize: {weights: {format: fp8-e4m3, granularity: per-channel}}"),
    ({"weights": {"format": "fp8-e5m2", "granularity": "per-tensor"}, "ignore": ["lm_head"]},
     "steps[0].quantize.weights.format", "quantize: {weights: {format: fp8-e4m3, granularity: per-tensor}}"),
    ({"weights": {"format": "mxfp4"}, "ignore": ["lm_head"]}, "steps[0].quantize.weights.format",
     "a block format"),
    ({"weights": {"format": "nvfp4"}, "ignore": ["lm_head"]}, "steps[0].quantize.weights.format",
     "format: fp8-e4m3"),
    ({"weights": {"format": "fp8-e4m3"}, "activations": {"format": "fp8-e5m2"}, "ignore": ["lm_head"]},
     "steps[0].quantize.activations.format", "use activations: {format: fp8-e4m3}"),
    ({"weights": {"format": "fp8-e4m3"}}, "steps[0].quantize.targets", "add ignore: [lm_head]"),
])
def test_preflight_refuses_what_float_quantized_cannot_hold(step, where, words):
    model = _smol_shaped()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    err, msg = _preflight_error(model, [{"quantize": step}])
    assert err.where == where and words in msg
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())   # nothing ran


def test_preflight_fp8_fits_and_mixing_is_refused():
    model = _smol_shaped()
    fp8 = {"quantize": {"weights": {"format": "fp8-e4m3"}, "activations": DYN_TOKEN, "ignore": ["lm_head"]}}
    check_recipe(model, [fp8], "compressed-tensors")
    check_recipe(_smol_shaped(tie=False), [{"quantize": {"weights": {"format": "fp8-e4m3"}}}], "compressed-tensors")
    rtn = {"rtn": {"bits": 4, "group_size": 32, "targets": ["re:.*mlp.*"]}}
    _, msg = _preflight_error(model, [rtn, {"quantize": {**fp8["quantize"], "targets": ["re:.*self_attn.*"]}}])
    assert "FP8 layers and packed int layers" in msg
    _, msg = _preflight_error(model, [{"quantize": {}}])          # int quantize: still not a packed form
    assert "step 'quantize' leaves layers it cannot hold" in msg
    for fmt in ("gptq", "gguf"):                                 # FP8 is compressed-tensors only
        with pytest.raises(ExportError, match="step 'quantize' leaves layers"):
            check_recipe(model, [fp8], fmt)


def _convert(model, wfmt, afmt=None):
    from nnsqueeze.quant.args import QuantArgs
    from nnsqueeze.quant.floatq import convert_float_

    for name, m in list(model.named_modules()):
        if type(m) in (nn.Linear, nn.Conv1d) and name != "lm_head":
            convert_float_(m, QuantArgs(format=wfmt), None if afmt is None else QuantArgs(
                format=afmt, granularity="tensor", observer="minmax"))
    return model


@pytest.mark.parametrize("wfmt, afmt, words", [
    ("fp8-e5m2", None, "compressed-tensors' 8-bit float type is E4M3 only"),
    ("mxfp8-e4m3", None, "mxfp8-e4m3, a block format"),
    ("fp8-e4m3", "fp8-e5m2", "use activations: {format: fp8-e4m3}"),
])
def test_export_refuses_formats_it_cannot_hold(tmp_path, wfmt, afmt, words):
    model = _convert(_smol_shaped(tie=False), wfmt, afmt)
    with pytest.raises(ExportError) as e:
        save_pretrained(model, tmp_path / "ct", format="compressed-tensors")
    assert words in " ".join(str(e.value).split()) and not (tmp_path / "ct").exists()


def test_export_refuses_tied_fp8_lm_head_convs_and_mixed_forms(tmp_path, monkeypatch):
    from nnsqueeze.quant.args import QuantArgs
    from nnsqueeze.quant.floatq import convert_float_

    tied = _convert(_smol_shaped(tie=True), "fp8-e4m3")
    convert_float_(tied.lm_head, QuantArgs(format="fp8-e4m3"))
    with pytest.raises(ExportError, match="tied to the"):
        save_pretrained(tied, tmp_path / "a", format="compressed-tensors")
    conv = nn.Sequential(nn.Conv1d(4, 6, 3))
    _convert(conv, "fp8-e4m3")
    conv.config = _smol_shaped().config
    with pytest.raises(ExportError, match="target Linear layers"):
        save_pretrained(conv, tmp_path / "b", format="compressed-tensors")
    res = nsq.compress(hf_llama(), {"version": 1, "steps": [
        {"rtn": {"bits": 4, "group_size": 32, "targets": ["re:.*mlp.*"]}},
        {"quantize": {"weights": {"format": "fp8-e4m3"}, "targets": ["re:.*self_attn.*"]}}],
        "export": {"onnx": None}, "evaluate": {"warmup": 0, "runs": 1, "per_step": False}},
        calib_data=CALIB, metric=None, progress=False, example_inputs=IDS[:1])
    with pytest.raises(ExportError, match="both FP8 and packed int layers"):
        res.save(tmp_path / "c", format="compressed-tensors")
    assert not any((tmp_path / d).exists() for d in "abc")
