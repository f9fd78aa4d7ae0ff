"""The full-range symmetric grid (``full_range: true``: code -8 used at 4 bits) through packing, the
artifact and every exporter that stores codes: each format's own reader (transformers +
compressed-tensors, the GPTQ formula written here, gguf's dequantizer, ONNX Runtime's MatMulNBits)
gives back exactly the weights of the packed model, and those match a float64 reference grid."""

from __future__ import annotations

import functools

import gguf
import numpy as np
import onnxruntime as ort
import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch import nn

import nnsqueeze as nsq
from nnsqueeze.export.gguf_format import gguf_name, rope_rows
from nnsqueeze.export.onnx import export_onnx
from nnsqueeze.llm.packed import PackedLinear
from llm_fixtures import IDS, hf_llama, tokenizer  # noqa: F401 - pytest fixtures

EDGE = {4: -7.5 * 2.0 ** -6, 8: -127.5 * 2.0 ** -10}   # group absmax with an exact scale (2**-6, 2**-10):
# -(2**(b-1) - 0.5) steps, a tie that rounds (half to even) to the extra code -2**(b-1)


def _edged_llama(bits: int):
    """The tiny LLaMA with column 0 of every block Linear at EDGE and the rest of its first group-32 smaller."""
    model = hf_llama()
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and name.startswith("model.layers."):
                m.weight[:, 1:32].clamp_(-0.1, 0.1)
                m.weight[:, 0] = EDGE[bits]
    return model


@functools.lru_cache(maxsize=None)
def _packed(bits: int):
    step = {"rtn": {"bits": bits, "group_size": 32, "symmetric": True, "scale_dtype": "fp16", "full_range": True}}
    return nsq.compress(_edged_llama(bits), {"version": 1, "steps": [step], "export": {"onnx": None},
                                         "evaluate": {"warmup": 0, "runs": 1, "per_step": False}},
                        metric=None, progress=False, example_inputs=IDS[:1])


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}


def _reference(w: torch.Tensor, bits: int, scale: torch.Tensor) -> torch.Tensor:
    """float64 dequantized weight of the full-range grid on the stored (fp16-exact) group scales."""
    s = scale.double().repeat_interleave(32, 1)[:, :w.shape[1]]
    top = (1 << (bits - 1))
    return torch.clamp(torch.round(w.double() / s), -top, top - 1) * s


@pytest.mark.parametrize("bits", [4, 8])
def test_packed_layers_use_code_minus_8_and_match_float64_grid(bits):
    res = _packed(bits)
    fp = _edged_llama(bits)
    layers = _layers(res.model)
    assert len(layers) == 14
    for name, m in layers.items():
        codes = m.weight_codes()
        assert int(codes.min()) == 0 and int(m.weight_zero_point_.min()) == (1 << (bits - 1))  # -2**(b-1) used
        w = fp.get_submodule(name).weight.detach()
        amax = w.double().abs().reshape(w.shape[0], -1, 32).amax(-1)
        # the stored scale: absmax / (2**(b-1) - 0.5) rounded up to fp16
        s = amax / ((1 << (bits - 1)) - 0.5)
        assert bool((m.weight_scale_.double() >= s.float().double()).all())
        assert bool((m.weight_scale_.double() <= s * (1 + 2.0 ** -10)).all())
        ref = _reference(w, bits, m.weight_scale_)
        near_tie = ((w.double() / m.weight_scale_.double().repeat_interleave(32, 1)).abs() % 1 - 0.5).abs() < 1e-5
        got = m.dequantized_weight().double()
        assert torch.equal(got[~near_tie], ref[~near_tie]), name
        assert bool(((got - ref).abs() <= m.weight_scale_.double().repeat_interleave(32, 1)).all())


def test_artifact_round_trip_keeps_the_codes(tmp_path):
    res = _packed(4)
    out = res.save(tmp_path / "art")
    loaded = nsq.load(out, model=hf_llama())
    for name, m in _layers(res.model).items():
        assert torch.equal(loaded.get_submodule(name).dequantized_weight(), m.dequantized_weight()), name
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, res.model(IDS).logits)
    assert res.records[0]["record"]["full_range"] is True


def test_compressed_tensors_loads_bit_equal(tokenizer, tmp_path):  # noqa: F811 - fixture
    res = _packed(4)
    out = res.save(tmp_path / "ct", format="compressed-tensors", tokenizer=tokenizer)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, res.model(IDS).logits)
    for name, m in _layers(res.model).items():
        lin = loaded.get_submodule(name)
        assert torch.equal(lin.weight.detach().float(), m.dequantized_weight()), name


def _unpack(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int64) * bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    if dim == 0:
        return ((w.unsqueeze(1) >> shifts.view(1, per, 1)) & ((1 << bits) - 1)).reshape(-1, w.shape[1])
    return ((w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(w.shape[0], -1)


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_layout_dequantizes_exactly(tmp_path, bits):
    res = _packed(bits)
    out = res.save(tmp_path / "gptq", format="gptq")
    sd = load_file(out / "model.safetensors")
    for name, m in _layers(res.model).items():
        qweight, qzeros, scales, g_idx = (sd[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx"))
        q = _unpack(qweight, bits, 0)
        assert int(q.min()) == 0                                        # the extra code, stored
        z = _unpack(qzeros, bits, 1) + 1                                # v1 stores z - 1
        g = g_idx.long()
        w = (q.float() - z[g].float()) * scales.float()[g]
        assert torch.equal(w.T, m.dequantized_weight()), name


@pytest.mark.parametrize("bits,qtype", [(4, "Q4_0"), (8, "Q8_0")])
def test_gguf_dequantizes_exactly(tmp_path, bits, qtype):
    res = _packed(bits)
    out = res.save(tmp_path / "gg", format="gguf")
    tensors = {t.name: t for t in gguf.GGUFReader(out / "model.gguf").tensors}
    for name, m in _layers(res.model).items():
        t = tensors[gguf_name(f"{name}.weight")]
        assert t.tensor_type.name == qtype
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))
        heads = {"q_proj": 4, "k_proj": 2}.get(name.rsplit(".", 1)[1])
        if heads:
            w = w[torch.argsort(rope_rows(m.out_features, heads))]
        assert torch.equal(w, m.dequantized_weight()), name


@pytest.mark.parametrize("bits", [4, 8])
def test_matmul_nbits_runs_the_full_range_codes(tmp_path, bits):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(96, 29), nn.GELU(), nn.Linear(29, 11)).eval()      # odd N, short group
    with torch.no_grad():
        m[0].weight[:, 0] = EDGE[bits] * 16
        m[0].weight[:, 1:32].clamp_(-1.0, 1.0)
    res = nsq.compress(m, {"version": 1, "steps": [{"weight-only": {"bits": bits, "group_size": 32,
                                                                     "full_range": True}}],
                           "export": {"onnx": None}, "evaluate": {"warmup": 0, "runs": 1, "per_step": False}},
                       calib_data=[(torch.randn(4, 96), torch.zeros(4))], metric=None, progress=False)
    layer = res.model[0]
    assert layer.full_range and int(layer.weight_codes().min()) == 0
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "m.onnx"
    fig = export_onnx(res.model, path, x)
    assert fig["ort_int8_ops"] == {"MatMulNBits": 2}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]).double()
    # float64 reference from the stored codes and scales, written here: (q - 2**(b-1)) * s
    h = x.double()
    for lin in (res.model[0], res.model[2]):
        s = lin.weight_scale_.double().repeat_interleave(32, 1)[:, :lin.in_features]
        w = (lin.weight_codes().double() - (1 << (bits - 1))) * s
        h = h @ w.T + lin.bias.detach().double()
        if lin is res.model[0]:
            h = torch.nn.functional.gelu(h)
    assert float((got - h).abs().max()) < 1e-4
