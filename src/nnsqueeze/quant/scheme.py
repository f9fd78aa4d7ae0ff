"""Weight quantization schemes of the fake-quant layers: bits, symmetry, granularity, levels, clipping.

A :class:`WeightScheme` says how a layer's weight becomes codes. The weight is viewed as ROWS
``(R, L)``: per-channel ``R = C_out`` (one row per output channel), per-group ``R = C_out * G``
(each output channel's ``D = C_in/groups * k`` inputs cut into ``G = ceil(D / group_size)``
groups of ``group_size`` consecutive values; when ``group_size`` does not divide ``D`` the last
group of each channel is shorter, e.g. 128 + 128 + 44 for ``D = 300``, with its own scale and zero
point computed from its own values only), per-tensor one shared scale repeated on every row. Each
row has a scale (and a zero point when asymmetric).

- ``levels: uniform``: integer grid, ``bits`` 2..8, symmetric (signed codes, zero point 0) or
  asymmetric (unsigned codes, integer zero point);
- ``levels: pow2`` (power-of-two/logarithmic: 0, +-1, +-1/2, ... times the row's absmax), ``nf4``
  (the 16 NormalFloat-4 quantiles, bits must be 4) or ``kmeans`` (``2**bits`` levels learned by
  k-means on the layer's absmax-normalized weights): value = level * row absmax;
- ``clip: mse``: per-row clipping ratio searched to minimize the squared weight error (uniform only).

Uniform per-channel/per-tensor weights map to ONNX Runtime's int8 kernels (``int8_kernels``: the
symmetric ones, whose simulation also rounds the bias to int32; ORT fuses asymmetric uint8 codes too).
In the exported ONNX every scheme's weight is stored as codes of its width (int4/uint4 for 2..4
bits, int8/uint8 above; :mod:`nnsqueeze.export.lowbit`); per-group and non-uniform weights are
decoded in the graph and run in float kernels, computing exactly the simulated numbers. ::

    >>> from nnsqueeze.quant.scheme import WeightScheme
    >>> WeightScheme(bits=4, granularity="per-group", group_size=16).int8_kernels
    False
    >>> WeightScheme(bits=4).describe()
    'w4 per-channel sym'
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import ValidationError

from .args import QuantArgs

GRANULARITIES = ("per-channel", "per-tensor", "per-group")
LEVELS = ("uniform", "pow2", "nf4", "kmeans")
CLIPS = ("none", "mse")


@dataclass(frozen=True)
class WeightScheme:
    bits: int = 8
    symmetric: bool = True
    granularity: str = "per-channel"
    group_size: int | None = None
    levels: str = "uniform"
    clip: str = "none"

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be an int in 2..8, got {self.bits!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if (self.granularity == "per-group") != (self.group_size is not None):
            raise ValueError("group_size is required with (and only with) granularity per-group")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if self.levels not in LEVELS:
            raise ValueError(f"levels must be one of {LEVELS}, got {self.levels!r}")
        if self.clip not in CLIPS:
            raise ValueError(f"clip must be one of {CLIPS}, got {self.clip!r}")
        try:  # the combinations (nf4 is 4-bit, clip needs uniform levels) are QuantArgs' rules
            _args(self)
        except ValidationError as e:
            raise ValueError(e.errors()[0]["msg"].removeprefix("Value error, ")) from None

    @property
    def int8_kernels(self) -> bool:
        """True when ONNX Runtime can run the weight as int8 codes (QLinearConv/QGemm)."""
        return self.args().int8_kernels

    def describe(self) -> str:
        """The record / report spelling (``w4 per-channel sym``); :meth:`QuantArgs.describe` is the new one."""
        g = f"g{self.group_size}" if self.granularity == "per-group" else self.granularity
        clip = " mse-clip" if self.clip == "mse" else ""
        return f"w{self.bits} {g} {self.args().grid_text}{clip}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def args(self) -> QuantArgs:
        """This scheme as :class:`~nnsqueeze.quant.args.QuantArgs` (the one scheme type); one object
        per scheme (cached: the layers read it on every forward)."""
        return _args(self)

    def _to_args(self) -> QuantArgs:
        return QuantArgs(bits=self.bits, symmetric=self.symmetric, granularity=self.granularity,
                         group_size=self.group_size, levels=self.levels, clip=self.clip)

    @classmethod
    def from_args(cls, a: QuantArgs) -> "WeightScheme":
        """The scheme of int weight args (what the fake-quant layers take); ValueError for others."""
        if a.format != "int" or a.bits > 8 or a.dynamic or a.scale_dtype != "fp32" or a.clip_grid or a.clip_min:
            raise ValueError(f"{a.describe()} has no WeightScheme (int, 2..8 bits, static, fp32 scales, "
                             "the default clip search)")
        return cls(bits=a.bits, symmetric=a.symmetric, granularity=f"per-{a.granularity}",
                   group_size=a.group_size, levels=a.levels, clip=a.clip)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, bits: int = 8) -> "WeightScheme":
        return cls(**d) if d else cls(bits=bits)


@functools.lru_cache(maxsize=None)
def _args(scheme: WeightScheme) -> QuantArgs:
    return scheme._to_args()
