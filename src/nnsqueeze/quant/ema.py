"""``ema-minmax`` observer: an exponential moving average of each batch's min and max.

Plain ``minmax`` keeps the most extreme value ever seen, so one unusual calibration batch sets the
range for good; the moving average follows the typical batch instead: after the first batch,
``min_ = (1 - c) * min_ + c * batch_min`` (same for ``max_``), ``c = momentum`` (0.01, or 0.1 for
``ema-minmax-0.1``). Recipe: ``calibration: {method: ema-minmax}``. ::

    >>> import torch
    >>> from nnsqueeze.registry import OBSERVERS
    >>> obs = OBSERVERS.get("ema-minmax-0.1")(name="x")
    >>> obs.observe(torch.tensor([-1.0, 1.0]))
    >>> obs.observe(torch.tensor([-3.0, 11.0]))
    >>> round(float(obs.min_), 4), round(float(obs.max_), 4)
    (-1.2, 2.0)
"""

from __future__ import annotations

import torch

from ..registry import OBSERVERS
from .minmax import MinMaxObserver

Tensor = torch.Tensor


class EmaMinMaxObserver(MinMaxObserver):
    momentum: float = 0.01

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        batch = MinMaxObserver(self.axis, self.name)
        batch.observe(x)  # this batch's extremes; checks NaN/inf
        if batch.min_ is None:  # empty batch
            return
        if self.min_ is None:  # the first batch sets the range
            self.min_, self.max_ = batch.min_, batch.max_
        elif batch.min_.shape != self.min_.shape:
            super().observe(x)  # raises the channel-count error
        else:
            c = self.momentum
            self.min_ = (1 - c) * self.min_ + c * batch.min_
            self.max_ = (1 - c) * self.max_ + c * batch.max_
        self.count_ += 1


OBSERVERS.register("ema-minmax")(EmaMinMaxObserver)


@OBSERVERS.register("ema-minmax-0.1")
class EmaMinMax01Observer(EmaMinMaxObserver):
    momentum = 0.1
