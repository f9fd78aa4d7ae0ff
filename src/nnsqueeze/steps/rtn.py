"""Step ``rtn`` (alias ``weight-only``): weight-only round-to-nearest quantization, no data needed.

One technique, one implementation: the grid is :mod:`nnsqueeze.ops.rtn` (group-wise, symmetric or
not, MSE clipping, fp16/bf16 scales), layers are selected, quantized and recorded by :class:`RTN`.
The two names differ only in what they select and how they store a layer, kept so that recipes and
artifacts written for either keep working:

- ``rtn`` (causal LMs): the Linear / ``Conv1D`` layers inside the decoder blocks, plus layers outside
  them that a target names (``targets: [lm_head]``), e.g. an int8 ``lm_head`` next to int4 blocks.
  ``pack: true`` (default) turns each into a :class:`~nnsqueeze.llm.packed.PackedLinear` holding the
  codes, group scales and zero points packed as in ``model.safetensors`` (int4: two codes per byte),
  read by a matrix-vector kernel when generating (bits 4 or 8, ``group_size`` a power of two >= 16
  or null); ``pack: false`` keeps the simulated float weights (any bits 2..8, any group). A
  transformers ``Conv1D`` (GPT-2) is replaced by the equivalent ``nn.Linear`` before packing.
- ``weight-only`` (any model): every plain ``nn.Linear`` becomes a
  :class:`~nnsqueeze.quant.weight_only.WeightOnlyLinear` (float weight plus scales / zero points;
  codes stored in the artifact), run by ONNX Runtime's ``MatMulNBits`` (W8A16, W4A16 g128), bits 4
  or 8, ``group_size`` a power of two >= 16 or -1 (per row); ``embeddings: true`` also stores
  ``nn.Embedding`` tables as per-row int8.

Recipe::

    steps:
      - rtn:  {bits: 8, group_size: null}
      - rtn:  {bits: 4, group_size: 32, scale_dtype: fp16}   # scales exact in fp16 (GPTQ/GGUF exports)
      - rtn:  {bits: 4, group_size: 128, clip: {method: mse, grid: 20, min_ratio: 0.5}}
      - weight-only: {bits: 4, group_size: 128, symmetric: false, embeddings: true}

Example::

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.context import Context
    >>> from nnsqueeze.steps.rtn import WeightOnly
    >>> model = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 3)).eval()
    >>> ctx = Context(); ctx.report.begin_step("weight-only", {})
    >>> model = WeightOnly(WeightOnly.Config(bits=4, group_size=128)).run(model, ctx)
    >>> [type(m).__name__ for m in model]
    ['WeightOnlyLinear', 'ReLU', 'WeightOnlyLinear']
"""

from __future__ import annotations

import re
from typing import Any

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from ..quant.args import QuantArgs
from ..errors import ModelError, RecipeError, TargetError
from ..llm.packed import PackedLinear, fallback_reason
from ..llm.sequential import find_blocks, get_weight, is_linear, set_weight
from ..ops.quant import sqnr_db
from ..ops.rtn import rtn_quantize
from ..quant.embedding import convert_embeddings, rebuild_embeddings
from ..quant.protocol import layer_bits
from ..quant.convert import convert, weight_only_args
from ..quant.weight_only import WeightOnlyLinear
from ..registry import STEPS
from ..targets import set_module
from ._llm import ClipConfig, LLMStep, QuantScheme, check_full_range, note_groups
from .base import StepConfig, recorded_module

PACK_FIELD = Field(True, description="store WeightOnlyLinear modules with packed int4/int8 codes "
              "(bits 4/8, group_size a power of two >= 16 or null); false: simulated float weights")


def check_pack(c):
    if c.pack:
        if c.bits not in (4, 8):
            raise ValueError(f"pack: true stores 4- or 8-bit codes (ONNX Runtime MatMulNBits), got bits {c.bits}; "
                             "use bits 4 or 8, or pack: false to keep the simulated float weights")
        g = c.group_size
        if g is not None and (g < 16 or g & (g - 1)):
            raise ValueError(f"pack: true needs group_size a power of two >= 16 (e.g. 32, 64, 128) or null, got {g}; "
                             "change group_size, or pack: false to keep the simulated float weights")
    return c


CLIP_FIELD = Field(None, description="MSE clipping search per group, e.g. {method: mse, grid: 20, min_ratio: 0.5}")


def clip_args(clip: ClipConfig | None) -> dict[str, Any]:
    """``QuantGrid`` clip arguments of a ``clip`` config (None: no search)."""
    if clip is None:
        return {"clip_grid": 1}
    return {"clip_grid": clip.grid, "clip_min": clip.min_ratio}


def _check_rtn_clip(c):
    if c.clip is not None and c.clip.weighted:
        raise ValueError("clip.weighted needs the Hessian of calibration data, which rtn does not use; "
                         "remove clip.weighted (rtn clips by plain MSE) or use gptq")
    return c


class RTNConfig(QuantScheme):
    pack: bool = PACK_FIELD
    clip: ClipConfig | None = CLIP_FIELD

    _pack_ok = model_validator(mode="after")(check_pack)
    _clip_ok = model_validator(mode="after")(_check_rtn_clip)


def scheme_dict(c: QuantScheme, columns: int | None = None) -> dict[str, Any]:
    """The grid as recorded (``full_range`` and ``uneven_groups`` only when set, so older records read the
    same); with ``columns``, one layer's: its own group size (``uneven_groups``)."""
    full = {"full_range": True} if getattr(c, "full_range", False) else {}
    if c.uneven_groups != "short":
        full["uneven_groups"] = c.uneven_groups
    g = c.group_size if columns is None else c.group_for(columns)
    return {"bits": c.bits, "group_size": g, "symmetric": c.symmetric, **full}


def _as_linear(model: nn.Module, name: str, mod: nn.Module) -> nn.Module:
    """A transformers ``Conv1D`` (weight (in, out)) replaced in ``model`` by the equivalent ``nn.Linear``."""
    if type(mod).__name__ != "Conv1D":
        return mod
    k, n = mod.weight.shape
    lin = nn.Linear(k, n, bias=mod.bias is not None, device=mod.weight.device, dtype=mod.weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(mod.weight.T)
        if mod.bias is not None:
            lin.bias.copy_(mod.bias)
    for key, buf in mod.named_buffers(recurse=False):  # e.g. a pruned layer's weight_mask, as (out, in)
        lin.register_buffer(key, buf.T.contiguous() if buf.shape == mod.weight.shape else buf)
    set_module(model, name, lin)
    return lin


def to_weight_only(model: nn.Module, name: str, mod: nn.Module, c: QuantScheme, where: str) -> WeightOnlyLinear:
    mod = _as_linear(model, name, mod)
    if type(mod) is not nn.Linear:
        raise RecipeError(f"{where}: {name}", f"pack: true converts plain nn.Linear / Conv1D, not {type(mod).__name__}",
                          fix="set pack: false (simulated float weights) or ignore this layer")
    return convert(mod, weight_only_args(c.bits, c.group_for(mod.in_features), c.symmetric,
                                         getattr(c, "full_range", False)))


@torch.no_grad()
def pack_layers(model: nn.Module, packs: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
          c: QuantScheme, where: str) -> int:
    """Turn each layer into a WeightOnlyLinear with exactly the algorithm's codes/scales/zero points.

    ``packs``: name -> (simulated (out, in) weight, scale (out, G), zero point (out, G) in the unsigned
    storage layout of :mod:`nnsqueeze.ops.rtn`). Returns the number of converted layers. The stored dequantized
    weight equals the simulated one (checked).
    """
    for name, (q, scale, zero) in packs.items():
        mod = to_weight_only(model, name, model.get_submodule(name), c, where)
        zp = zero.to(torch.int32)
        if mod.weight_scale_.shape != scale.shape or int(zp.min()) < 0 or int(zp.max()) > (1 << c.bits) - 1:
            raise RuntimeError(f"{where}: {name}: cannot store scales {tuple(scale.shape)} / zero points in "
                               f"WeightOnlyLinear {tuple(mod.weight_scale_.shape)}")  # internal invariant
        mod.weight.copy_(q.to(mod.weight.dtype))
        mod.weight_scale_.copy_(scale)
        mod.weight_zero_point_.copy_(zp.to(torch.uint8))
        if mod.weight.dtype == torch.float32 and not torch.equal(mod.dequantized_weight(), q.to(torch.float32)):
            raise RuntimeError(f"{where}: {name}: packed codes do not reproduce the quantized weight")
        convert(mod, weight_only_args(c.bits, c.group_for(mod.in_features), c.symmetric,
                                      getattr(c, "full_range", False)))  # packed
    return len(packs)


def note_kernel(ctx: Any, step: str) -> None:
    """Packed layers without the matrix-vector kernel dequantize per call: a fallback, reported."""
    why = fallback_reason()
    if why is not None:
        ctx.fallback(step, f"packed-weight kernel unavailable ({why}); packed layers dequantize on every call")


def recorded_scheme(record: dict[str, Any]) -> QuantScheme:
    """The grid a packing step's record names (:func:`scheme_dict`)."""
    return QuantScheme(bits=record["bits"], group_size=record["group_size"], symmetric=record["symmetric"],
                       full_range=record.get("full_range", False), uneven_groups=record.get("uneven_groups", "short"))


def _rebuild(model: nn.Module, config: QuantScheme, record: dict[str, Any]) -> nn.Module:
    if not record.get("pack"):
        return model  # simulated float weights: nothing structural
    c = recorded_scheme(record)
    for name in record.get("layers", []):
        mod = recorded_module(model, name, (nn.Module,), "rtn/gptq record")
        if not isinstance(mod, PackedLinear):  # already rebuilt by an earlier record: nothing to redo
            mod = to_weight_only(model, name, mod, c, "rtn/gptq record")
            convert(mod, weight_only_args(c.bits, c.group_for(mod.in_features), c.symmetric, c.full_range))
    return model


def _named(pattern: str, name: str) -> bool:
    """``pattern`` names module ``name`` exactly or as a full ``re:`` match."""
    return pattern == name or (pattern.startswith("re:") and re.fullmatch(pattern[3:], name) is not None)


class _SkipFilter:
    """``ctx`` whose ``skip`` ignores the layers in ``names`` (everything else passes through)."""

    def __init__(self, ctx: Any, names: set[str]):
        self._ctx, self._names = ctx, names

    def skip(self, step: str, layer: str, reason: str) -> None:
        if layer not in self._names:
            self._ctx.skip(step, layer, reason)

    def __getattr__(self, key: str) -> Any:
        return getattr(self._ctx, key)


class WeightQuantStep(LLMStep):
    """Shared by rtn and gptq: the record names the layers and the scheme; rebuild re-packs them."""

    def record(self):
        clip = self.config.clip
        return {"layers": self.layers_, **scheme_dict(self.config), "pack": self.config.pack,
                "scale_dtype": self.config.scale_dtype, "clip": None if clip is None else clip.model_dump()}

    @classmethod
    def rebuild(cls, model, config, record):
        return _rebuild(model, config, record)


@STEPS.register("rtn")
class RTN(WeightQuantStep):
    """Round-to-nearest, group-wise; uses no data (the report gets the weight SQNR per layer).

    One loop (:meth:`run`): :meth:`layers` selects, :meth:`quantize_layer` quantizes and stores one
    layer, :meth:`finish` closes the step; the ``weight-only`` alias overrides what differs."""
    needs_float = True
    quantizes = True
    trainable_after = False

    Config = RTNConfig

    def named_outside(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """Linear layers outside the blocks named by a module-name or ``re:`` target (e.g. ``lm_head``):
        RTN needs no calibration, so it quantizes them too when asked by name."""
        named = [t for t in self.config.targets if t not in ("Linear", "Conv1D")]
        if not named:
            return []
        prefix, _ = find_blocks(model)
        inside = re.compile(rf"{re.escape(prefix)}\.\d+\..+")
        out = []
        for n, m in model.named_modules():
            if not is_linear(m) or inside.fullmatch(n) or any(_named(t, n) for t in self.config.ignore):
                continue
            if any(_named(t, n) for t in named):
                out.append((n, m))
        return out

    def layers(self, model: nn.Module, ctx: Any) -> list[tuple[str, nn.Module]]:
        """The decoder blocks' selected layers, then the named ones outside them."""
        outside = self.named_outside(model)
        named = {n for n, _ in outside}
        filtered = _SkipFilter(ctx, named)   # those are quantized below, not skipped
        try:
            layers = self.block_layers(model, filtered)
        except TargetError:
            if not outside:
                raise
            layers = []
        taken = {n for n, _ in layers}
        return layers + [(n, m) for n, m in outside if n not in taken]

    def quantize_layer(self, model: nn.Module, name: str, mod: nn.Module, ctx: Any) -> None:
        c = self.config
        w = get_weight(mod)
        r = rtn_quantize(w, c.bits, c.group_for(w.shape[1]), c.symmetric, c.scale_dtype, **clip_args(c.clip),
                         unsigned=True, full_range=c.full_range)
        set_weight(mod, r.weight)
        sqnr = round(sqnr_db(w, r.weight, exact=False), 3)   # a report figure: float32 sums
        ctx.report.layer(name, method="rtn", weight_sqnr_db=sqnr, **scheme_dict(c, w.shape[1]))
        if c.pack:
            pack_layers(model, {name: (r.weight, r.scale, r.zero_point)}, c, self.where)

    def finish(self, model: nn.Module, ctx: Any) -> None:
        if self.config.pack:
            note_kernel(ctx, self.registered_name)

    def run(self, model, ctx):
        self.layers_ = []
        layers = self.layers(model, ctx)
        if hasattr(self.config, "group_for"):
            note_groups(ctx, self.registered_name, self.config, layers)
        for name, mod in layers:
            self.quantize_layer(model, name, mod, ctx)
            self.layers_.append(name)
        self.finish(model, ctx)
        return model


class WeightOnlyConfig(StepConfig):
    bits: int = Field(4, description="4 or 8 (ONNX Runtime MatMulNBits)")
    group_size: int = Field(128, description="input elements per scale: a power of two >= 16, or -1 (per row)")
    symmetric: bool = True
    full_range: bool = Field(False, description="symmetric only: the grid over every code, "
                             "absmax / (2**(bits-1) - 0.5) (nnsqueeze.ops.rtn)")
    embeddings: bool = Field(False, description="also store nn.Embedding tables as per-row int8")

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v not in (4, 8):
            raise ValueError("must be 4 or 8 (the widths ONNX Runtime's MatMulNBits runs)")
        return v

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v != -1 and (v < 16 or v & (v - 1)):
            raise ValueError("must be a power of two >= 16 (e.g. 32, 64, 128) or -1 for one group per row")
        return v

    @model_validator(mode="after")
    def _full_range(self):
        return check_full_range(self)

    def args(self) -> QuantArgs:
        """The weights' :class:`~nnsqueeze.quant.args.QuantArgs` (activations stay float)."""
        return QuantArgs(bits=self.bits, symmetric=self.symmetric, full_range=self.full_range,
                         granularity="channel" if self.group_size < 0 else f"group({self.group_size})")


@STEPS.register("weight-only")
class WeightOnly(RTN):
    """``rtn`` on any model: every plain ``nn.Linear`` becomes a ``WeightOnlyLinear`` (module docstring)."""

    Config = WeightOnlyConfig
    default_targets = ["Linear"]

    def layers(self, model: nn.Module, ctx: Any) -> list[tuple[str, nn.Module]]:
        out = []
        for lname, mod in self.select(model, ctx, supported=(nn.Linear,)).layers:
            if type(mod) is not nn.Linear:
                ctx.skip(self.registered_name, lname, f"{type(mod).__name__} is not a plain nn.Linear")
            else:
                out.append((lname, mod))
        return out

    def _scheme_text(self) -> str:
        c = self.config
        g = "per-row" if c.group_size < 0 else f"g{c.group_size}"
        return f"w{c.bits} {g} {'sym' if c.symmetric else 'asym'} / float activations"

    def quantize_layer(self, model: nn.Module, name: str, mod: nn.Module, ctx: Any) -> None:
        c = self.config
        convert(mod, weight_only_args(c.bits, c.group_size, c.symmetric, c.full_range))
        sqnr = mod.weight_sqnr_db()
        ctx.report.layer(name, **layer_bits(mod), scheme=self._scheme_text(),
                         weight_sqnr_db=round(sqnr, 2) if abs(sqnr) != float("inf") and sqnr == sqnr else None)

    def finish(self, model: nn.Module, ctx: Any) -> None:
        c = self.config
        if not self.layers_:
            raise ModelError(self.where, "no plain nn.Linear left to quantize", fix="target plain nn.Linear modules")
        self.embeddings_ = convert_embeddings(model, c.ignore, f"{self.where}.ignore", ctx, self.registered_name) \
            if c.embeddings else []
        ctx.report.step(quantized_layers=len(self.layers_), weight_bits=c.bits, scheme=self._scheme_text())

    def record(self) -> dict[str, Any]:
        if not hasattr(self, "layers_"):
            return {}
        c = self.config
        info = {"bits": c.bits, "group_size": c.group_size, "symmetric": c.symmetric,
                **({"full_range": True} if c.full_range else {})}
        return {"layers": {n: dict(info) for n in self.layers_}, "embeddings": self.embeddings_}

    @classmethod
    def rebuild(cls, model: nn.Module, config: WeightOnlyConfig, record: dict[str, Any]) -> nn.Module:
        for lname, info in record.get("layers", {}).items():
            mod = recorded_module(model, lname, (nn.Linear,), "weight-only record")
            convert(mod, weight_only_args(int(info["bits"]), int(info["group_size"]), bool(info["symmetric"]),
                                          bool(info.get("full_range", False))))
        rebuild_embeddings(model, record.get("embeddings", []))
        return model
