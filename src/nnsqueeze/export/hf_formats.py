"""Open formats out: a causal LM compressed by nnsqueeze's packed weight-only steps (``rtn``,
``gptq`` with ``pack: true``), written as a directory that other loaders open without nnsqueeze.

    import nnsqueeze as nsq
    from nnsqueeze.export.hf_formats import save_pretrained

    result = nsq.compress(llama, {"version": 1, "steps": [{"rtn": {"bits": 4, "group_size": 32,
                              "scale_dtype": "fp16"}}]}, metric=None)
    result.save("out-ct/", format="compressed-tensors", tokenizer=tok)   # transformers / vLLM
    save_pretrained(result.model, "out-gptq/", format="gptq", tokenizer=tok)
    save_pretrained(result.model, "out-gguf/", format="gguf", tokenizer=tok)  # llama.cpp

Formats (one module each, registered in :data:`nnsqueeze.registry.EXPORTERS` under these names):

- ``compressed-tensors`` (:mod:`.compressed_tensors`): ``pack-quantized`` int4/int8, group or
  channel strategy, symmetric or asymmetric; scales stored exactly (float32 unless the scales are
  all exact in the model's dtype); or ``float-quantized`` FP8 E4M3 (:mod:`.ct_float`: per-tensor or
  per-channel weights, static or dynamic per-tensor / per-token activations) from the ``quantize``
  step's ``fp8-e4m3`` format. Pruned models (:mod:`.ct_sparse`): the zeros stay in these weights,
  or a pruned float model is written ``dense``.
- ``gptq`` (:mod:`.gptq_format`): ``qweight``/``qzeros``/``scales``/``g_idx``; v1 (``gptq``) for
  symmetric, v2 (``gptq_v2``) for asymmetric; scales are float16.
- ``gguf`` (:mod:`.gguf_format`): ``Q4_0``/``Q8_0`` (symmetric, group 32, float16 scales) for the
  quantized Linears, F32 (or F16) for the rest, LLaMA architecture; one ``model.gguf`` file.

The HF formats write ``config.json`` (with ``quantization_config``), ``model.safetensors``,
``generation_config.json`` and the tokenizer files when a tokenizer is given. Every directory also
gets ``nnsqueeze_export.json`` (format, layer schemes): a directory holding it is one we wrote and
may be replaced; any other non-empty directory is refused. Writing is atomic (a temporary sibling
directory, then a rename), and every check runs before anything is written.

Exactness: each format's loader computes ``(q - z) * s`` from the stored codes and scales, so the
export is exact when the stored scales are nnsqueeze's scales. Formats storing float16 scales
(``gptq``, ``gguf``) need scales that are float16 values: quantize with ``scale_dtype: fp16``;
other scales raise :class:`~nnsqueeze.errors.ExportError` instead of being rounded silently.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ExportError
from ..llm.packed import PackedLinear
from ..ops.rtn import SCALE_DTYPES
from .preflight import FORMATS, check_recipe

MARKER = "nnsqueeze_export.json"
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Scheme:
    """The grid of one packed layer: ``group_size`` -1 means one group per row."""

    bits: int
    group_size: int
    symmetric: bool

    def recipe(self, **changes: Any) -> str:
        """The ``rtn`` step that gives this scheme (with ``changes``), for error messages."""
        d = {"bits": self.bits, "group_size": self.group_size if self.group_size > 0 else None,
             "symmetric": self.symmetric, **changes}
        body = ", ".join(f"{k}: {'null' if v is None else str(v).lower() if isinstance(v, bool) else v}"
                         for k, v in d.items())
        return f"rtn: {{{body}}}"

    def __str__(self) -> str:
        g = "per-row" if self.group_size <= 0 else f"g{self.group_size}"
        return f"int{self.bits} {g} {'symmetric' if self.symmetric else 'asymmetric'}"


def scheme_of(m: PackedLinear) -> Scheme:
    """The layer's grid, read from its declared ``qargs`` (int, channel or group(n))."""
    a = m.qargs
    return Scheme(a.bits, a.group_size if a.granularity == "group" else -1, a.symmetric)


def packed_layers(model: nn.Module, fmt: str) -> dict[str, PackedLinear]:
    """The model's packed layers, checked to be storable in any format (no AWQ input scales)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    if not layers:
        raise ExportError(f"format {fmt!r}", "the model has no packed weight-only layers",
                          fix="compress with `rtn` or `gptq` (pack: true) first")
    for name, m in layers.items():
        if "input_scale_" in m._buffers:
            raise ExportError(f"{name}", f"AWQ input scales (x / s before the layer) have no place in {fmt}",
                              fix="export with save_pretrained (it folds them into the previous ops), or quantize "
                                  "with `gptq` or `rtn` (pack: true)")
    return layers


def group_count_ok(name: str, m: PackedLinear, fmt: str) -> None:
    """Formats that store whole groups only: ``in_features`` must be a multiple of the group size."""
    g = scheme_of(m).group_size
    if g > 0 and m.in_features % g:
        raise ExportError(name, f"in_features {m.in_features} is not a multiple of group_size {g}: {fmt} "
                          "has no shorter last group",
                          fix=f"quantize with a group_size dividing {m.in_features}, or group_size: null (per row)")


def exact_scales(name: str, m: PackedLinear, dtype: torch.dtype, fmt: str, fix: str) -> torch.Tensor:
    """``m``'s scales in ``dtype``, or an ExportError when that would round them (loaders would then
    compute other weights than nnsqueeze's)."""
    s = m.weight_scale_.detach()
    out = s.to(dtype)
    if not torch.equal(out.to(torch.float32), s.to(torch.float32)):
        worst = float((out.to(torch.float32) - s.float()).abs().max())
        raise ExportError(name, f"{fmt} stores {DTYPE_NAMES.get(dtype, dtype)} scales and this layer's scales "
                          f"are not {DTYPE_NAMES.get(dtype, dtype)} values (rounding error up to {worst:.3g})",
                          fix=f"quantize with `{fix}` so codes are chosen against the stored scales")
    return out


def float_tensors(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Every tensor of the state dict that is not part of a packed layer (embeddings, norms, lm_head,
    biases of packed layers are kept by the formats themselves), less the pruning steps' bool
    ``weight_mask`` buffers: nnsqueeze's bookkeeping, whose zeros are already in the weights."""
    prefixes = tuple(f"{n}." for n in layers)
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()
            if not k.startswith(prefixes) and not k.endswith(".weight_mask")}


def hf_config(model: nn.Module, config: Any, fmt: str) -> Any:
    config = config if config is not None else getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ExportError(f"format {fmt!r}", "needs a Hugging Face config (model.config or config=...)",
                          fix="export a transformers model (e.g. LlamaForCausalLM), or pass config=LlamaConfig(...)")
    return config


def _tokenizer_files(tokenizer: Any) -> dict[str, bytes]:
    if tokenizer is None:
        return {}
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        return {p.name: p.read_bytes() for p in Path(d).iterdir() if p.is_file()}


def _generation_config(model: nn.Module, config: Any) -> str:
    gen = getattr(model, "generation_config", None)
    if gen is None:
        from transformers import GenerationConfig

        gen = GenerationConfig.from_model_config(config)
    return gen.to_json_string(use_diff=True)


def save_pretrained(model: nn.Module, out: str | Path, format: str = "compressed-tensors", tokenizer: Any = None,
                    config: Any = None, overwrite: bool = False, extra: dict[str, bytes | str] | None = None,
                    **options: Any) -> Path:
    """Write ``model`` (packed by nnsqueeze) in ``format`` to the directory ``out``; see the module docstring.

    A non-empty ``out`` is refused unless ``overwrite``, which replaces only the files an export writes
    (and only in a directory that an nnsqueeze export wrote), keeping everything else.

    ``options`` go to the format: ``scale_dtype`` (compressed-tensors: ``fp32``/``fp16``/``bf16``,
    default the exact one), ``sparse_format`` (compressed-tensors: ``dense``, the one that loads;
    see :mod:`.ct_sparse`), ``float_type`` (gguf: ``f32`` default or ``f16`` for the float tensors).
    ``extra``: more files for the directory, by name (``CompressionResult.save`` adds the run's report and
    recipe). Returns ``out``.
    """
    from .. import artifact
    from ..registry import EXPORTERS

    if format not in FORMATS:
        raise ExportError("format", f"unknown format {format!r}", fix=f"use one of: {', '.join(FORMATS)}")
    from .awq_fold import fold_awq

    hooked = [n for n, m in model.named_modules() if getattr(m, "input_rotation", None) is not None]
    if hooked:   # rotate's online Hadamard is a forward pre-hook: no format has an op for it
        raise ExportError(hooked[0], f"rotates its input at run time (rotate's online Hadamard), which {format} "
                          "cannot express", fix="rotate with online_hadamard: false")

    # AWQ input scales move into the previous ops (a folded copy; the caller's model is unchanged)
    model = fold_awq(model, None if format == "compressed-tensors" else torch.float16)
    files, info = EXPORTERS.get(format)(model, tokenizer=tokenizer, config=config, **options)
    if format != "gguf":
        cfg = hf_config(model, config, format)
        files["generation_config.json"] = _generation_config(model, cfg)
        files.update(_tokenizer_files(tokenizer))
    clash = sorted(set(extra or {}) & set(files))
    if clash:
        raise ExportError("extra", f"{clash[0]} is a file the {format} export writes itself", fix="rename it")
    files.update(extra or {})
    from .. import __version__

    # format_version marks the directory as ours (safeio.marker_ok), so overwrite may replace it later
    files[MARKER] = json.dumps({"format_version": 1, "format": format, "nnsqueeze_version": __version__, **info},
                               indent=2)
    return artifact.write_dir(out, files, marker=MARKER, overwrite=overwrite)


def check_scale_dtype(value: str | None, where: str) -> None:
    if value is not None and value not in SCALE_DTYPES:
        raise ExportError(where, f"unknown scale_dtype {value!r}", fix=f"use one of: {', '.join(SCALE_DTYPES)}")


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes (..., n) -> int32 (..., ceil(n * bits / 32)): ``32 / bits`` codes per word along
    the last dimension, code ``i`` of a word in bits ``[i * bits, (i + 1) * bits)`` (the layout of
    compressed-tensors' ``pack-quantized`` and of GPTQ); the last word is padded with zero codes."""
    per = 32 // bits
    n = codes.shape[-1]
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, -n % per))
    c = c.reshape(*c.shape[:-1], -1, per)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    words = (c << shifts).sum(-1)                       # < 2**32, exact in int64
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


__all__ = ["FORMATS", "check_recipe", "save_pretrained"]
