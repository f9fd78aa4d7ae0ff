"""Steps ``rtn`` and ``gptq``: weight-only round-to-nearest and GPTQ for causal LMs, block by block.

With ``pack: true`` (default) every quantized layer becomes a
:class:`~nnsqueeze.llm.packed.PackedLinear` (a ``WeightOnlyLinear``) holding exactly the algorithm's
codes, group scales and zero points, packed in memory as in ``model.safetensors`` (int4: two codes
per byte) and read directly by a matrix-vector kernel when generating; ``nsq.load`` rebuilds the
modules; ``pack: false`` keeps the simulated float weights (fake-quantized Linears). Packing
needs ``bits`` 4 or 8 and ``group_size`` a power of two >= 16 or null (ONNX Runtime's MatMulNBits);
other grids are a RecipeError unless ``pack: false``. Grid bridge: symmetric signed codes ``q`` in
``[-2**(b-1), 2**(b-1)-1]`` are stored as ``q + 2**(b-1)`` with zero point ``2**(b-1)``; asymmetric
codes and zero points are stored as they are. transformers' ``Conv1D`` (GPT-2) is replaced by an
``nn.Linear`` with the transposed weight before packing (and so on ``rebuild``). Recipe::

    steps:
      - gptq: {bits: 4, group_size: 128, symmetric: true, act_order: true, damp_percent: 0.01,
               samples: 128, ignore: ["re:.*\\\\.mlp\\\\.down_proj"]}
      - rtn:  {bits: 8, group_size: null}          # no calibration data needed
      - rtn:  {bits: 4, group_size: 32, scale_dtype: fp16}   # scales exact in fp16 (GPTQ/GGUF exports)
      - gptq: {bits: 4, group_size: 128, clip: {method: mse, grid: 20, min_ratio: 0.5}}

``clip`` (both steps): per group, the clipped range with the least squared quantization error
(gptq: each column weighted by the Hessian diagonal unless ``weighted: false``) instead of the full
min/max range; see :mod:`nnsqueeze.llm.rtn`. Off (null) by default.

Per layer the report gets ``error`` (relative output error ``||X dW^T|| / ||X W^T||`` on the
calibration tokens), ``rtn_error`` (the same for round-to-nearest, for comparison), the scheme and
the dampening used; the step figures include peak RSS. A layer pruned before (``weight_mask``)
keeps its zeros: GPTQ quantizes around them. Default targets: every Linear inside the
decoder blocks (``lm_head`` stays float, listed as skipped). ``rtn`` (no calibration) also
quantizes layers outside the blocks that a target names (``targets: [lm_head]`` or a ``re:``
pattern), e.g. an int8 ``lm_head`` next to int4 blocks (two ``rtn`` steps).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import nn

from ..llm.gptq import HessianAccumulator, gptq_quantize
from ..llm.packed import PackedLinear, fallback_reason, pack_linear_
from ..llm.rtn import rtn_quantize
from ..errors import TargetError
from ..llm.sequential import find_blocks, get_weight, is_linear, set_weight
from ..ops.quant import sqnr_db
from ..quant.weight_only import WeightOnlyLinear, convert_weight_only_
from ..registry import STEPS
from .base import recorded_module
from ..targets import set_module
from ._llm import ClipConfig, LLMStep, QuantFields, QuantScheme, relative_error

_PACK = Field(True, description="store WeightOnlyLinear modules with packed int4/int8 codes "
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


_CLIP = Field(None, description="MSE clipping search per group, e.g. {method: mse, grid: 20, min_ratio: 0.5}")


def _clip_args(clip: ClipConfig | None) -> dict[str, Any]:
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
    pack: bool = _PACK
    clip: ClipConfig | None = _CLIP

    _pack_ok = model_validator(mode="after")(check_pack)
    _clip_ok = model_validator(mode="after")(_check_rtn_clip)


class GPTQConfig(QuantFields):
    pack: bool = _PACK
    clip: ClipConfig | None = _CLIP
    damp_percent: float = Field(0.01, gt=0.0, le=1.0, description="dampening, fraction of mean(diag H)")
    act_order: bool = Field(False, description="quantize columns by decreasing Hessian diagonal")
    block_size: int = Field(128, ge=1, description="columns per lazy-update block")
    max_damp_percent: float = Field(10.0, gt=0.0, description="give up (HessianError) past this dampening")

    _pack_ok = model_validator(mode="after")(check_pack)


def _mask_oi(mod) -> torch.Tensor | None:
    """A pruned layer's ``weight_mask`` as (out, in), or None: GPTQ must keep its zeros."""
    m = getattr(mod, "weight_mask", None)
    if not isinstance(m, torch.Tensor):
        return None
    return m.T if type(mod).__name__ == "Conv1D" else m


def scheme_dict(c: QuantScheme) -> dict[str, Any]:
    return {"bits": c.bits, "group_size": c.group_size, "symmetric": c.symmetric}


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
        from ..errors import RecipeError
        raise RecipeError(f"{where}: {name}", f"pack: true converts plain nn.Linear / Conv1D, not {type(mod).__name__}",
                          fix="set pack: false (simulated float weights) or ignore this layer")
    return convert_weight_only_(mod, c.bits, -1 if c.group_size is None else c.group_size, c.symmetric)


@torch.no_grad()
def pack_layers(model: nn.Module, packs: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
          c: QuantScheme, where: str) -> int:
    """Turn each layer into a WeightOnlyLinear with exactly the algorithm's codes/scales/zero points.

    ``packs``: name -> (simulated (out, in) weight, scale (out, G), zero point (out, G) in the
    ``llm/rtn.py`` convention). Returns the number of converted layers. The stored dequantized
    weight equals the simulated one (checked).
    """
    for name, (q, scale, zero) in packs.items():
        mod = to_weight_only(model, name, model.get_submodule(name), c, where)
        zp = zero.to(torch.int32) + ((1 << (c.bits - 1)) if c.symmetric else 0)
        if mod.weight_scale_.shape != scale.shape or int(zp.min()) < 0 or int(zp.max()) > (1 << c.bits) - 1:
            raise RuntimeError(f"{where}: {name}: cannot store scales {tuple(scale.shape)} / zero points in "
                               f"WeightOnlyLinear {tuple(mod.weight_scale_.shape)}")  # internal invariant
        mod.weight.copy_(q.to(mod.weight.dtype))
        mod.weight_scale_.copy_(scale)
        mod.weight_zero_point_.copy_(zp.to(torch.uint8))
        if mod.weight.dtype == torch.float32 and not torch.equal(mod.dequantized_weight(), q.to(torch.float32)):
            raise RuntimeError(f"{where}: {name}: packed codes do not reproduce the quantized weight")
        pack_linear_(mod)  # codes kept packed in memory; the float weight is dropped
    return len(packs)


def note_kernel(ctx: Any, step: str) -> None:
    """Packed layers without the matrix-vector kernel dequantize per call: a fallback, reported."""
    why = fallback_reason()
    if why is not None:
        ctx.fallback(step, f"packed-weight kernel unavailable ({why}); packed layers dequantize on every call")


def _rebuild(model: nn.Module, config: QuantScheme, record: dict[str, Any]) -> nn.Module:
    if not record.get("pack"):
        return model  # simulated float weights: nothing structural
    c = QuantScheme(bits=record["bits"], group_size=record["group_size"], symmetric=record["symmetric"])
    for name in record.get("layers", []):
        mod = recorded_module(model, name, (nn.Module,), "rtn/gptq record")
        if not isinstance(mod, PackedLinear):  # already rebuilt by an earlier record: nothing to redo
            pack_linear_(to_weight_only(model, name, mod, c, "rtn/gptq record"))
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


class _WeightQuantStep(LLMStep):
    """Shared by rtn and gptq: the record names the layers and the scheme; rebuild re-packs them."""

    def record(self):
        clip = self.config.clip
        return {"layers": self.layers_, **scheme_dict(self.config), "pack": self.config.pack,
                "scale_dtype": self.config.scale_dtype, "clip": None if clip is None else clip.model_dump()}

    @classmethod
    def rebuild(cls, model, config, record):
        return _rebuild(model, config, record)


@STEPS.register("rtn")
class RTN(_WeightQuantStep):
    """Round-to-nearest, group-wise; uses no data (the report gets the weight SQNR per layer)."""
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

    def run(self, model, ctx):
        c = self.config
        self.layers_ = []
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
        for name, mod in layers + [(n, m) for n, m in outside if n not in taken]:
            w = get_weight(mod)
            r = rtn_quantize(w, c.bits, c.group_size, c.symmetric, c.scale_dtype, **_clip_args(c.clip))
            q = r.weight
            set_weight(mod, q)
            ctx.report.layer(name, method="rtn", weight_sqnr_db=round(sqnr_db(w, q), 3), **scheme_dict(c))
            self.layers_.append(name)
            if c.pack:
                pack_layers(model, {name: (q, r.scale, r.zero_point)}, c, self.where)
        if c.pack:
            note_kernel(ctx, "rtn")
        return model


@STEPS.register("gptq")
class GPTQ(_WeightQuantStep):
    needs_float = True
    quantizes = True
    trainable_after = False
    Config = GPTQConfig

    def run(self, model, ctx):
        c = self.config
        layers = self.block_layers(model, ctx)
        self.layers_ = [n for n, _ in layers]
        packs = {}

        def apply(name, mod, acc):
            w = get_weight(mod)
            r = gptq_quantize(w, acc.hessian, c.bits, c.group_size, c.symmetric, c.damp_percent, c.act_order,
                              c.block_size, c.max_damp_percent, on_note=lambda s: ctx.fallback("gptq", s),
                              where=f"{self.where}: {name}", mask=_mask_oi(mod), scale_dtype=c.scale_dtype,
                              clip_weighted=c.clip is None or c.clip.weighted is not False, **_clip_args(c.clip))
            set_weight(mod, r.weight)
            if c.pack:
                packs[name] = (r.weight, r.scale, r.zero_point)
            rtn = rtn_quantize(w, c.bits, c.group_size, c.symmetric).weight
            return {"method": "gptq", **scheme_dict(c), "damp_percent": r.damp_percent,
                    "error": round(relative_error(w, r.weight, acc.hessian), 6),
                    "rtn_error": round(relative_error(w, rtn, acc.hessian), 6)}

        def on_block(i, block):
            # Pack this block's layers now (their float copies in `packs` are freed): the next
            # block's inputs come from the packed layers, whose dequantized weights equal the
            # simulated ones exactly, and an offloaded block goes back to disk already packed.
            if c.pack and packs:
                pack_layers(model, packs, c, self.where)
                packs.clear()

        self.figures_ = self.calibrate(model, ctx, layers,
                                       lambda n, m: HessianAccumulator(get_weight(m).shape[1], m.weight.device), apply,
                                       on_block=on_block)
        if c.pack:
            note_kernel(ctx, "gptq")
        return model
