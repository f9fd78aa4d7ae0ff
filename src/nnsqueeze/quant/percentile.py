"""``percentile`` observer: the range covers the central ``percentile`` % of the values.

Outliers beyond the percentile are clipped, which buys resolution for the bulk of the values.
Symmetric: ``absmax`` is the ``percentile`` quantile of ``|x|``; asymmetric: ``[q(100 - p),
q(p)]``. Recipe: ``calibration: {method: percentile}`` (99.99 %); ``percentile-99.9`` and
``percentile-99.999`` are registered too. ::

    >>> import torch
    >>> from nnsqueeze.registry import OBSERVERS
    >>> obs = OBSERVERS.get("percentile-99.9")(name="x")
    >>> obs.observe(torch.linspace(-1, 1, 20001))
    >>> [round(float(v), 3) for v in obs._range(8, False)]
    [-0.998, 0.998]
"""

from __future__ import annotations

import torch

from ..registry import OBSERVERS
from .sampling import SampleObserver

Tensor = torch.Tensor


def _quantile(v: Tensor, q: float) -> Tensor:
    v = v.double().sort().values
    pos = q * (v.numel() - 1)
    i = int(pos)
    j = min(i + 1, v.numel() - 1)
    return (v[i] + (v[j] - v[i]) * (pos - i)).float()  # linear interpolation (numpy's default)


class PercentileObserver(SampleObserver):
    percentile: float = 99.99

    def __init__(self, axis: int | None = None, name: str = "", percentile: float | None = None, seed: int = 0):
        super().__init__(axis, name, seed)
        if percentile is not None:
            self.percentile = float(percentile)
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")

    def _range(self, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
        p = self.percentile / 100.0
        if symmetric:
            a = _quantile(self.samples.abs(), p)
            return -a, a
        return _quantile(self.samples, 1.0 - p), _quantile(self.samples, p)


for _p in (99.9, 99.99, 99.999):
    OBSERVERS.register(f"percentile-{_p:g}")(type(f"Percentile{str(_p).replace('.', '_')}Observer",
                                                  (PercentileObserver,), {"percentile": _p}))
OBSERVERS.register("percentile")(PercentileObserver)
