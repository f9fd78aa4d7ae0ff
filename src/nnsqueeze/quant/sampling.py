"""Base for range-search observers: exact running min/max plus a uniform random sample of values.

Percentile, MSE and KL calibration (:mod:`.percentile`, :mod:`.mse`, :mod:`.kl`) need the value
distribution, not just its extremes. :class:`SampleObserver` keeps the ``capacity`` values with the
smallest random keys among everything observed, which is a uniform sample without replacement of
the whole stream (seeded, so calibration is reproducible); below ``capacity`` values it holds all
of them and the statistics are exact. Per-tensor only (``axis=None``): activations are per-tensor.

Subclasses implement ``_range(bits, symmetric) -> (lo, hi)``; :meth:`qparams` turns it into a
scale and zero point exactly like the minmax observer does.
"""

from __future__ import annotations

import torch

from ..errors import DataError
from .act_scheme import act_qparams as _qparams

Tensor = torch.Tensor


def check_finite(x: Tensor, layer: str) -> None:
    """Raise a :class:`DataError` naming ``layer`` when calibration values hold NaN or inf."""
    if not torch.isfinite(x).all():
        bad = "NaN" if torch.isnan(x).any() else "inf"
        raise DataError(f"calibration at layer {layer}" if layer else "calibration",
                        f"calibration produced {bad} at layer {layer or '?'}",
                        fix="check the calibration data (normalisation, NaN in inputs) and that the model "
                        "runs finitely in eval mode on it")


class SampleObserver:
    capacity: int = 1 << 17

    def __init__(self, axis: int | None = None, name: str = "", seed: int = 0):
        if axis is not None:
            raise DataError(f"calibration at layer {name}", f"{type(self).__name__} is per-tensor only",
                            fix="use calibration.method: minmax for per-channel ranges")
        self.axis, self.name = axis, name
        self.min_: Tensor | None = None
        self.max_: Tensor | None = None
        self.count_ = 0
        self._gen = torch.Generator().manual_seed(seed)
        self._vals = torch.empty(0)
        self._keys = torch.empty(0)

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        x = x.detach()
        if x.numel() == 0:
            return
        check_finite(x, self.name)
        v = x.float().reshape(-1).cpu()
        lo, hi = v.min(), v.max()
        self.min_ = lo if self.min_ is None else torch.minimum(self.min_, lo)
        self.max_ = hi if self.max_ is None else torch.maximum(self.max_, hi)
        keys = torch.rand(v.numel(), generator=self._gen)
        vals, allkeys = torch.cat([self._vals, v]), torch.cat([self._keys, keys])
        if vals.numel() > self.capacity:
            idx = torch.topk(allkeys, self.capacity, largest=False).indices
            vals, allkeys = vals[idx], allkeys[idx]
        self._vals, self._keys = vals, allkeys
        self.count_ += 1

    @property
    def samples(self) -> Tensor:
        """The sampled values (float32, 1-d)."""
        return self._vals

    def _range(self, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def qparams(self, bits: int = 8, symmetric: bool = False) -> tuple[Tensor, Tensor]:
        if self.min_ is None:
            raise DataError(f"calibration at layer {self.name}", "the observer saw no data",
                            fix="make sure the calibration data reaches this layer")
        lo, hi = self._range(bits, symmetric)
        lo = torch.maximum(torch.as_tensor(lo, dtype=torch.float32), self.min_)
        hi = torch.minimum(torch.as_tensor(hi, dtype=torch.float32), self.max_)
        return _qparams(lo, hi, bits=bits, symmetric=symmetric)
