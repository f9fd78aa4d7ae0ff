"""How a fake-quant layer's weight is cut into rows that each get one scale (mixed into
:class:`nnsqueeze.quant.modules.FakeQuantMixin`).

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
import torch.nn.functional as F

Tensor = torch.Tensor


class WeightRowsMixin:
    """Row geometry of ``self.weight`` under ``self.wscheme``."""

    weight: torch.nn.Parameter

    def weight_groups(self) -> tuple[int, int, int]:
        """``(G, L, pad)``: each output channel's ``D = C_in/groups * k`` weights are cut into ``G``
        rows of ``L`` values (``L = min(group_size, D)``; per-channel/per-tensor: ``G = 1, L = D``).
        When ``group_size`` does not divide ``D`` the last group holds only ``L - pad`` real values:
        its row is zero-padded in :meth:`weight_rows` and every statistic ignores the padding."""
        d = self.weight[0].numel()
        gs = self.wscheme.group_size
        if gs is None:
            return 1, d, 0
        length = min(gs, d)
        g = -(-d // length)
        return g, length, g * length - d

    def weight_rows_count(self) -> int:
        """Rows of the weight's (R, L) view: C_out, or C_out * G for per-group schemes."""
        return self.weight.shape[0] * self.weight_groups()[0]

    def weight_rows(self, w: Tensor) -> Tensor:
        """``w`` (C_out, ...) viewed as (R, L) rows (see :mod:`nnsqueeze.quant.scheme`); a partial
        last group is zero-padded (its padding is dropped again by :meth:`weight_from_rows`)."""
        _, length, pad = self.weight_groups()
        flat = w.reshape(w.shape[0], -1)
        if pad:
            flat = F.pad(flat, (0, pad))
        return flat.reshape(-1, length)

    def weight_from_rows(self, rows: Tensor) -> Tensor:
        """Inverse of :meth:`weight_rows`: (R, L) rows back to the weight's shape, padding dropped."""
        _, _, pad = self.weight_groups()
        flat = rows.reshape(self.weight.shape[0], -1)
        if pad:
            flat = flat[:, :flat.shape[1] - pad]
        return flat.reshape(self.weight.shape)

    def weight_row_mask(self) -> Tensor | None:
        """Bool (R, L): True on real weights, False on the padding of partial last groups; None when
        there is no padding."""
        g, length, pad = self.weight_groups()
        if not pad:
            return None
        mask = torch.ones(self.weight.shape[0], g * length, dtype=torch.bool, device=self.weight.device)
        mask[:, g * length - pad:] = False
        return mask.reshape(-1, length)

    def per_row(self, fn: Callable[[Tensor], tuple[Tensor, ...]], rows: Tensor) -> tuple[Tensor, ...]:
        """``fn`` maps rows (n, l) to per-row statistics ``(n,)`` tensors; applied to the (R, L) rows
        of :meth:`weight_rows` so that a partial last group's statistics come from its own values
        only (full groups and last groups go through ``fn`` separately, never the padding)."""
        g, length, pad = self.weight_groups()
        if not pad:
            return tuple(fn(rows))
        c = rows.shape[0] // g
        grid = rows.reshape(c, g, length)
        tail = tuple(fn(grid[:, -1, :length - pad]))
        if g == 1:
            return tail
        full = tuple(fn(grid[:, :-1].reshape(-1, length)))
        return tuple(torch.cat([a.reshape(c, g - 1), b.reshape(c, 1)], 1).reshape(-1) for a, b in zip(full, tail))
