"""``compressed-tensors`` ``pack-quantized`` checkpoints (the format of llm-compressor, read by
transformers and vLLM) from nnsqueeze's packed weight-only layers.

Per packed Linear ``name`` (the ``compressed-tensors`` package defines the names and layout):

- ``name.weight_packed`` int32 (N, ceil(K * bits / 32)): the codes, ``32 / bits`` per word along
  the input dimension (8 nibbles for int4), low bits first. compressed-tensors codes are signed
  (``q`` in ``[-2**(b-1), 2**(b-1) - 1]``) and packed as ``q + 2**(b-1)``: exactly nnsqueeze's
  unsigned code, so the words hold nnsqueeze's codes unchanged;
- ``name.weight_scale`` (N, G) in the stored scale dtype;
- ``name.weight_zero_point`` (asymmetric only) int32 (ceil(N * bits / 32), G): the zero points
  packed the same way along the *output* dimension (signed ``z - 2**(b-1)`` offset back the same);
- ``name.weight_shape`` int64 (2,): (N, K).

``quantization_config`` holds one ``config_group`` per scheme (``strategy`` ``group`` or
``channel``), targeting the layers by name; the float Linears are listed in ``ignore``. The
loader computes ``(q - z) * s`` in the scale dtype, so float32 scales reproduce nnsqueeze's float32
weights bit for bit. ``scale_dtype`` (default: the model's float dtype when every scale is exact in
it, else float32) picks the stored type; a type that would round a scale is an ExportError.

A model whose quantized layers are nnsqueeze's FP8 layers (``quantize`` with ``weights: {format:
fp8-e4m3}``) is written in the ``float-quantized`` form instead (:mod:`.ct_float`): float8 weights,
float32 weight scales, static input scales or dynamic activations. One form per checkpoint.

A pruned model (``sparsegpt``, ``wanda``, ``prune``, ``nm-prune``; :mod:`.ct_sparse`) keeps its zeros
in these weights; pruned but not quantized, it is written with format ``dense`` (float weights, no
config group). ``nnsqueeze_export.json`` lists the sparse layers; ``sparsity_config`` stays ``{}``
and ``sparse_format`` other than ``dense`` (the bitmask forms) is an ExportError: no loader reads them.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import nn

from ..errors import ExportError
from ..llm.packed import PackedLinear
from ..ops.rtn import SCALE_DTYPES
from ..registry import EXPORTERS
from .ct_float import float_layers, float_parts
from .ct_sparse import check_sparse_format, sparse_layers, sparsity_info
from .hf_formats import (DTYPE_NAMES, Scheme, check_scale_dtype, exact_scales, float_tensors, group_count_ok,
                         hf_config, pack_int32, packed_layers, scheme_of)

FMT = "compressed-tensors"


def _weights_args(s: Scheme) -> dict[str, Any]:
    return {"num_bits": s.bits, "type": "int", "symmetric": s.symmetric,
            "strategy": "group" if s.group_size > 0 else "channel",
            "group_size": s.group_size if s.group_size > 0 else None,
            "block_structure": None, "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {}}


def pack_groups(schemes: dict[str, Scheme]) -> dict[str, Any]:
    """``config_groups`` of packed layers: one group per scheme, layers by name."""
    groups: dict[Scheme, list[str]] = {}
    for name, s in schemes.items():
        groups.setdefault(s, []).append(name)
    return {f"group_{i}": {"targets": names, "weights": _weights_args(s), "input_activations": None,
                           "output_activations": None, "format": "pack-quantized"}
            for i, (s, names) in enumerate(groups.items())}


def quantization_config(config_groups: dict[str, Any], ignore: list[str], fmt: str = "pack-quantized") -> dict:
    """The ``quantization_config`` of config.json (``fmt``: ``pack-quantized``, ``float-quantized`` or
    ``dense``)."""
    return {
        "quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
        "config_groups": config_groups, "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None,
        "sparsity_config": {}, "transform_config": {},
    }


def _scale_dtype(model: nn.Module, layers: dict, wanted: str | None) -> torch.dtype:
    if wanted is not None:
        return SCALE_DTYPES[wanted]
    dt = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    exact = all(torch.equal(m.weight_scale_.to(dt).float(), m.weight_scale_.float()) for m in layers.values())
    return dt if exact and dt in DTYPE_NAMES else torch.float32


@EXPORTERS.register(FMT)
def export_compressed_tensors(model: nn.Module, tokenizer: Any = None, config: Any = None,
                              scale_dtype: str | None = None,
                              sparse_format: str | None = None) -> tuple[dict[str, bytes | str], dict[str, Any]]:
    """``(files, info)``: ``model.safetensors`` and ``config.json`` of a compressed-tensors checkpoint."""
    check_scale_dtype(scale_dtype, f"{FMT}.scale_dtype")
    sparse = sparse_layers(model)
    check_sparse_format(sparse_format, sparse)
    cfg = hf_config(model, config, FMT)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    files, info = _export(model, cfg, tied, scale_dtype, sparse)
    if sparse:
        info["sparsity"] = sparsity_info(sparse)
    return files, info


def _export(model: nn.Module, cfg: Any, tied: bool, scale_dtype: str | None,
            sparse: dict[str, torch.Tensor]) -> tuple[dict[str, bytes | str], dict[str, Any]]:
    fp8 = float_layers(model)
    if not fp8 and sparse and not any(isinstance(m, PackedLinear) for m in model.modules()):
        # pruned, not quantized: float weights holding the zeros, format dense (no config group)
        return _finish(cfg, float_tensors(model, {}), quantization_config({}, [], "dense"), {"form": "dense"}, tied)
    if fp8:   # FP8 layers: compressed-tensors' float-quantized form (export/ct_float.py)
        if any(isinstance(m, PackedLinear) for m in model.modules()):
            raise ExportError(f"format {FMT!r}", "the model has both FP8 and packed int layers; nnsqueeze writes "
                              "one compressed-tensors form per checkpoint",
                              fix="quantize every layer the same way (FP8 with `quantize`, or int with rtn/gptq)")
        dt = SCALE_DTYPES[scale_dtype] if scale_dtype is not None else torch.float32
        parts, groups, fp8_schemes = float_parts(model, fp8, tied, dt)
        ignore = [n for n, mod in model.named_modules() if isinstance(mod, nn.Linear) and n not in fp8]
        tensors = {**float_tensors(model, fp8), **parts}
        return _finish(cfg, tensors, quantization_config(groups, ignore, "float-quantized"),
                       {"scale_dtype": DTYPE_NAMES[dt], "layers": fp8_schemes}, tied)
    layers = packed_layers(model, FMT)
    dt = _scale_dtype(model, layers, scale_dtype)
    tensors = float_tensors(model, layers)
    schemes = {}
    for name, m in layers.items():
        s = schemes[name] = scheme_of(m)
        group_count_ok(name, m, FMT)
        scale = exact_scales(name, m, dt, FMT, s.recipe(scale_dtype=DTYPE_NAMES[dt]))
        tensors[f"{name}.weight_packed"] = pack_int32(m.weight_codes(), s.bits)
        tensors[f"{name}.weight_scale"] = scale.contiguous()
        tensors[f"{name}.weight_shape"] = torch.tensor([m.out_features, m.in_features])
        if not s.symmetric:   # packed along the output dimension (compressed-tensors' packed_dim=0)
            tensors[f"{name}.weight_zero_point"] = pack_int32(m.weight_zero_point_.T, s.bits).T.contiguous()
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias.detach().contiguous()
    ignore = [n for n, mod in model.named_modules() if isinstance(mod, nn.Linear) and n not in layers]
    info = {"scale_dtype": DTYPE_NAMES[dt], "layers": {n: str(s) for n, s in schemes.items()}}
    return _finish(cfg, tensors, quantization_config(pack_groups(schemes), ignore), info, tied)


def _finish(cfg: Any, tensors: dict[str, torch.Tensor], qc: dict[str, Any], info: dict[str, Any],
            tied: bool) -> tuple[dict[str, bytes | str], dict[str, Any]]:
    d = cfg.to_dict()
    d["quantization_config"] = qc
    if "transformers_version" not in d:
        import transformers

        d["transformers_version"] = transformers.__version__
    # weights tied to the embedding (lm_head) are stored once, as transformers does
    if tied and "lm_head.weight" in tensors and "model.embed_tokens.weight" in tensors:
        del tensors["lm_head.weight"]
    return {"model.safetensors": st_save(tensors, metadata={"format": "pt"}),
            "config.json": json.dumps(d, indent=2, sort_keys=True)}, info

