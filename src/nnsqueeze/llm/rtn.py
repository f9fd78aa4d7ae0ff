"""Group-wise round-to-nearest (RTN) weight quantization: the baseline every LLM algorithm beats.

Pure tensor math, no module walking. A Linear weight ``W`` is ``(out, in)``; its columns are cut
into contiguous groups of ``group_size`` input channels (the last group may be shorter: odd shapes
are fine) and every (row, group) gets its own scale / zero point, computed by
:func:`nnsqueeze.ops.quant.qparams` and applied with :func:`nnsqueeze.ops.quant.fake_quantize`, so
the grid and the rounding (half to even, fp32 division) are exactly ONNX Runtime's:

- ``symmetric=True``: signed codes ``[-2**(b-1), 2**(b-1)-1]``, zero point 0;
- ``symmetric=False``: unsigned codes ``[0, 2**b - 1]``, integer zero point, range widened to 0.

``group_size=None`` (or -1) means one group per row (per-channel). ``scale_dtype`` (``"fp16"``,
``"bf16"``; default ``"fp32"``) makes every scale a value of that type (rounded *up*, so the range
still fits and nothing extra is clipped) and chooses the codes against it: a file format that
stores fp16 scales (GPTQ, GGUF) then holds the model exactly. The scales stay float32 tensors.

MSE clipping (``clip_grid`` > 1): per (row, group), the range ``[lo, hi]`` is shrunk to
``[r lo, r hi]`` for ``clip_grid`` ratios ``r`` evenly spaced from 1 down to ``clip_min``, and the
ratio whose quantized group has the smallest squared error (weighted per column by ``importance``,
e.g. GPTQ's Hessian diagonal) wins; ratio 1 (no clipping) is on the grid and wins ties, so the
error never grows. Clipping a few outliers buys a finer step for all the other weights::

    >>> import torch
    >>> from nnsqueeze.llm.rtn import rtn_quantize
    >>> w = torch.randn(5, 11)
    >>> r = rtn_quantize(w, bits=4, group_size=4, symmetric=False)
    >>> r.weight.shape, r.scale.shape, r.zero_point.shape      # 11 columns -> 3 groups (4, 4, 3)
    (torch.Size([5, 11]), torch.Size([5, 3]), torch.Size([5, 3]))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.quant import fake_quantize, qparams, qrange

Tensor = torch.Tensor

SCALE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def storable_scale(scale: Tensor, scale_dtype: str = "fp32") -> Tensor:
    """``scale`` (float32, > 0) as the nearest value of ``scale_dtype`` that is >= it, in float32.

    Rounding up keeps ``absmax / scale`` inside the code range. A scale above the type's largest
    finite value (fp16: 65504) raises ValueError: no scale of that type covers the range.
    """
    dt = SCALE_DTYPES[scale_dtype]
    if dt == torch.float32:
        return scale
    r = scale.to(dt)
    below = r.to(torch.float32) < scale
    r = torch.where(below, torch.nextafter(r, torch.full_like(r, float("inf"))), r)
    # an underflow to 0 would divide by zero: take the smallest positive value of the type
    r = torch.where(r == 0, torch.full_like(r, torch.finfo(dt).smallest_normal), r)
    if not torch.isfinite(r).all():
        raise ValueError(f"a weight scale exceeds the {scale_dtype} range ({torch.finfo(dt).max}); "
                         "use scale_dtype fp32 or bf16")
    return r.to(torch.float32)


@dataclass
class QuantGrid:
    """A weight quantization scheme: ``bits`` in 2..8, ``group_size`` input channels (None: per row)."""

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = True
    scale_dtype: str = "fp32"
    clip_grid: int = 1          # ratios searched per group (1: no clipping)
    clip_min: float = 0.5       # smallest ratio of the range tried

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
        return qrange(self.bits, signed=self.symmetric)

    def groups(self, columns: int) -> list[tuple[int, int]]:
        """``[(start, stop), ...]`` column ranges of the groups of a row of ``columns`` values."""
        g = self.group_size or columns
        return [(s, min(s + g, columns)) for s in range(0, columns, g)]

    @property
    def clip_ratios(self) -> list[float]:
        """The clip ratios searched, from 1.0 (no clipping) down to ``clip_min``."""
        n = self.clip_grid
        return [1.0] if n == 1 else [1.0 - (1.0 - self.clip_min) * i / (n - 1) for i in range(n)]

    def params(self, w: Tensor, importance: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Per-row scale / zero point, shape ``(rows,)``, for ``w`` (rows, cols): covering all columns,
        or, with ``clip_grid`` > 1, the MSE-best clipped range (``importance`` (cols,): column weights)."""
        lo, hi = w.amin(dim=1), w.amax(dim=1)
        scale, zp = self._params_at(lo, hi)
        if self.clip_grid == 1:
            return scale, zp
        wt = (torch.ones(w.shape[1], dtype=torch.float64, device=w.device) if importance is None
              else importance.to(w.device, torch.float64))
        best = self._error(w, scale, zp, wt)
        for r in self.clip_ratios[1:]:
            s, z = self._params_at(lo * r, hi * r)
            e = self._error(w, s, z, wt)
            better = e < best  # strict: on ties the larger ratio (less clipping) stays
            scale, zp, best = torch.where(better, s, scale), torch.where(better, z, zp), torch.where(better, e, best)
        return scale, zp

    def _error(self, w: Tensor, scale: Tensor, zp: Tensor, wt: Tensor) -> Tensor:
        """Per-row ``sum_j wt_j (w - Q(w))_j^2`` (float64)."""
        d = w.double() - self.fake(w.float(), scale, zp).double()
        return (d * d * wt.unsqueeze(0)).sum(1)

    def _params_at(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """Scale / zero point covering ``[lo, hi]`` per row, the scale a value of ``scale_dtype``."""
        scale, zp = qparams(lo, hi, bits=self.bits, symmetric=self.symmetric)
        if self.scale_dtype == "fp32":
            return scale, zp
        scale = storable_scale(scale, self.scale_dtype)
        if not self.symmetric:  # the zero point is the code of real 0 under the stored scale
            qmin, qmax = self.qmin_qmax
            zp = torch.clamp(torch.round(qmin - torch.clamp(lo.float(), max=0.0) / scale), qmin, qmax).to(torch.int32)
        return scale, zp

    def fake(self, w: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
        """Quantize-dequantize ``w`` (rows, cols) with per-row ``scale``/``zero_point`` (rows,), float32."""
        qmin, qmax = self.qmin_qmax
        return fake_quantize(w, scale, zero_point, qmin, qmax, axis=0)


@dataclass
class QuantResult:
    weight: Tensor       # (out, in) fake-quantized weight, float32 values on the grid
    scale: Tensor        # (out, n_groups) float32
    zero_point: Tensor   # (out, n_groups) int32


def rtn_quantize(w: Tensor, bits: int = 4, group_size: int | None = 128, symmetric: bool = True,
                 scale_dtype: str = "fp32", clip_grid: int = 1, clip_min: float = 0.5) -> QuantResult:
    """Round-to-nearest quantization of ``w`` (out, in), group-wise along the input dimension
    (``clip_grid`` > 1: MSE-searched clipping per group, see the module docstring)."""
    if w.dim() != 2:
        raise ValueError(f"rtn_quantize expects a 2-d (out, in) weight, got shape {tuple(w.shape)}")
    grid = QuantGrid(bits, group_size, symmetric, scale_dtype, clip_grid, clip_min)
    w32 = w.detach().to(torch.float32)
    out = torch.empty_like(w32)
    scales, zps = [], []
    for a, b in grid.groups(w32.shape[1]):
        s, z = grid.params(w32[:, a:b])
        out[:, a:b] = grid.fake(w32[:, a:b], s, z)
        scales.append(s)
        zps.append(z)
    return QuantResult(out, torch.stack(scales, 1), torch.stack(zps, 1))


def output_error(x: Tensor, w: Tensor, w_hat: Tensor) -> float:
    """Layer reconstruction error ``||X W^T - X W_hat^T||_F`` (float64); ``x`` is (tokens, in)."""
    x64 = x.reshape(-1, x.shape[-1]).double()
    return float(torch.linalg.matrix_norm(x64 @ (w.double() - w_hat.double()).T))
