"""``QuantArgs``: the one description of how a tensor is quantized (issue 13's single scheme type).

One pydantic model (``extra="forbid"``) with the fields every quantizer needs:

- ``format``: ``int`` (an integer grid), ``fp8-e4m3`` / ``fp8-e5m2`` (scaled FP8), the block formats
  ``mxfp8-e4m3``, ``mxfp8-e5m2``, ``mxfp6-e3m2``, ``mxfp6-e2m3``, ``mxfp4``, ``nvfp4``, or the half
  types ``fp16`` / ``bf16`` (the value is cast, no scale); the math is in :mod:`nnsqueeze.ops.fp8`,
  :mod:`nnsqueeze.ops.mx` and :mod:`nnsqueeze.ops.rtn`;
- ``bits``: 2..8 or 16 for ``int``; fixed by the format otherwise (filled in when left out);
- ``symmetric``: zero point 0 (the float formats are always symmetric); ``full_range`` (``int``,
  symmetric): scale ``absmax / (2**(b-1) - 0.5)`` over every signed code instead of
  ``absmax / (2**(b-1) - 1)`` (:mod:`nnsqueeze.ops.rtn`);
- ``granularity``: ``tensor``, ``channel`` (one scale per output channel, axis 0), ``group`` with
  ``group_size`` inputs per scale (``int`` only), ``block`` with the format's own block (MX: 32,
  NVFP4: 16), or ``token`` (dynamic activations: one scale per slice along the last axis); written
  ``group(128)`` / ``block(32)`` in a recipe;
- ``levels``: ``uniform``, ``pow2``, ``nf4`` (4 bits) or ``kmeans`` (``int`` only);
- ``clip``: ``none`` or ``mse`` (a per-row / per-group search of the clipping ratio; ``clip_grid``
  ratios down to ``clip_min``, ``None``: the quantizer's own default);
- ``scale_dtype``: ``fp32`` / ``fp16`` / ``bf16`` (scales rounded to that type), ``e8m0`` (MX),
  ``fp8-e4m3`` (NVFP4 block scales, under an fp32 tensor scale);
- ``observer``: how a static range is found (an ``nnsqueeze.registry.OBSERVERS`` name); ``None`` for
  weights (their own values) and dynamic activations;
- ``dynamic``: ranges computed at run time from each tensor (dynamic activations).

Invalid combinations raise a ``ValueError`` naming the field and the fix (pydantic wraps it in a
``ValidationError``; :meth:`QuantArgs.parse` turns that into a :class:`~nnsqueeze.errors.RecipeError`).
Each older scheme type converts with ``.args()`` (:mod:`nnsqueeze.quant.scheme`,
:mod:`nnsqueeze.quant.act_scheme`, the step configs) or :meth:`QuantArgs.from_grid`
(:class:`nnsqueeze.ops.rtn.QuantGrid`: ops imports nothing of nnsqueeze); docs/formats.md lists them. ::

    >>> from nnsqueeze.quant.args import QuantArgs
    >>> QuantArgs(format="fp8-e4m3").describe(), QuantArgs(format="mxfp4").granularity_text
    ('fp8-e4m3 channel', 'block(32)')
    >>> a = QuantArgs(bits=4, granularity="group(128)"); (a.granularity, a.group_size, a.describe())
    ('group', 128, 'int4 group(128) sym')
    >>> QuantArgs.parse({"format": "fp8-e4m3", "granularity": "group(32)"}, "quantize.weights")
    Traceback (most recent call last):
    ...
    nnsqueeze.errors.RecipeError: quantize.weights: fp8-e4m3 has no group or block size: use granularity
    tensor or channel (block scales are the mxfp8-e4m3 / mxfp8-e5m2 formats)
      fix: see docs/formats.md for the fields and the combinations each format takes
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import RecipeError
from ..ops.quant import NF4_LEVELS, code_range, pow2_levels


@dataclass(frozen=True)
class FormatInfo:
    """What a format fixes: its kind, element bits (None: chosen), block length, allowed scale types."""

    kind: Literal["int", "float", "block", "half"]
    bits: int | None
    block: int | None
    scale_dtypes: tuple[str, ...]
    element: str | None = None  # the nnsqueeze.ops.fp8 element format name


_FP = ("fp32", "fp16", "bf16")
FORMATS: dict[str, FormatInfo] = {
    "int": FormatInfo("int", None, None, _FP),
    "fp8-e4m3": FormatInfo("float", 8, None, _FP, "fp8-e4m3"),
    "fp8-e5m2": FormatInfo("float", 8, None, _FP, "fp8-e5m2"),
    "mxfp8-e4m3": FormatInfo("block", 8, 32, ("e8m0",), "fp8-e4m3"),
    "mxfp8-e5m2": FormatInfo("block", 8, 32, ("e8m0",), "fp8-e5m2"),
    "mxfp6-e3m2": FormatInfo("block", 6, 32, ("e8m0",), "fp6-e3m2"),
    "mxfp6-e2m3": FormatInfo("block", 6, 32, ("e8m0",), "fp6-e2m3"),
    "mxfp4": FormatInfo("block", 4, 32, ("e8m0",), "fp4-e2m1"),
    "nvfp4": FormatInfo("block", 4, 16, ("fp8-e4m3",), "fp4-e2m1"),
    "fp16": FormatInfo("half", 16, None, ()),
    "bf16": FormatInfo("half", 16, None, ()),
}
INT_BITS = (2, 3, 4, 5, 6, 7, 8, 16)
# Level tables (``levels`` other than uniform): how many entries a ``bits``-bit table holds, and its
# starting values in [-1, 1] (None: learned from the weights, k-means). A new level kind is one
# entry in each, and the name in ``QuantArgs.levels``.
LEVEL_COUNT = {"pow2": lambda bits: (1 << bits) - 1, "nf4": lambda bits: 16, "kmeans": lambda bits: 1 << bits}
LEVEL_INIT = {"pow2": pow2_levels, "nf4": lambda bits: torch.tensor(NF4_LEVELS),
              "kmeans": lambda bits: torch.linspace(-1, 1, 1 << bits)}
LEARNED_LEVELS = ("kmeans",)
GRANULARITIES = ("tensor", "channel", "group", "block", "token")
_SIZED = re.compile(r"(group|block)\((\d+)\)")
# the spellings of the older scheme types
_OLD_GRANULARITY = {"per-tensor": "tensor", "per-channel": "channel", "per-group": "group", "per-token": "token"}


class QuantArgs(BaseModel):
    """How one tensor is quantized (module docstring). Frozen: usable as a dict key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["int", "fp8-e4m3", "fp8-e5m2", "mxfp8-e4m3", "mxfp8-e5m2", "mxfp6-e3m2", "mxfp6-e2m3",
                    "mxfp4", "nvfp4", "fp16", "bf16"] = "int"
    bits: int | None = Field(None, description="int: 2..8 or 16 (default 8); other formats: their width")
    symmetric: bool = True
    full_range: bool = Field(False, description="int symmetric: absmax / (2**(b-1) - 0.5), code -2**(b-1) used")
    granularity: str = Field("", description="tensor | channel | group(n) | block(n); default: channel for "
                             "int and fp8, the format's block for MX/NVFP4, tensor for fp16/bf16")
    group_size: int | None = Field(None, ge=1, description="inputs per scale (group/block granularity)")
    levels: Literal["uniform", "pow2", "nf4", "kmeans"] = "uniform"
    clip: Literal["none", "mse"] = "none"
    clip_grid: int | None = Field(None, ge=2, description="mse clip: ratios tried (None: the quantizer's default)")
    clip_min: float | None = Field(None, gt=0, lt=1, description="mse clip: smallest ratio of the range tried")
    scale_dtype: str | None = Field(None, description="fp32 | fp16 | bf16 | e8m0 (MX) | fp8-e4m3 (NVFP4); "
                                    "default: the format's first")
    observer: str | None = Field(None, description="static range observer (OBSERVERS name); None: weights, "
                                 "dynamic tensors")
    dynamic: bool = False

    @field_validator("granularity", mode="before")
    @classmethod
    def _old_spelling(cls, v: Any) -> Any:
        return _OLD_GRANULARITY.get(v, v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check(self) -> "QuantArgs":
        info = FORMATS[self.format]
        fmt, put = self.format, lambda k, v: object.__setattr__(self, k, v)  # frozen: fill defaults once
        gran = self.granularity or {"int": "channel", "float": "channel", "block": "block", "half": "tensor"}[info.kind]
        m = _SIZED.fullmatch(gran)
        if m:
            size = int(m.group(2))
            if self.group_size is not None and self.group_size != size:
                raise ValueError(f"granularity {gran} and group_size {self.group_size} disagree; give one")
            gran, _ = m.group(1), put("group_size", size)
        if gran not in GRANULARITIES:
            raise ValueError(f"granularity must be tensor, channel, group(n) or block(n) (or token: dynamic "
                             f"activations), got {gran!r}")
        put("granularity", gran)
        if info.kind == "int":
            bits = 8 if self.bits is None else self.bits
            if isinstance(bits, bool) or bits not in INT_BITS:
                raise ValueError(f"int bits must be 2..8 or 16, got {bits!r}")
            put("bits", bits)
            if gran == "block":
                raise ValueError("block granularity is for the MX/NVFP4 formats; int groups are group(n)")
        else:
            if self.bits is not None and self.bits != info.bits:
                raise ValueError(f"{fmt} is {info.bits}-bit; leave bits out (or give {info.bits})")
            put("bits", info.bits)
            if not self.symmetric:
                raise ValueError(f"{fmt} is a sign-magnitude float format: symmetric only (no zero point)")
            if self.nonuniform:
                raise ValueError(f"levels {self.levels} applies to the int format only; {fmt} has its own values")
            if self.clip != "none":
                raise ValueError(f"clip: {self.clip} applies to the int format only")
        if gran == "token" and (not self.dynamic or info.kind not in ("int", "float")):
            raise ValueError("granularity token (one scale per row of the input, taken at run time) is for "
                             "dynamic int / fp8 activations: set dynamic: true, or use granularity tensor")
        if info.kind == "float" and gran not in ("tensor", "channel", "token"):
            raise ValueError(f"{fmt} has no group or block size: use granularity tensor or channel "
                             "(block scales are the mxfp8-e4m3 / mxfp8-e5m2 formats)")
        if info.kind == "half" and gran != "tensor":
            raise ValueError(f"{fmt} is a cast without scales: granularity tensor only")
        if info.kind == "block":
            if gran != "block" or self.group_size not in (None, info.block):
                raise ValueError(f"{fmt} is block({info.block}) by its spec: leave granularity out or give "
                                 f"block({info.block})")
            put("group_size", info.block)
        if gran == "group" and self.group_size is None:
            raise ValueError("granularity group needs a size: write group(n), e.g. group(128)")
        if gran in ("tensor", "channel") and self.group_size is not None:
            raise ValueError(f"group_size is for group(n) granularity, not {gran}")
        if self.levels == "nf4" and self.bits != 4:
            raise ValueError("levels nf4 is a 4-bit table: use bits 4")
        if self.nonuniform and self.clip != "none":
            raise ValueError("clip: mse applies to uniform levels only")
        if self.clip == "none" and (self.clip_grid is not None or self.clip_min is not None):
            raise ValueError("clip_grid / clip_min need clip: mse")
        if self.full_range and (fmt != "int" or not self.symmetric or self.levels != "uniform"):
            raise ValueError("full_range applies to the symmetric uniform int grid only")
        allowed = info.scale_dtypes
        if self.scale_dtype is not None and self.scale_dtype not in allowed:
            raise ValueError(f"scale_dtype {self.scale_dtype!r} does not fit {fmt}: "
                             f"{' | '.join(allowed) or 'none (leave it out)'}")
        scale = self.scale_dtype or (allowed[0] if allowed else None)
        put("scale_dtype", scale)
        if self.dynamic and self.observer is not None:
            raise ValueError("a dynamic tensor has no observer: its range is taken at run time")
        return self

    # -- reading ----------------------------------------------------------------------------
    @property
    def info(self) -> FormatInfo:
        return FORMATS[self.format]

    @property
    def is_float(self) -> bool:
        """A float element format (FP8, MX, NVFP4): ops.fp8 / ops.mx compute it."""
        return self.info.kind in ("float", "block")

    @property
    def granularity_text(self) -> str:
        return f"{self.granularity}({self.group_size})" if self.granularity in ("group", "block") else self.granularity

    # -- the integer grid (the fake-quant layers, records, exporters and plots read these) ------
    @property
    def nonuniform(self) -> bool:
        """Values from a level table (``pow2``, ``nf4``, ``kmeans``) times a row scale; the codes are
        unsigned table indices. False: a uniform integer grid (codes times scale, minus zero point)."""
        return self.levels != "uniform"

    @property
    def learned_levels(self) -> bool:
        """The level table is learned from the weights (k-means) rather than fixed."""
        return self.levels in LEARNED_LEVELS

    @property
    def level_count(self) -> int | None:
        """Entries of the level table (None: a uniform grid)."""
        return LEVEL_COUNT[self.levels](self.bits) if self.nonuniform else None

    def initial_levels(self) -> torch.Tensor | None:
        """The level table's starting values, sorted in [-1, 1] (float32); None for a uniform grid."""
        return LEVEL_INIT[self.levels](self.bits).to(torch.float32) if self.nonuniform else None

    @property
    def has_zero_point(self) -> bool:
        """An integer zero point per scale: uniform asymmetric grids."""
        return not self.nonuniform and not self.symmetric

    @property
    def signed_codes(self) -> bool:
        """Codes are signed integers (uniform symmetric); asymmetric codes and table indices are unsigned."""
        return self.symmetric and not self.nonuniform

    @property
    def qmin(self) -> int:
        """Lowest stored code: ``-2**(bits-1)`` (signed), 0 (unsigned, table indices)."""
        return 0 if self.nonuniform else code_range(self.bits, self.symmetric)[0]

    @property
    def qmax(self) -> int:
        """Highest stored code: ``2**(bits-1) - 1`` (signed), ``2**bits - 1`` (unsigned), the last table index."""
        return self.level_count - 1 if self.nonuniform else code_range(self.bits, self.symmetric)[1]

    @property
    def int8_kernels(self) -> bool:
        """ONNX Runtime can run an int weight of these args as int8 codes (QLinearConv/QGemm):
        uniform, symmetric, one scale per channel or tensor."""
        return (self.format == "int" and not self.nonuniform and self.symmetric
                and self.granularity in ("channel", "tensor"))

    @property
    def grid_text(self) -> str:
        """``sym`` / ``asym`` for a uniform grid, else the level kind (``nf4``, ``pow2``, ``kmeans``)."""
        return self.levels if self.nonuniform else ("sym" if self.symmetric else "asym")

    def describe(self) -> str:
        """Short text for reports, e.g. ``int8 channel sym``, ``fp8-e4m3 tensor``, ``mxfp4 block(32)``."""
        if self.format != "int":
            return f"{self.format} {self.granularity_text}" + (" dynamic" if self.dynamic else "")
        kind = self.grid_text
        extra = (" full-range" if self.full_range else "") + (" mse-clip" if self.clip == "mse" else "") + (
            f" {self.scale_dtype}-scales"
                                                             if self.scale_dtype != "fp32" else "")
        return f"int{self.bits} {self.granularity_text} {kind}{extra}" + (" dynamic" if self.dynamic else "")

    def to_dict(self) -> dict[str, Any]:
        """The full form (every default filled in) for records: :meth:`from_dict` gives it back."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantArgs":
        return cls.model_validate(d)

    @classmethod
    def parse(cls, value: "QuantArgs | dict[str, Any] | str", where: str) -> "QuantArgs":
        """``value`` (a QuantArgs, its dict, or a format name) as QuantArgs; a RecipeError at ``where``
        if it is not valid."""
        if isinstance(value, QuantArgs):
            return value
        if isinstance(value, str):
            value = {"format": value}
        try:
            return cls.model_validate(value)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err.get("loc", ()))
            raise RecipeError(f"{where}{'.' + loc if loc else ''}", err["msg"].removeprefix("Value error, "),
                              fix="see docs/formats.md for the fields and the combinations each format takes"
                              ) from None

    # -- conversions ------------------------------------------------------------------------
    @classmethod
    def from_grid(cls, grid: Any) -> "QuantArgs":
        """From a :class:`nnsqueeze.ops.rtn.QuantGrid` (its storage layout, ``unsigned`` and
        ``empty_scale``, is not part of the scheme)."""
        clip = grid.clip_grid > 1
        return cls(bits=grid.bits, symmetric=grid.symmetric, scale_dtype=grid.scale_dtype,
                   granularity=f"group({grid.group_size})" if grid.group_size else "channel",
                   clip="mse" if clip else "none", clip_grid=grid.clip_grid if clip else None,
                   clip_min=grid.clip_min if clip else None, full_range=getattr(grid, "full_range", False))


# ONNX DynamicQuantizeLinear's activations: uint8 per tensor, range taken at run time
DYNAMIC_UINT8 = QuantArgs(symmetric=False, granularity="tensor", dynamic=True)


def weight_only_args(bits: int, group_size: int | None, symmetric: bool, full_range: bool = False) -> QuantArgs:
    """Args of a weight-only layer in its own terms (``group_size`` None or <= 0: one group per row)."""
    gran = f"group({group_size})" if group_size is not None and group_size > 0 else "channel"
    return QuantArgs(bits=bits, symmetric=symmetric, granularity=gran, full_range=full_range)
