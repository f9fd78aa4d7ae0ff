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
(``observe``, ``qparams``, ``count_``) registered under a new name, in its own file imported below.
This module only gathers them: each method lives in its own file and imports what it builds on
(:mod:`.minmax`, :mod:`.sampling`), never this module, so the imports run one way.
"""

# Importing the methods registers them; ``OBSERVERS`` imports this module on its first lookup.
from . import ema, kl, mse, percentile  # noqa: F401
from .minmax import MinMaxObserver

__all__ = ["MinMaxObserver", "ema", "kl", "mse", "percentile"]
