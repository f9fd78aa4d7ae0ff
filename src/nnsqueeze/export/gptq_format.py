"""GPTQ checkpoints (AutoGPTQ / GPTQModel layout, ``quant_method: gptq``) from nnsqueeze's packed
weight-only layers.

Per packed Linear ``name`` with N outputs, K inputs, G = K / group_size groups:

- ``name.qweight`` int32 (K * bits / 32, N): codes packed ``32 / bits`` per word along the *input*
  dimension (word ``i`` of column ``n`` holds inputs ``i * 32 / bits ...``, lowest bits first);
- ``name.qzeros`` int32 (G, N * bits / 32): zero points packed along the output dimension;
- ``name.scales`` float16 (G, N); ``name.g_idx`` int32 (K,) = ``k // group_size`` (nnsqueeze's
  act-order GPTQ keeps contiguous groups, so ``desc_act`` is false and ``g_idx`` is the identity order);
- ``name.bias`` float16 when the layer has one.

The weight is ``(q - z) * s``. ``checkpoint_format`` ``gptq`` (v1) stores ``z - 1`` in ``qzeros``
(loaders add the 1 back), used for symmetric schemes (z = 2**(bits-1)); asymmetric schemes, whose
zero point can be 0 (``z - 1`` = -1 does not fit), are written as ``gptq_v2`` (``qzeros`` = z),
which GPTQModel reads. Scales must be float16 values: quantize with ``scale_dtype: fp16``.
Channel-wise schemes are written with ``group_size: -1`` (one group).
"""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import nn

from ..errors import ExportError
from ..registry import EXPORTERS
from .hf_formats import (Scheme, exact_scales, float_tensors, group_count_ok, hf_config, pack_int32,
                         packed_layers, scheme_of)

FMT = "gptq"


def quantization_config(s: Scheme) -> dict[str, Any]:
    return {"quant_method": "gptq", "bits": s.bits, "group_size": s.group_size, "desc_act": False,
            "sym": s.symmetric, "checkpoint_format": "gptq" if s.symmetric else "gptq_v2",
            "static_groups": False, "true_sequential": True, "damp_percent": 0.01}


def layer_tensors(name: str, m: nn.Module, s: Scheme) -> dict[str, torch.Tensor]:
    """The GPTQ tensors of one packed layer (checked by the caller)."""
    per = 32 // s.bits
    for what, size in (("in_features", m.in_features), ("out_features", m.out_features)):
        if size % per:
            raise ExportError(name, f"{what} {size} is not a multiple of {per}: GPTQ packs {per} int{s.bits} "
                              "codes per int32 word without padding", fix="keep this layer in float (ignore it)")
    scale = exact_scales(name, m, torch.float16, FMT, s.recipe(scale_dtype="fp16"))
    zp = m.weight_zero_point_.to(torch.int32) - (1 if s.symmetric else 0)   # v1 stores z - 1
    g = s.group_size if s.group_size > 0 else m.in_features
    # codes (N, K) packed along K -> (N, K / per) -> transposed to (K / per, N)
    out = {f"{name}.qweight": pack_int32(m.weight_codes(), s.bits).T.contiguous(),
           f"{name}.qzeros": pack_int32(zp.T.contiguous(), s.bits),
           f"{name}.scales": scale.T.contiguous(),
           f"{name}.g_idx": torch.arange(m.in_features, dtype=torch.int32) // g}
    if m.bias is not None:
        out[f"{name}.bias"] = m.bias.detach().to(torch.float16)
    return out


@EXPORTERS.register(FMT)
def export_gptq(model: nn.Module, tokenizer: Any = None, config: Any = None) -> tuple[dict[str, bytes | str], dict]:
    """``(files, info)``: ``model.safetensors`` and ``config.json`` of a GPTQ checkpoint."""
    cfg = hf_config(model, config, FMT)
    layers = packed_layers(model, FMT)
    schemes = {n: scheme_of(m) for n, m in layers.items()}
    kinds = sorted(set(schemes.values()), key=str)
    if len(kinds) > 1:
        raise ExportError(FMT, f"one scheme per checkpoint, the model has {len(kinds)}: "
                          + ", ".join(map(str, kinds)), fix="quantize every layer with the same rtn/gptq settings")
    tensors = float_tensors(model, layers)
    for name, m in layers.items():
        group_count_ok(name, m, FMT)
        tensors.update(layer_tensors(name, m, schemes[name]))
    if getattr(cfg, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    d = cfg.to_dict()
    d["quantization_config"] = quantization_config(kinds[0])
    info = {"scale_dtype": "fp16", "layers": {n: str(s) for n, s in schemes.items()}}
    return {"model.safetensors": st_save(tensors, metadata={"format": "pt"}),
            "config.json": json.dumps(d, indent=2, sort_keys=True)}, info
