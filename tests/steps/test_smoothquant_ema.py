"""SmoothQuant + static W8A8 with the moving-average observer (``calibration: {method: ema-minmax}``,
llm-compressor's default for static activations): each layer's input scale / zero point equal the
closed form computed here from the smoothed float model's per-batch input ranges."""

from __future__ import annotations

import copy

import torch

import nnsqueeze as nsq
from nnsqueeze.llm.tiny import TinyLlama, TinyLlamaConfig

VOCAB = 71
W8A8 = {"weights": {"bits": 8, "granularity": "per-channel", "symmetric": True, "reduce_range": False},
        "activations": {"bits": 8, "granularity": "per-tensor", "symmetric": False}, "ignore": ["lm_head"]}
FAST = {"warmup": 0, "runs": 1, "per_step": False}


def tiny():
    torch.manual_seed(0)
    return TinyLlama(TinyLlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=80)).eval()


def batches():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, VOCAB, (1, 19), generator=g) for _ in range(6)]   # six one-window batches


def run(model, steps):
    return nsq.compress(model, {"version": 1, "steps": steps, "export": {"onnx": None}, "evaluate": FAST},
                        calib_data=batches(), metric=None, progress=False)


def test_ema_input_ranges_match_the_closed_form():
    sq = {"smoothquant": {"alpha": 0.5, "samples": 6}}
    quant = {"quantize": {**W8A8, "calibration": {"method": "ema-minmax", "samples": 6}}}
    res = run(tiny(), [sq, quant])
    smoothed = run(tiny(), [sq]).model           # the float model the quantize step calibrates on
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.o_proj"]
    seen: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    hooks = [smoothed.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: seen[n].append((float(i[0].min()), float(i[0].max())))) for n in names]
    with torch.no_grad():
        for b in batches():
            smoothed(b)
    for h in hooks:
        h.remove()
    for n in names:
        lo, hi = seen[n][0]
        for bl, bh in seen[n][1:]:                   # x_k = (1 - c) x_{k-1} + c batch_k, c = 0.01
            lo, hi = 0.99 * lo + 0.01 * bl, 0.99 * hi + 0.01 * bh
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        scale = (hi - lo) / 255
        layer = res.model.get_submodule(n)
        assert abs(float(layer.input_scale_) - scale) <= 1e-5 * scale, n
        assert int(layer.input_zero_point_) == round(-lo / scale), n


def test_ema_range_is_narrower_than_minmax_on_uneven_batches():
    sq = {"smoothquant": {"alpha": 0.5, "samples": 6}}
    ema = run(tiny(), [sq, {"quantize": {**W8A8, "calibration": {"method": "ema-minmax", "samples": 6}}}])
    mm = run(copy.deepcopy(tiny()), [sq, {"quantize": {**W8A8, "calibration": {"method": "minmax", "samples": 6}}}])
    n = "model.layers.1.mlp.down_proj"
    assert float(ema.model.get_submodule(n).input_scale_) < float(mm.model.get_submodule(n).input_scale_)
