"""How a fake-quant layer's weight is cut into rows that each get one scale (mixed into
:class:`nnsqueeze.quant.modules.FakeQuantMixin`): the geometry of :mod:`nnsqueeze.ops.rtn` applied to
``self.weight`` under ``self.qargs``.

Per-channel: one row per output channel. Per-group: each output channel's ``D = C_in/groups * k``
weights are cut into ``G = ceil(D / group_size)`` rows; a short last group is zero-padded in the
``(R, L)`` view and every statistic ignores the padding (:meth:`WeightRowsMixin.per_row`). ::

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.quant.modules import convert_
    >>> from nnsqueeze.quant.scheme import WeightScheme
    >>> q = convert_(nn.Linear(10, 3), scheme=WeightScheme(bits=4, granularity="per-group", group_size=4))
    >>> q.weight_groups(), tuple(q.weight_rows(q.weight).shape)
    ((3, 4, 2), (9, 4))
"""

from __future__ import annotations

from typing import Callable

import torch

from ..ops import rtn

Tensor = torch.Tensor


class WeightRowsMixin:
    """Row geometry of ``self.weight`` under ``self.qargs`` (see :mod:`nnsqueeze.ops.rtn`)."""

    weight: torch.nn.Parameter

    def weight_groups(self) -> tuple[int, int, int]:
        """``(G, L, pad)`` of :func:`nnsqueeze.ops.rtn.group_shape` for one output channel
        (per-channel/per-tensor: ``G = 1, L = D``)."""
        return rtn.group_shape(self.weight[0].numel(), self.qargs.group_size)

    def weight_rows_count(self) -> int:
        """Rows of the weight's (R, L) view: C_out, or C_out * G for per-group schemes."""
        return self.weight.shape[0] * self.weight_groups()[0]

    def weight_rows(self, w: Tensor) -> Tensor:
        """``w`` (C_out, ...) viewed as (R, L) rows; a partial last group is zero-padded."""
        return rtn.to_rows(w, self.qargs.group_size)

    def weight_from_rows(self, rows: Tensor) -> Tensor:
        """Inverse of :meth:`weight_rows`: (R, L) rows back to the weight's shape, padding dropped."""
        return rtn.from_rows(rows, self.weight.shape, self.qargs.group_size)

    def weight_row_mask(self) -> Tensor | None:
        """Bool (R, L): True on real weights, False on padding; None when there is no padding."""
        return rtn.rows_mask(self.weight.shape[0], self.weight[0].numel(), self.qargs.group_size,
                             self.weight.device)

    def per_row(self, fn: Callable[[Tensor], tuple[Tensor, ...]], rows: Tensor) -> tuple[Tensor, ...]:
        """:func:`nnsqueeze.ops.rtn.per_group` on the (R, L) rows of :meth:`weight_rows`."""
        return rtn.per_group(fn, rows, self.weight[0].numel(), self.qargs.group_size)
