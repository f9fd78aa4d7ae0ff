"""Calibration of the fake-quant layers (mixed into :class:`nnsqueeze.quant.modules.FakeQuantMixin`):
observe the input (and quantized output) ranges in float, turn them into the layer's activation
qparams, and optionally correct the bias for the mean weight-rounding error. ::

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.quant.modules import convert_
    >>> from nnsqueeze.quant.observers import MinMaxObserver
    >>> q = convert_(nn.Linear(4, 2))
    >>> x = torch.linspace(-1.0, 3.0, 40).reshape(10, 4)
    >>> q.start_calibration(MinMaxObserver, "fc"); _ = q(x); q.calibrated_batches
    1
    >>> q.finish_calibration()                      # uint8 asymmetric over [-1, 3]
    >>> round(float(q.input_scale_) * 255, 4), int(q.input_zero_point_)
    (4.0, 64)
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

Tensor = torch.Tensor


class FakeQuantCalibrationMixin:
    """``start_calibration`` / ``finish_calibration`` / ``correct_bias_`` of the fake-quant layers."""

    # -- calibration -------------------------------------------------------------------------
    def start_calibration(self, make_observer: Callable[..., object], name: str) -> None:
        """Until :meth:`finish_calibration`, forward runs in float and observes input/output ranges."""
        out = make_observer(name=f"{name} output") if self.quant_output else None
        self._observers = (make_observer(name=f"{name} input"), out)
        self._input_sum = [None, 0]

    def _observe_input_mean(self, x: Tensor) -> None:
        """Accumulate per-input-channel sums (channel dim 1 for convs, last dim for Linear)."""
        x = x.detach().double()
        flat = x.reshape(-1, x.shape[-1]) if isinstance(self, nn.Linear) else x.transpose(0, 1).reshape(x.shape[1], -1)
        if isinstance(self, nn.Linear):
            total, n = flat.sum(0), flat.shape[0]
        else:
            total, n = flat.sum(1), flat.shape[1]
        acc = self._input_sum
        acc[0] = total if acc[0] is None else acc[0] + total
        acc[1] += n

    @property
    def calibrated_batches(self) -> int:
        return 0 if self._observers is None else self._observers[0].count_

    @torch.no_grad()
    def finish_calibration(self, bias_correction: bool = False) -> float | None:
        """Turn the observed ranges into ``input_*`` / ``output_*`` qparams (the layer's :class:`ActScheme`).

        ``bias_correction``: shift the bias by ``-(Q(W) - W) @ E[x]`` so that the weight rounding
        error has zero mean on the calibration inputs (Nagel et al. 2019, "Data-free quantization",
        empirical variant; for convs the kernel taps share the channel mean, padding ignored).
        Returns the largest absolute bias shift, or None when not applied.
        """
        obs_in, obs_out = self._observers
        a = self.ascheme
        from .integer import fit_clip_scale

        s, z = obs_in.qparams(bits=a.bits, symmetric=a.symmetric)
        self.input_scale_.copy_(fit_clip_scale(s, z, a.qrange))
        self.input_zero_point_.copy_(z)
        if obs_out is not None:
            s, z = obs_out.qparams(bits=a.bits, symmetric=a.symmetric)
            self.output_scale_.copy_(fit_clip_scale(s, z, a.qrange))
            self.output_zero_point_.copy_(z)
        self._observers = None
        self.refresh_weight_scale_()
        total, n = self._input_sum or (None, 0)
        self._input_sum = None
        self._input_mean = None if total is None or n == 0 else total / n
        if not bias_correction:
            return None
        return self.correct_bias_()

    @torch.no_grad()
    def correct_bias_(self, reference_weight: Tensor | None = None) -> float | None:
        """Shift the bias by ``-(Q(W) - W_ref) @ E[x]`` (``E[x]`` from calibration; ``W_ref`` the float
        weight, by default the current one). Returns the largest shift, or None when not possible."""
        mean = self._input_mean
        if self.bias is None or mean is None or self._modules.get("bn") is not None:
            return None
        ref = self.masked_weight() if reference_weight is None else reference_weight
        err = (self.fake_quant_weight() - ref).double()                      # (C_out, C_in/groups, *k)
        err = err.reshape(err.shape[0], err.shape[1], -1).sum(-1)            # (C_out, C_in/groups)
        groups = getattr(self, "groups", 1)
        # Output channel o reads the input channels of its group.
        mean_per_out = mean.reshape(groups, -1).repeat_interleave(err.shape[0] // groups, dim=0)
        shift = (err * mean_per_out).sum(1)                                  # (C_out,)
        self.bias.sub_(shift.to(self.bias.dtype))
        return float(shift.abs().max())
