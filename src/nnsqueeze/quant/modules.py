"""Fake-quant Linear / Conv1d / Conv2d: torch layers that compute exactly what ONNX Runtime's int8
kernels compute, and export to QDQ ONNX.

A float layer is converted *in place* (its class is swapped, so parameters, hooks and the
``<name>.weight`` / ``<name>.bias`` state-dict keys are kept) and gains buffers for its qparams:

- ``weight_scale_`` (C_out,): symmetric per-output-channel int8 weight scales (zero point 0);
- ``input_scale_`` (), ``input_zero_point_`` () int32: asymmetric uint8 input quantization;
- ``output_scale_`` (), ``output_zero_point_`` () int32: only with ``quant_output=True`` (convs:
  ONNX Runtime fuses a Conv into QLinearConv only when its output is quantized).

Forward (eval) = ``Q/DQ(input) -> layer(Q/DQ(weight), int32 bias) -> [ReLU] -> [Q/DQ(output)]``,
where the bias is rounded to int32 codes of scale ``input_scale_ * weight_scale_`` like ORT's
QLinearConv/QGemm. A ReLU is absorbed (``act="relu"``) when the layer's output goes only to a
ReLU, so the output range starts at 0 (zero point 0) and ORT drops the ReLU. In training mode the
same values are produced with straight-through gradients (quantization-aware fine-tuning). ::

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.quant.modules import convert_
    >>> from nnsqueeze.quant.observers import MinMaxObserver
    >>> layer = nn.Conv1d(2, 3, 3)
    >>> q = convert_(layer, act="relu", quant_output=True)      # same object, now a QuantConv1d
    >>> q.start_calibration(MinMaxObserver, "conv")
    >>> _ = q(torch.randn(4, 2, 11)); q.finish_calibration()
    >>> y = q(torch.randn(4, 2, 11))                             # int8 simulation
    >>> sd = q.state_dict(); q.pack_state(sd, ""); sd["weight"].dtype
    torch.int8

``pack_state`` / ``unpack_state`` store the weight as int8 codes in a state dict and restore it
(dequantized, bit-exact to the fake-quantized weight), for ~4x smaller artifacts; a bool
``weight_mask`` left by pruning is stored as bits.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..ops.quant import (dequantize, fake_quantize_bias, fake_quantize_ste, qparams, qrange, quantize,
                         quantize_bias, sqnr_db)

Tensor = torch.Tensor

ACT_QMIN, ACT_QMAX = qrange(8, signed=False)  # activations: asymmetric uint8 per tensor


class FakeQuantMixin:
    """Shared state and maths of the fake-quant layers (mixed into nn.Linear / nn.Conv*d)."""

    weight: nn.Parameter
    bias: nn.Parameter | None

    # Plain attributes set by convert_ (not state: the step's record carries them for rebuild).
    weight_bits: int = 8
    act: str | None = None          # "relu" or None
    quant_output: bool = False
    _float_class: type | None = None
    _observers: tuple | None = None  # (input observer, output observer or None) while calibrating
    _input_sum: list | None = None   # [per-input-channel sum (float64), count] while calibrating
    _export_cache: dict | None = None

    # -- setup -------------------------------------------------------------------------------
    def _setup_quant(self, weight_bits: int, act: str | None, quant_output: bool) -> None:
        if act not in (None, "relu"):
            raise ValueError(f"act must be None or 'relu', got {act!r}")
        qrange(weight_bits, signed=True)  # validates bits
        self.weight_bits, self.act, self.quant_output = weight_bits, act, bool(quant_output)
        self._observers, self._export_cache, self._input_sum = None, None, None
        dev, c_out = self.weight.device, self.weight.shape[0]
        self.register_buffer("weight_scale_", torch.ones(c_out, device=dev))
        self.register_buffer("input_scale_", torch.ones((), device=dev))
        self.register_buffer("input_zero_point_", torch.zeros((), dtype=torch.int32, device=dev))
        if self.quant_output:
            self.register_buffer("output_scale_", torch.ones((), device=dev))
            self.register_buffer("output_zero_point_", torch.zeros((), dtype=torch.int32, device=dev))
        self.refresh_weight_scale_()

    @property
    def weight_qrange(self) -> tuple[int, int]:
        return qrange(self.weight_bits, signed=True)

    def revert_(self) -> nn.Module:
        """Back to the plain float layer (same object); qparam buffers are dropped."""
        for b in ("weight_scale_", "input_scale_", "input_zero_point_", "output_scale_", "output_zero_point_"):
            self._buffers.pop(b, None)
        for a in ("weight_bits", "act", "quant_output", "_observers", "_export_cache", "_input_sum"):
            self.__dict__.pop(a, None)
        cls = self._float_class
        self.__dict__.pop("_float_class", None)
        self.__class__ = cls
        return self

    # -- weights -----------------------------------------------------------------------------
    def masked_weight(self) -> Tensor:
        """The weight with a prune mask (buffer ``weight_mask``) applied: pruned zeros stay zero."""
        mask = getattr(self, "weight_mask", None)
        if mask is None:
            return self.weight
        return torch.where(mask.to(torch.bool), self.weight, torch.zeros((), dtype=self.weight.dtype,
                                                                        device=self.weight.device))

    @torch.no_grad()
    def refresh_weight_scale_(self) -> None:
        """``weight_scale_`` from the current weights: per output channel absmax / qmax."""
        w = self.masked_weight().detach().float()
        flat = w.reshape(w.shape[0], -1)
        scale, _ = qparams(flat.amin(1), flat.amax(1), bits=self.weight_bits, symmetric=True)
        self.weight_scale_.copy_(scale)

    def fake_quant_weight(self) -> Tensor:
        qmin, qmax = self.weight_qrange
        zp = torch.zeros_like(self.weight_scale_, dtype=torch.int32)
        return fake_quantize_ste(self.masked_weight(), self.weight_scale_, zp, qmin, qmax, axis=0)

    def weight_codes(self) -> Tensor:
        """int8 weight codes (C_out, ...)."""
        qmin, qmax = self.weight_qrange
        zp = torch.zeros_like(self.weight_scale_, dtype=torch.int32)
        return quantize(self.masked_weight().detach(), self.weight_scale_, zp, qmin, qmax, axis=0).to(torch.int8)

    def weight_sqnr_db(self) -> float:
        w = self.masked_weight().detach()
        return sqnr_db(w, self.fake_quant_weight().detach())

    def bias_codes(self) -> Tensor | None:
        """int32 bias codes of scale ``input_scale_ * weight_scale_`` (what ORT adds), or None."""
        if self.bias is None:
            return None
        return quantize_bias(self.bias.detach(), self.input_scale_, self.weight_scale_)[0]

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
        """Turn the observed ranges into ``input_*`` / ``output_*`` qparams (asymmetric uint8).

        ``bias_correction``: shift the bias by ``-(Q(W) - W) @ E[x]`` so that the weight rounding
        error has zero mean on the calibration inputs (Nagel et al. 2019, "Data-free quantization",
        empirical variant; for convs the kernel taps share the channel mean, padding ignored).
        Returns the largest absolute bias shift, or None when not applied.
        """
        obs_in, obs_out = self._observers
        s, z = obs_in.qparams(bits=8, symmetric=False)
        self.input_scale_.copy_(s)
        self.input_zero_point_.copy_(z)
        if obs_out is not None:
            s, z = obs_out.qparams(bits=8, symmetric=False)
            self.output_scale_.copy_(s)
            self.output_zero_point_.copy_(z)
        self._observers = None
        self.refresh_weight_scale_()
        total, n = self._input_sum or (None, 0)
        self._input_sum = None
        if not bias_correction or self.bias is None or total is None or n == 0:
            return None
        mean = total / n                                                     # (C_in,)
        err = (self.fake_quant_weight() - self.masked_weight()).double()     # (C_out, C_in/groups, *k)
        err = err.reshape(err.shape[0], err.shape[1], -1).sum(-1)            # (C_out, C_in/groups)
        groups = getattr(self, "groups", 1)
        # Output channel o reads the input channels of its group.
        mean_per_out = mean.reshape(groups, -1).repeat_interleave(err.shape[0] // groups, dim=0)
        shift = (err * mean_per_out).sum(1)                                  # (C_out,)
        self.bias.sub_(shift.to(self.bias.dtype))
        return float(shift.abs().max())

    # -- forward -----------------------------------------------------------------------------
    def _layer(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _act(self, y: Tensor) -> Tensor:
        return F.relu(y) if self.act == "relu" else y

    def forward(self, x: Tensor) -> Tensor:
        if self._observers is not None:  # calibration: float model, record ranges
            obs_in, obs_out = self._observers
            obs_in.observe(x)
            self._observe_input_mean(x)
            y = self._act(self._layer(x, self.masked_weight(), self.bias))
            if obs_out is not None:
                obs_out.observe(y)
            return y
        if torch.onnx.is_in_onnx_export():
            return self._export_forward(x)
        if self.training:
            # Quantization-aware training: weights move, so their scales follow.
            self.refresh_weight_scale_()
        x = fake_quantize_ste(x, self.input_scale_, self.input_zero_point_, ACT_QMIN, ACT_QMAX)
        b = None if self.bias is None else fake_quantize_bias(self.bias, self.input_scale_, self.weight_scale_)
        y = self._act(self._layer(x, self.fake_quant_weight(), b))
        if self.quant_output:
            y = fake_quantize_ste(y, self.output_scale_, self.output_zero_point_, ACT_QMIN, ACT_QMAX)
        return y

    def _export_forward(self, x: Tensor) -> Tensor:
        """Same numbers through torch's fake-quant ops, which the TorchScript ONNX exporter turns into
        QuantizeLinear/DequantizeLinear. Weight and bias are constants here; the exporter's
        post-processing stores the weight as int8 and the bias as int32 (see export/onnx.py)."""
        cache = self._export_cache or self.export_constants()
        x = torch.fake_quantize_per_tensor_affine(x, self.input_scale_, self.input_zero_point_, ACT_QMIN, ACT_QMAX)
        zp = torch.zeros(self.weight.shape[0], dtype=torch.int32, device=self.weight.device)
        # Codes are within the (possibly narrower) weight range already; ONNX only knows int8.
        w = torch.fake_quantize_per_channel_affine(cache["weight"], self.weight_scale_, zp, 0, -128, 127)
        y = self._act(self._layer(x, w, cache["bias"]))
        if self.quant_output:
            y = torch.fake_quantize_per_tensor_affine(y, self.output_scale_, self.output_zero_point_,
                                                      ACT_QMIN, ACT_QMAX)
        return y

    @torch.no_grad()
    def export_constants(self) -> dict[str, Tensor | None]:
        """Float weight (mask applied) and the int32-rounded bias as plain tensors for tracing."""
        b = None
        if self.bias is not None:
            b = fake_quantize_bias(self.bias.detach(), self.input_scale_, self.weight_scale_).clone()
        return {"weight": self.masked_weight().detach().clone(), "bias": b}

    # -- artifact packing --------------------------------------------------------------------
    def pack_state(self, sd: dict, prefix: str) -> None:
        """In place: ``sd[prefix + "weight"]`` (float) becomes its int8 codes, and a bool
        ``weight_mask`` (from pruning) becomes 8 mask entries per byte (uint8, flattened)."""
        key, mkey = prefix + "weight", prefix + "weight_mask"
        w, mask = sd.get(key), sd.get(mkey)
        if w is not None and w.is_floating_point():
            if mask is not None:
                w = torch.where(mask.to(torch.bool), w, torch.zeros((), dtype=w.dtype, device=w.device))
            scale = sd[prefix + "weight_scale_"]
            qmin, qmax = self.weight_qrange
            zp = torch.zeros_like(scale, dtype=torch.int32)
            sd[key] = quantize(w, scale, zp, qmin, qmax, axis=0).to(torch.int8)
        if mask is not None and mask.dtype == torch.bool:
            sd[mkey] = torch.from_numpy(np.packbits(mask.detach().cpu().numpy().reshape(-1)))

    def unpack_state(self, sd: dict, prefix: str) -> None:
        """In place: int8 ``sd[prefix + "weight"]`` becomes the float weight ``codes * weight_scale_``
        (bit-exact to the fake-quantized weight); a packed mask becomes the bool mask again."""
        key, mkey = prefix + "weight", prefix + "weight_mask"
        q, mask = sd.get(key), sd.get(mkey)
        if q is not None and q.dtype == torch.int8:
            scale = sd[prefix + "weight_scale_"]
            sd[key] = dequantize(q, scale, torch.zeros_like(scale, dtype=torch.int32), axis=0).to(self.weight.dtype)
        if mask is not None and mask.dtype == torch.uint8:
            shape = tuple(self.weight.shape)
            bits = np.unpackbits(mask.cpu().numpy(), count=int(np.prod(shape)))
            sd[mkey] = torch.from_numpy(bits.reshape(shape).astype(np.bool_))

    def extra_repr(self) -> str:
        parts = [super().extra_repr(), f"w{self.weight_bits} per-channel sym, a8 per-tensor asym"]
        if self.act:
            parts.append(f"act={self.act}")
        if self.quant_output:
            parts.append("quantized output")
        return ", ".join(parts)


class QuantLinear(FakeQuantMixin, nn.Linear):
    def _layer(self, x, w, b):
        return F.linear(x, w, b)


class QuantConv1d(FakeQuantMixin, nn.Conv1d):
    def _layer(self, x, w, b):
        return self._conv_forward(x, w, b)


class QuantConv2d(FakeQuantMixin, nn.Conv2d):
    def _layer(self, x, w, b):
        return self._conv_forward(x, w, b)


MODULE_MAP: dict[type, type] = {nn.Linear: QuantLinear, nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d}


def convert_(module: nn.Module, weight_bits: int = 8, act: str | None = None,
             quant_output: bool | None = None) -> FakeQuantMixin:
    """Turn a plain ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` into its fake-quant class, in place.

    ``quant_output`` defaults to True for convs (ORT's QLinearConv needs a quantized output) and
    False for Linear (QGemm may output float). Buffers start as placeholders (scale 1, zp 0) of the
    right shapes, to be filled by calibration or by ``load_state_dict``.
    """
    cls = MODULE_MAP.get(type(module))
    if cls is None:
        raise TypeError(f"cannot fake-quantize a {type(module).__name__}; supported: "
                        f"{', '.join(c.__name__ for c in MODULE_MAP)}")
    if quant_output is None:
        quant_output = not isinstance(module, nn.Linear)
    float_class = type(module)
    module.__class__ = cls
    module._float_class = float_class
    module._setup_quant(weight_bits, act, quant_output)
    return module


def fake_quant_modules(model: nn.Module) -> Iterator[tuple[str, FakeQuantMixin]]:
    for name, m in model.named_modules():
        if isinstance(m, FakeQuantMixin):
            yield name, m


@contextlib.contextmanager
def export_mode(model: nn.Module) -> Iterator[None]:
    """Freeze weight/bias constants of every fake-quant layer for the ONNX exporter's trace."""
    mods = [m for _, m in fake_quant_modules(model)]
    for m in mods:
        m._export_cache = m.export_constants()
    try:
        yield
    finally:
        for m in mods:
            m._export_cache = None
