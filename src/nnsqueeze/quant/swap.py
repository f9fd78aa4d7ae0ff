"""The one place a layer changes class: :func:`swap_class`.

Every quantized family swaps in (and reverts) by assigning ``module.__class__``: the object, its
parameters, hooks and ``<name>.weight`` state-dict keys stay (docs/architecture.md, "Module swap,
not tensor subclass"). The converters (:func:`nnsqueeze.quant.convert.convert`) and each family's
``revert_`` call this function instead of assigning the attribute themselves, so the mechanism is
written once. ::

    >>> from torch import nn
    >>> from nnsqueeze.quant.swap import swap_class
    >>> class Tagged(nn.Linear):
    ...     pass
    >>> layer = nn.Linear(2, 2)
    >>> swap_class(layer, Tagged) is layer, type(layer).__name__
    (True, 'Tagged')
    >>> type(swap_class(layer, nn.Linear)).__name__
    'Linear'
"""

from __future__ import annotations

from typing import TypeVar

from torch import nn

M = TypeVar("M", bound=nn.Module)


def swap_class(module: nn.Module, cls: type[M]) -> M:
    """Make ``module`` an instance of ``cls`` in place (same object) and return it. ``cls`` must share
    the module's object layout (a subclass of its float class, or that float class itself)."""
    module.__class__ = cls
    return module  # type: ignore[return-value]
