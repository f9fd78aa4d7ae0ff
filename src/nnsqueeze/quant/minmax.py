"""``minmax`` observer: the running min/max of every value seen, per tensor or per channel.

The default calibration method and the base of ``ema-minmax`` (:mod:`nnsqueeze.quant.ema`); the
registry of methods and how to add one are in :mod:`nnsqueeze.quant.observers`. ::

    >>> import torch
    >>> obs = MinMaxObserver(axis=0, name="w")
    >>> obs.observe(torch.tensor([[-1.0, 2.0], [0.5, 0.25]]))
    >>> obs.min_.tolist(), obs.max_.tolist()
    ([-1.0, 0.25], [2.0, 0.5])
"""

from __future__ import annotations

import torch

from ..errors import DataError
from .act_scheme import act_qparams as _qparams
from ..registry import OBSERVERS
from .sampling import check_finite

Tensor = torch.Tensor


@OBSERVERS.register("minmax")
class MinMaxObserver:
    """Running min/max, per tensor (``axis=None``) or per channel along ``axis``.

    ``name`` says where the values come from (e.g. ``"features.3 input"``) for error messages.
    """

    def __init__(self, axis: int | None = None, name: str = ""):
        self.axis = axis
        self.name = name
        self.min_: Tensor | None = None  # () or (C,), float32
        self.max_: Tensor | None = None
        self.count_ = 0  # observations (calls) so far

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Fold ``x`` into the running range. Raises :class:`DataError` on NaN/inf."""
        x = x.detach()
        if x.numel() == 0:
            return
        check_finite(x, self.name)
        x = x.float()
        if self.axis is None:
            lo, hi = x.amin(), x.amax()
        else:
            # (C, everything else) so that one reduction gives per-channel extremes.
            flat = x.movedim(self.axis, 0).reshape(x.shape[self.axis], -1)
            lo, hi = flat.amin(1), flat.amax(1)
        if self.min_ is None:
            self.min_, self.max_ = lo.cpu(), hi.cpu()
        else:
            if lo.shape != self.min_.shape:
                raise DataError(f"calibration at layer {self.name}", "channel count changed between batches "
                                f"({tuple(self.min_.shape)} -> {tuple(lo.shape)})",
                                fix="per-channel observation needs the same channel count in every batch")
            self.min_ = torch.minimum(self.min_, lo.cpu())
            self.max_ = torch.maximum(self.max_, hi.cpu())
        self.count_ += 1

    def qparams(self, bits: int = 8, symmetric: bool = False) -> tuple[Tensor, Tensor]:
        """(scale float32, zero_point int32) for the range seen on the ``bits``-bit code range (2..8 or 16;
        signed when ``symmetric``), see :func:`nnsqueeze.quant.act_scheme.act_qparams`."""
        if self.min_ is None:
            raise DataError(f"calibration at layer {self.name}", "the observer saw no data",
                            fix="make sure the calibration data reaches this layer")
        return _qparams(self.min_, self.max_, bits=bits, symmetric=symmetric)
