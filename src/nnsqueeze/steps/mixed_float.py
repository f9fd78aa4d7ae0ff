"""The float formats as ``mixed`` candidates: their stored bytes, their conversion and its replay.

The ``mixed`` allocator (:mod:`nnsqueeze.steps.mixed_precision`) calls these three hooks for the
candidate names of :data:`nnsqueeze.sensitivity.FLOAT_FORMATS` (``fp8-e4m3``, ``fp8-e5m2``,
``fp8-e4m3-dynamic``, ``mxfp8-e4m3``, ``mxfp8-e5m2``, ``mxfp6-e3m2``, ``mxfp6-e2m3``, ``mxfp4``,
``nvfp4``):

- :func:`float_format_bytes`: what the artifact stores for one layer in that format (codes, scales,
  bias), the figure the size budget adds up;
- :func:`quantize_float_layers`: one ``quantize`` step per float format present in the allocation,
  with ``targets`` its layers (the step's FP8/MX/NVFP4 path, :mod:`nnsqueeze.steps.quantize_float`),
  so the layers, records, ONNX export and reload are that step's;
- :func:`rebuild_float_layers`: ``nsq.load``'s replay of those steps' records.

Bytes per layer (weight ``(C_out, k)`` viewed as rows of ``k`` inputs, ``b`` bias values, fp32 bias):

| format | weight codes | scales |
|---|---|---|
| ``fp8-*`` | ``C_out * k`` (1 byte) | fp32 per output channel, + one fp32 input scale when static |
| ``mxfp8-*`` | ``C_out * k`` | one E8M0 byte per block of 32 per row (8.25 bits per weight) |
| ``mxfp6-*`` | ``C_out * k`` (FP6 codes one per byte: no FP6 packing yet) | as MXFP8 |
| ``mxfp4`` | ``C_out * ceil(k / 2)`` (two per byte) | one E8M0 byte per 32 (4.25 bits per weight) |
| ``nvfp4`` | ``C_out * ceil(k / 2)`` | one E4M3 byte per 16 (4.5 bits per weight) + the fp32 tensor scale |

::

    >>> from torch import nn
    >>> from nnsqueeze.steps.mixed_float import float_format_bytes
    >>> layer = nn.Linear(64, 10)          # 640 weights, 10 biases (40 bytes)
    >>> [float_format_bytes(layer, f) for f in ("fp8-e4m3", "mxfp4", "nvfp4")]
    [724, 380, 404]
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..quant.args import FORMATS as ARG_FORMATS
from .quantize import Quantize


def _float_formats() -> dict[str, dict[str, Any]]:
    from ..sensitivity import FLOAT_FORMATS

    return FLOAT_FORMATS


def float_format_bytes(layer: nn.Module, fmt: str) -> int:
    """Stored bytes of ``layer``'s parameters in the float candidate format ``fmt`` (table above)."""
    spec = _float_formats()[fmt]
    wfmt = spec["weights"]["format"]
    rows = layer.weight.shape[0]
    k = layer.weight.numel() // rows
    bias = 0 if getattr(layer, "bias", None) is None else 4 * layer.bias.numel()
    info = ARG_FORMATS[wfmt]
    if info.kind == "float":   # FP8: per-channel fp32 scales; a static input scale is one more fp32
        acts = spec.get("activations")
        static = acts is not None and not acts.get("dynamic", False)
        return rows * k + 4 * rows + 4 * static + bias
    codes = rows * ((k + 1) // 2 if info.bits == 4 else k)
    blocks = rows * -(-k // info.block)           # one scale byte per block (E8M0, or E4M3 for NVFP4)
    return codes + blocks + (4 if wfmt == "nvfp4" else 0) + bias


def _config(fmt: str, names: list[str], calibration: dict[str, Any]) -> Any:
    return Quantize.Config.model_validate({"targets": list(names), **_float_formats()[fmt],
                                           "calibration": dict(calibration)})


def _groups(alloc: dict[str, str]) -> dict[str, list[str]]:
    """{float format: its layers}, in the order the formats first appear in ``alloc``."""
    floats = _float_formats()
    groups: dict[str, list[str]] = {}
    for n, f in alloc.items():
        if f in floats:
            groups.setdefault(f, []).append(n)
    return groups


def quantize_float_layers(model: nn.Module, alloc: dict[str, str], ctx: Any, calibration: dict[str, Any], *,
                          name: str | None = None, index: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """Quantize the float-format layers of ``alloc`` ({layer: candidate name}) in place, one ``quantize``
    step per format; returns the model and ``{format: {"layers": [...], "record": that step's record}}``."""
    records: dict[str, Any] = {}
    for fmt, names in _groups(alloc).items():
        step = Quantize(_config(fmt, names, calibration), index)
        if name is not None:
            step.registered_name = name
        model = step.run(model, ctx)
        records[fmt] = {"layers": names, "record": step.record()}
    return model, records


def rebuild_float_layers(model: nn.Module, records: dict[str, Any], calibration: dict[str, Any]) -> nn.Module:
    """Replay :func:`quantize_float_layers`' records onto a fresh model (the state dict fills the scales)."""
    for fmt, entry in records.items():
        model = Quantize.rebuild(model, _config(fmt, entry["layers"], calibration), entry["record"])
    return model


def float_onnx_limit(formats: list[str]) -> str | None:
    """Why an allocation among ``formats`` may not export to an ONNX file ONNX Runtime runs (None: it can)."""
    floats = _float_formats()
    blocks = [f for f in formats if f in floats and ARG_FORMATS[floats[f]["weights"]["format"]].kind == "block"]
    if not blocks:
        return None
    return (f"candidate formats {blocks} are block formats, and ONNX Runtime's CPU provider has no kernel for "
            "block-scaled DequantizeLinear, so a layer allocated to one could not be exported and checked")
