"""Calibration observers: collect value ranges during calibration, turn them into qparams.

An observer is a small class registered in :data:`nnsqueeze.registry.OBSERVERS`; the ``quantize``
step picks one by the recipe's ``calibration.method`` and feeds it every activation it sees::

    >>> import torch
    >>> from nnsqueeze.registry import OBSERVERS
    >>> obs = OBSERVERS.get("minmax")(name="features.0 input")
    >>> obs.observe(torch.tensor([[-1.0, 0.5], [2.0, 0.0]]))
    >>> obs.observe(torch.tensor([3.0]))
    >>> float(obs.min_), float(obs.max_), obs.count_
    (-1.0, 3.0, 2)
    >>> scale, zp = obs.qparams(bits=8, symmetric=False)
    >>> round(float(scale) * 255, 6), int(zp)
    (4.0, 64)

A new method (percentile, MSE, ...) is a new class with the same three members
(``observe``, ``qparams``, ``count_``) registered under a new name.
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


# Range-search observers, one per file; importing them registers them.
from . import ema, kl, mse, percentile  # noqa: E402,F401
