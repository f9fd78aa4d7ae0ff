"""compressed-tensors ``float-quantized`` checkpoints from nnsqueeze's FP8 layers (the ``quantize``
step with ``weights: {format: fp8-e4m3}``), the form of llm-compressor's ``FP8`` / ``FP8_DYNAMIC``
schemes, which transformers and vLLM load.

Per FP8 Linear ``name`` (layout and names as the ``compressed-tensors`` package defines them):

- ``name.weight`` ``torch.float8_e4m3fn`` (N, K): nnsqueeze's E4M3 codes unchanged (its encoder is
  torch's own saturating ``.to(torch.float8_e4m3fn)`` bit for bit, so the byte is the same);
- ``name.weight_scale`` float32: ``(1,)`` per tensor (strategy ``tensor``) or ``(N, 1)`` per output
  channel (strategy ``channel``), ``amax / 448``;
- ``name.input_scale`` float32 ``(1,)``: static activations only (strategy ``tensor``, the calibrated
  scale); dynamic activations (strategy ``tensor`` or ``token``, ``dynamic: true``) store no scale;
- ``name.bias`` as it was (float).

The loader dequantizes ``float32(code) * scale``, nnsqueeze's own arithmetic, so the weights are
bit-equal; activations are fake-quantized as ``to_e4m3(clamp(x / s, -448, 448)) * s`` with
``s = amax / 448`` for dynamic ones, again nnsqueeze's. ``quantization_config`` has one
``config_group`` per (weights, activations) scheme, layers by name, ``format: float-quantized``.

What compressed-tensors cannot hold, or nnsqueeze does not write, is an ExportError naming the
nearest scheme that fits: E5M2 (compressed-tensors' 8-bit float is E4M3 only), the MX and NVFP4
block formats (compressed-tensors 0.20 has its own MX/NVFP4 layouts, not written here), FP8
convolutions (its targets are Linears) and an FP8 ``lm_head`` tied to the embedding. ::

    >>> import torch, transformers
    >>> import nnsqueeze as nsq
    >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
    ...                                num_attention_heads=2, max_position_embeddings=16)
    >>> llama = transformers.LlamaForCausalLM(cfg).eval()
    >>> step = {"quantize": {"weights": {"format": "fp8-e4m3"}, "ignore": ["lm_head"],
    ...                      "activations": {"format": "fp8-e4m3", "dynamic": True, "granularity": "per-token"}}}
    >>> ids = torch.zeros(1, 4, dtype=torch.long)
    >>> res = nsq.compress(llama, {"steps": [step], "export": {"onnx": None}, "evaluate": {"runs": 1, "warmup": 0}},
    ...                    calib_data=[ids], metric=None, progress=False, example_inputs=ids)
    >>> out = res.save("fp8-ct", format="compressed-tensors")
    >>> import json; qc = json.loads((out / "config.json").read_text())["quantization_config"]
    >>> qc["format"], qc["config_groups"]["group_0"]["input_activations"]["strategy"], qc["ignore"]
    ('float-quantized', 'token', ['lm_head'])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ExportError
from ..ops.fp8 import fp8_quantize
from ..quant.args import QuantArgs
from ..quant.floatq import FloatQuantMixin

FMT = "compressed-tensors"
FP8_FIX = "quantize: {weights: {format: fp8-e4m3, granularity: per-channel}}"


def float_layers(model: nn.Module) -> dict[str, FloatQuantMixin]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FloatQuantMixin)}


def _refusal(args: QuantArgs, what: str) -> str | None:
    """Why ``args`` (a layer's weights or activations) has no compressed-tensors float form, or None."""
    if args.format == "fp8-e4m3":
        return None
    if args.format == "fp8-e5m2":
        return (f"{what} are fp8-e5m2, and compressed-tensors' 8-bit float type is E4M3 only "
                "(torch.float8_e4m3fn)")
    return (f"{what} are {args.format}, a block format; nnsqueeze writes compressed-tensors' float-quantized "
            "form (FP8 E4M3 per tensor or per channel) only")


def check_float_args(where: str, wargs: QuantArgs, aargs: QuantArgs | None, fix: str = FP8_FIX) -> None:
    """An ExportError when a layer (or a recipe step) of these formats cannot be written."""
    why = _refusal(wargs, "weights")
    if why is not None:
        raise ExportError(where, why, fix=f"quantize with `{fix}`")
    if aargs is not None and _refusal(aargs, "activations") is not None:
        raise ExportError(where, f"activations are {aargs.format}, and compressed-tensors' 8-bit float type is "
                          "E4M3 only", fix="use activations: {format: fp8-e4m3} (or none)")


def _check_layer(name: str, m: FloatQuantMixin, tied: bool) -> None:
    check_float_args(name, m.qargs, m.act_qargs)
    if not isinstance(m, nn.Linear):
        raise ExportError(name, f"is an FP8 {type(m).__name__}; compressed-tensors' schemes target Linear layers",
                          fix="quantize with targets: [Linear]")
    if tied and name == "lm_head":
        raise ExportError(name, "is FP8 and its weight is tied to the (float) input embedding, which "
                          "compressed-tensors stores once", fix="add ignore: [lm_head] to the quantize step")


def _weights(a: QuantArgs) -> dict[str, Any]:
    return {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None,
            "strategy": "channel" if a.granularity == "channel" else "tensor", "dynamic": False}


def _activations(a: QuantArgs | None) -> dict[str, Any] | None:
    if a is None:
        return None
    d = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None,
         "strategy": "token" if a.granularity == "token" else "tensor", "dynamic": bool(a.dynamic)}
    if not a.dynamic and a.observer == "minmax":   # a running min/max over the calibration data
        d["observer"] = "static_minmax"
    return d


def _scale(name: str, s: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    out = s.detach().to(dtype)
    if not torch.equal(out.float(), s.detach().float()):
        raise ExportError(name, f"its FP8 scales are float32 and not {dtype} values", fix="use scale_dtype: fp32")
    return out.reshape(shape).contiguous()


def float_parts(model: nn.Module, layers: dict[str, FloatQuantMixin], tied: bool,
                scale_dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict]:
    """``(tensors, config_groups, schemes)`` of the FP8 ``layers``: their tensors only (the caller adds
    the float rest), every layer checked before anything is built."""
    for name, m in layers.items():
        _check_layer(name, m, tied)
    tensors: dict[str, torch.Tensor] = {}
    groups: dict[str, tuple[dict, list[str]]] = {}
    schemes: dict[str, str] = {}
    for name, m in layers.items():
        channel = m.qargs.granularity == "channel"
        codes = fp8_quantize(m._masked().detach(), m.weight_scale_, m.qargs.format, 0 if channel else None)
        tensors[f"{name}.weight"] = codes.view(torch.float8_e4m3fn).contiguous()
        tensors[f"{name}.weight_scale"] = _scale(name, m.weight_scale_, scale_dtype, (-1, 1) if channel else (1,))
        if m.act_qargs is not None and not m.act_qargs.dynamic:
            tensors[f"{name}.input_scale"] = _scale(name, m.input_scale_, scale_dtype, (1,))
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias.detach().contiguous()
        w, a = _weights(m.qargs), _activations(m.act_qargs)
        key = repr((sorted(w.items()), None if a is None else sorted(a.items())))
        groups.setdefault(key, ({"weights": w, "input_activations": a}, []))[1].append(name)
        schemes[name] = f"{m.qargs.describe()} / {m.act_qargs.describe() if m.act_qargs else 'float activations'}"
    config_groups = {f"group_{i}": {"targets": names, **args, "output_activations": None, "format": "float-quantized"}
                     for i, (args, names) in enumerate(groups.values())}
    return tensors, config_groups, schemes
