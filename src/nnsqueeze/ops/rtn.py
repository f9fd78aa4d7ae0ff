"""Round-to-nearest (RTN) quantization of weight rows: per-tensor, per-channel or group-wise.

The one implementation behind every uniform weight grid in nnsqueeze: the fake-quant layers
(:mod:`nnsqueeze.quant.modules`), the weight-only / packed layers (:mod:`nnsqueeze.quant.weight_only`,
:mod:`nnsqueeze.llm.packed`) and the LLM algorithms (``rtn``, :mod:`nnsqueeze.llm.gptq`,
:mod:`nnsqueeze.llm.awq`). Pure tensor math, no module walking.

Geometry. A weight ``w`` is viewed as ``(N, K)``: N output channels, K inputs per channel (a conv's
``C_in/groups * kh * kw`` flattened). ``group_size`` cuts each channel into ``G = ceil(K / L)``
groups of ``L = min(group_size, K)`` consecutive inputs; ``None`` (or <= 0) means one group per
channel (per-channel); per-tensor is one row holding everything. When L does not divide K the last
group is shorter (``pad = G * L - K``): :func:`to_rows` zero-pads it into an ``(N * G, L)`` view and
every statistic ignores the padding (:func:`per_group`).

Grid of a row (its range ``[lo, hi]`` widened to include 0, so 0 and padding stay exact):

- ``symmetric=True``: ``scale = max(-lo, hi) / (2**(b-1) - 1)``, signed codes
  ``[-2**(b-1), 2**(b-1) - 1]``, zero point 0 (the code ``-2**(b-1)`` is never used: ONNX Runtime's
  restricted grid); with ``full_range=True`` instead ``scale = max(-lo, hi) / (2**(b-1) - 0.5)``
  (the grid of llm-compressor / compressed-tensors): a step 7% finer at 4 bits, the ends of the range
  at ``+-(2**(b-1) - 0.5)`` steps, the positive end clamped to ``2**(b-1) - 1`` and the negative one
  rounding to ``-2**(b-1)`` or ``-2**(b-1) + 1`` (half to even, after the fp32 division);
- ``symmetric=False``: ``scale = (hi - lo) / (2**b - 1)``, unsigned codes ``[0, 2**b - 1]``,
  ``zero_point = clamp(round(-lo / scale))``;
- ``unsigned=True`` (the storage layout of ONNX Runtime's ``MatMulNBits`` and the artifacts):
  symmetric codes shifted by ``2**(b-1)`` into ``[0, 2**b - 1]`` with zero point ``2**(b-1)``; the
  dequantized values ``(q - zp) * scale`` are the same bits.

Codes are ``clamp(round(w / scale) + zp)`` with fp32 division and round half to even (ONNX Runtime's
QuantizeLinear); values ``(q - zp) * scale`` in fp32. A degenerate range (all zeros, or a scale
below float32 eps) gets ``scale = EPS`` (:mod:`nnsqueeze.ops.quant`); ``empty_scale=1.0`` instead
replaces only an exact zero scale by 1 (the weight-only layers' historical layout, kept so their
artifacts do not change).

``scale_dtype`` (``"fp16"``, ``"bf16"``; default ``"fp32"``) makes every scale a value of that type,
rounded *up* so the range still fits, and chooses the codes against it (GPTQ / GGUF files store fp16
scales exactly); ``"fp16-exact"`` also makes every dequantized weight an fp16 value
(:func:`storable_scale`), for loaders that dequantize in fp16. MSE clipping (``clip_grid`` > 1): per
row, the range is shrunk to ``[r lo, r hi]`` for ``clip_grid`` ratios ``r`` evenly spaced from 1 down
to ``clip_min``, and the ratio with the smallest squared error (float64, weighted per column by
``importance``, e.g. GPTQ's Hessian diagonal) wins; ratio 1 is tried first and wins ties, so clipping
never raises the error::

    >>> import torch
    >>> from nnsqueeze.ops.rtn import rtn_quantize
    >>> w = torch.tensor([[0.5, -1.0, 0.25, 2.0, 7.0]])
    >>> r = rtn_quantize(w, bits=4, group_size=2, symmetric=True)   # groups (2, 2, 1)
    >>> r.scale.shape, r.codes.tolist()
    (torch.Size([1, 3]), [[3, -7, 1, 7, 7]])
    >>> rtn_quantize(w, bits=4, group_size=2, symmetric=True, unsigned=True).codes.tolist()
    [[11, 1, 9, 15, 15]]
    >>> rtn_quantize(w, bits=4, group_size=2, symmetric=True, full_range=True).codes.tolist()
    [[4, -7, 1, 7, 7]]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .quant import code_range, qrange, range_qparams

Tensor = torch.Tensor

SCALE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
                "fp16-exact": torch.float16}   # stored as fp16; see storable_scale


# -- geometry ----------------------------------------------------------------------------------
def group_shape(columns: int, group_size: int | None) -> tuple[int, int, int]:
    """``(G, L, pad)`` of a row of ``columns`` values cut into groups of ``group_size`` (None or <= 0:
    one group, ``L = columns``); the last group holds ``L - pad`` real values."""
    if group_size is None or group_size <= 0:
        return 1, columns, 0
    length = min(group_size, columns)
    g = -(-columns // length)
    return g, length, g * length - columns


def smaller_group(columns: int, group_size: int) -> int | None:
    """The largest power of two >= 16 and <= ``group_size`` that divides ``columns`` (None if none does):
    the group a layer gets where ``group_size`` leaves a shorter last group and the storage format has
    none (``uneven_groups: smaller``). ``smaller_group(576, 128) == 64``; ``smaller_group(1536, 128) == 128``."""
    fits = [p for p in (1 << b for b in range(4, 31)) if p <= group_size and columns % p == 0]
    return max(fits) if fits else None


def to_rows(w: Tensor, group_size: int | None) -> Tensor:
    """``w`` (N, ...) as ``(N * G, L)`` rows, one per group; a short last group is zero-padded."""
    flat = w.reshape(w.shape[0], -1)                          # (N, K)
    _, length, pad = group_shape(flat.shape[1], group_size)
    if pad:
        flat = F.pad(flat, (0, pad))
    return flat.reshape(-1, length)


def from_rows(rows: Tensor, shape: tuple[int, ...] | torch.Size, group_size: int | None) -> Tensor:
    """Inverse of :func:`to_rows`: ``(N * G, L)`` rows back to ``shape``, padding dropped."""
    n = shape[0]
    k = rows.numel() // n if not shape[1:] else int(torch.Size(shape[1:]).numel())
    _, _, pad = group_shape(k, group_size)
    flat = rows.reshape(n, -1)
    if pad:
        flat = flat[:, :flat.shape[1] - pad]
    return flat.reshape(shape)


def rows_mask(n: int, columns: int, group_size: int | None, device=None) -> Tensor | None:
    """Bool ``(N * G, L)``: True on real values, False on padding; None when nothing is padded."""
    g, length, pad = group_shape(columns, group_size)
    if not pad:
        return None
    mask = torch.ones(n, g * length, dtype=torch.bool, device=device)
    mask[:, g * length - pad:] = False
    return mask.reshape(-1, length)


def per_group(fn: Callable[[Tensor], tuple[Tensor, ...]], rows: Tensor, columns: int,
              group_size: int | None) -> tuple[Tensor, ...]:
    """``fn`` maps rows (n, l) to per-row statistics ``(n,)``; applied to the ``(N * G, L)`` rows of
    :func:`to_rows` so that a short last group's statistics come from its own values only (full
    groups and last groups go through ``fn`` separately, never the padding)."""
    g, length, pad = group_shape(columns, group_size)
    if not pad:
        return tuple(fn(rows))
    c = rows.shape[0] // g
    grid = rows.reshape(c, g, length)                           # (N, G, L)
    tail = tuple(fn(grid[:, -1, :length - pad]))
    if g == 1:
        return tail
    full = tuple(fn(grid[:, :-1].reshape(-1, length)))
    return tuple(torch.cat([a.reshape(c, g - 1), b.reshape(c, 1)], 1).reshape(-1) for a, b in zip(full, tail))


# -- one row's grid ----------------------------------------------------------------------------
def storable_scale(scale: Tensor, scale_dtype: str = "fp32", code_bits: int = 4) -> Tensor:
    """``scale`` (float32, > 0) as the nearest value of ``scale_dtype`` that is >= it, in float32.

    Rounding up keeps ``absmax / scale`` inside the code range. A scale above the type's largest
    finite value (fp16: 65504) raises ValueError: no scale of that type covers the range.

    ``"fp16-exact"``: an fp16 scale with at most ``11 - code_bits`` significant bits and at least
    2**-14, so that every dequantized weight ``(q - z) * s`` with ``|q - z| < 2**code_bits`` is
    itself a normal fp16 value. Loaders that dequantize in fp16 (gptqmodel's CPU kernels, exllama)
    then compute exactly nnsqueeze's float32 weights; plain fp16 scales leave them up to 2**-11
    relative apart (on SmolLM2's logits: 0.04). The scale grows by under ``2**(code_bits - 10)``
    relative (4-bit symmetric, 3 code bits: 0.8%)::

        >>> s = storable_scale(torch.tensor([0.0123456]), "fp16-exact", code_bits=3)
        >>> k = torch.arange(-8, 8, dtype=torch.float32)
        >>> bool(((k * s).half().float() == k * s).all()), float(s) >= 0.0123456
        (True, True)
    """
    dt = SCALE_DTYPES[scale_dtype]
    if dt == torch.float32:
        return scale
    if scale_dtype == "fp16-exact":
        keep = max(1, 11 - code_bits)  # significant bits: fp16 has 11, the code difference takes code_bits
        _, exp = torch.frexp(scale.float())                     # scale = m * 2**exp, m in [0.5, 1)
        quantum = torch.ldexp(torch.ones_like(scale, dtype=torch.float32), exp - keep)
        scale = torch.clamp(torch.ceil(scale.float() / quantum) * quantum, min=2.0 ** -14)  # exact in float32
    r = scale.to(dt)
    below = r.to(torch.float32) < scale
    r = torch.where(below, torch.nextafter(r, torch.full_like(r, float("inf"))), r)
    # an underflow to 0 would divide by zero: take the smallest positive value of the type
    r = torch.where(r == 0, torch.full_like(r, torch.finfo(dt).smallest_normal), r)
    if not torch.isfinite(r).all():
        raise ValueError(f"a weight scale exceeds the {scale_dtype} range ({torch.finfo(dt).max}); "
                         "use scale_dtype fp32 or bf16")
    return r.to(torch.float32)


def clip_ratios(grid: int, min_ratio: float) -> list[float]:
    """The ``grid`` clip ratios searched, from 1.0 (no clipping) down to ``min_ratio``."""
    return [1.0] if grid == 1 else [1.0 - (1.0 - min_ratio) * i / (grid - 1) for i in range(grid)]


def code_bounds(bits: int, symmetric: bool, unsigned: bool = False) -> tuple[int, int]:
    """``(qmin, qmax)`` of the codes (see the module docstring; ``unsigned``: the storage layout)."""
    return qrange(bits, signed=symmetric and not unsigned)


def sym_divisor(bits: int, full_range: bool = False) -> float:
    """What a symmetric row's ``absmax`` is divided by to give its scale: ``2**(b-1) - 1``, or
    ``2**(b-1) - 0.5`` on the full signed range (module docstring)."""
    top = (1 << (bits - 1)) - 1
    return top + 0.5 if full_range else float(top)


def _range_grid(lo: Tensor, hi: Tensor, bits: int, symmetric: bool, unsigned: bool, scale_dtype: str,
                empty_scale: float | None, full_range: bool = False) -> tuple[Tensor, Tensor]:
    """Scale (float32) / zero point (int32) per row covering ``[lo, hi]`` (rows,)."""
    qmin, qmax = code_range(bits, signed=symmetric)
    div = sym_divisor(bits, full_range) if symmetric else qmax
    if empty_scale is None:
        scale, zp = range_qparams(lo, hi, qmin, div, symmetric=symmetric)
    else:  # no EPS floor: only an exact zero scale (all-zero row) is replaced
        lo0, hi0 = torch.clamp(lo.float(), max=0.0), torch.clamp(hi.float(), min=0.0)
        raw = torch.maximum(-lo0, hi0) / div if symmetric else (hi0 - lo0) / (qmax - qmin)
        scale = torch.where(raw == 0, torch.full_like(raw, empty_scale), raw)
        zp = (torch.zeros_like(scale, dtype=torch.int32) if symmetric
              else torch.clamp(torch.round(qmin - lo0 / scale), qmin, qmax).to(torch.int32))
    if scale_dtype != "fp32":
        # |q - z| < 2**code_bits: symmetric codes reach 2**(b-1) only as a power of two (exact anyway)
        scale = storable_scale(scale, scale_dtype, code_bits=bits - 1 if symmetric else bits)
        if not symmetric:  # the zero point is the code of real 0 under the stored scale
            zp = torch.clamp(torch.round(qmin - torch.clamp(lo.float(), max=0.0) / scale), qmin, qmax).to(torch.int32)
    if symmetric and unsigned:
        zp = zp + (1 << (bits - 1))
    return scale, zp


def fake_values(x: Tensor, s: Tensor, z: Tensor, qmin: int, qmax: int) -> Tensor:
    """``(clamp(round(x / s) + z, qmin, qmax) - z) * s`` on float32 tensors that broadcast (no
    conversions: GPTQ's column loop calls it with its group's parameters converted once)."""
    return (torch.clamp(torch.round(x / s) + z, qmin, qmax) - z) * s


def fake_rows(rows: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """Quantize-dequantize ``rows`` (R, L) with per-row ``scale`` / ``zero_point`` (R,), float32."""
    return fake_values(rows.to(torch.float32), scale.to(torch.float32).unsqueeze(1),
                       zero_point.to(torch.float32).unsqueeze(1), qmin, qmax)


def row_qparams(rows: Tensor, bits: int, symmetric: bool, *, scale_dtype: str = "fp32", clip_grid: int = 1,
                clip_min: float = 0.5, importance: Tensor | None = None, unsigned: bool = False,
                empty_scale: float | None = None, full_range: bool = False) -> tuple[Tensor, Tensor]:
    """Per-row scale (float32) / zero point (int32), shape ``(R,)``, for ``rows`` (R, L): covering the
    row's min/max, or with ``clip_grid`` > 1 the MSE-best clipped range (``importance`` (L,): column
    weights of the squared error). Options: see the module docstring."""
    lo, hi = rows.amin(dim=1), rows.amax(dim=1)
    grid = (bits, symmetric, unsigned, scale_dtype, empty_scale, full_range)
    scale, zp = _range_grid(lo, hi, *grid)
    if clip_grid == 1:
        return scale, zp
    qmin, qmax = code_bounds(bits, symmetric, unsigned)
    wt = (torch.ones(rows.shape[1], dtype=torch.float64, device=rows.device) if importance is None
          else importance.to(rows.device, torch.float64))

    def error(s: Tensor, z: Tensor) -> Tensor:  # per-row sum_j wt_j (w - Q(w))_j^2, float64
        d = rows.double() - fake_rows(rows.float(), s, z, qmin, qmax).double()
        return (d * d * wt.unsqueeze(0)).sum(1)

    best = error(scale, zp)
    for r in clip_ratios(clip_grid, clip_min)[1:]:
        s, z = _range_grid(lo * r, hi * r, *grid)
        e = error(s, z)
        better = e < best  # strict: on ties the larger ratio (less clipping) stays
        scale, zp, best = torch.where(better, s, scale), torch.where(better, z, zp), torch.where(better, e, best)
    return scale, zp


# -- a whole weight ----------------------------------------------------------------------------
@dataclass
class QuantGrid:
    """A weight grid: ``bits`` in 2..8, ``group_size`` inputs per scale (None or -1: per row), the
    clip search and the code layout (module docstring). Validates on construction (ValueError)."""

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = True
    scale_dtype: str = "fp32"
    clip_grid: int = 1          # ratios searched per group (1: no clipping)
    clip_min: float = 0.5       # smallest ratio of the range tried
    unsigned: bool = False      # storage layout: symmetric codes shifted into [0, 2**bits - 1]
    empty_scale: float | None = None  # None: scales floored at EPS; a value: replaces a zero scale
    full_range: bool = False    # symmetric: absmax / (2**(b-1) - 0.5), code -2**(b-1) used too

    def __post_init__(self) -> None:
        qrange(self.bits, self.symmetric)  # validates bits
        if self.clip_grid < 1 or not 0.0 < self.clip_min <= 1.0:
            raise ValueError(f"clip_grid must be >= 1 and clip_min in (0, 1], got {self.clip_grid}, {self.clip_min}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {sorted(SCALE_DTYPES)}, got {self.scale_dtype!r}")
        if self.group_size is not None and self.group_size == -1:
            self.group_size = None
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, -1 or None, got {self.group_size}")

    @property
    def qmin_qmax(self) -> tuple[int, int]:
        return code_bounds(self.bits, self.symmetric, self.unsigned)

    def groups(self, columns: int) -> list[tuple[int, int]]:
        """``[(start, stop), ...]`` column ranges of the groups of a row of ``columns`` values."""
        g = self.group_size or columns
        return [(s, min(s + g, columns)) for s in range(0, columns, g)]

    @property
    def clip_ratios(self) -> list[float]:
        return clip_ratios(self.clip_grid, self.clip_min)

    def params(self, w: Tensor, importance: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Per-row scale / zero point ``(rows,)`` of ``w`` (rows, cols): :func:`row_qparams`."""
        return row_qparams(w, self.bits, self.symmetric, scale_dtype=self.scale_dtype, clip_grid=self.clip_grid,
                           clip_min=self.clip_min, importance=importance, unsigned=self.unsigned,
                           empty_scale=self.empty_scale, full_range=self.full_range)

    def fake(self, w: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
        """Quantize-dequantize ``w`` (rows, cols) with per-row ``scale``/``zero_point`` (rows,), float32."""
        return fake_rows(w, scale, zero_point, *self.qmin_qmax)

    def qparams(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """Scales (float32) and zero points (int32), both ``(N, G)``, of ``w`` (N, K), every group
        (a short last one included) from its own values."""
        rows = to_rows(w.detach().to(torch.float32), self.group_size)
        scale, zp = per_group(self.params, rows, w[0].numel(), self.group_size)
        return scale.reshape(w.shape[0], -1), zp.reshape(w.shape[0], -1)


def _expand(p: Tensor, columns: int, group_size: int | None) -> Tensor:
    """Group parameters (N, G) repeated over their columns: (N, K) float32."""
    _, length, _ = group_shape(columns, group_size)
    return p.to(torch.float32).repeat_interleave(length, dim=1)[:, :columns]


def _grouped(t: Tensor, p: Tensor, group_size: int | None) -> tuple[Tensor, Tensor] | None:
    """``t`` (N, K) as (N, G, length) and ``p`` (N, G) as (N, G, 1) float32 when the groups tile K
    exactly (views, no copy of the parameters per column); None for a short last group."""
    n, k = t.shape
    groups, length, pad = group_shape(k, group_size)
    if pad or p.shape != (n, groups):
        return None
    return t.reshape(n, groups, length), p.to(torch.float32).unsqueeze(-1)


def quantize_groups(w: Tensor, scale: Tensor, zero_point: Tensor, group_size: int | None,
                    qmin: int, qmax: int) -> Tensor:
    """Codes (int32, (N, K)) ``clamp(round(w / scale) + zp, qmin, qmax)`` of ``w`` (N, K), group
    parameters (N, G)."""
    w32 = w.detach().to(torch.float32)
    g = _grouped(w32, scale, group_size)
    if g is not None:  # the same float32 operations, broadcast over each group
        q = torch.round(g[0] / g[1]) + zero_point.to(torch.float32).unsqueeze(-1)
        return torch.clamp(q, qmin, qmax).to(torch.int32).reshape(w.shape)
    k = w.shape[1]
    q = torch.round(w32 / _expand(scale, k, group_size)) + _expand(zero_point, k, group_size)
    return torch.clamp(q, qmin, qmax).to(torch.int32)


def dequantize_groups(q: Tensor, scale: Tensor, zero_point: Tensor, group_size: int | None) -> Tensor:
    """float32 ``(q - zp) * scale`` of codes ``q`` (N, K), group parameters (N, G)."""
    q32 = q.to(torch.float32)
    g = _grouped(q32, scale, group_size)
    if g is not None:
        return ((g[0] - zero_point.to(torch.float32).unsqueeze(-1)) * g[1]).reshape(q.shape)
    k = q.shape[1]
    return (q32 - _expand(zero_point, k, group_size)) * _expand(scale, k, group_size)


@dataclass
class QuantResult:
    weight: Tensor       # (N, K) fake-quantized weight, float32 values on the grid
    scale: Tensor        # (N, G) float32
    zero_point: Tensor   # (N, G) int32
    codes: Tensor        # (N, K) int32


def rtn_quantize(w: Tensor, bits: int = 4, group_size: int | None = 128, symmetric: bool = True,
                 scale_dtype: str = "fp32", clip_grid: int = 1, clip_min: float = 0.5, *,
                 unsigned: bool = False, empty_scale: float | None = None, full_range: bool = False) -> QuantResult:
    """Round-to-nearest quantization of ``w`` (N, K), group-wise along K (module docstring)."""
    if w.dim() != 2:
        raise ValueError(f"rtn_quantize expects a 2-d (out, in) weight, got shape {tuple(w.shape)}")
    grid = QuantGrid(bits, group_size, symmetric, scale_dtype, clip_grid, clip_min, unsigned, empty_scale, full_range)
    w32 = w.detach().to(torch.float32)
    scale, zp = grid.qparams(w32)
    codes = quantize_groups(w32, scale, zp, grid.group_size, *grid.qmin_qmax)
    return QuantResult(dequantize_groups(codes, scale, zp, grid.group_size), scale, zp, codes)
