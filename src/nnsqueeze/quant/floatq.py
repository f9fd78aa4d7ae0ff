"""Float-format quantized Linear / Conv1d / Conv2d: FP8 weights and activations, MX and NVFP4 weights.

The module kind of the float formats of :class:`~nnsqueeze.quant.args.QuantArgs` (FP8 E4M3/E5M2 per
tensor or per output channel, the MX block formats and NVFP4), simulated with the pure math of
:mod:`nnsqueeze.ops.fp8` and :mod:`nnsqueeze.ops.mx`. A float layer is converted in place (its class
is swapped, as the other families do) and gains buffers:

- ``weight_scale_``: FP8 weights: ``amax / max_finite`` per tensor ``()`` or per output channel ``(C_out,)``;
- ``weight_tensor_scale_`` ``()``: NVFP4's fp32 tensor scale ``amax / (6 * 448)``;
- ``input_scale_`` ``()``: FP8 activations (static, per tensor): the calibrated ``amax / max_finite``.
  Dynamic FP8 activations (``aargs.dynamic``) have no buffer: each forward takes the scale from the
  current input, per tensor or per token (:func:`nnsqueeze.ops.fp8.fp8_dynamic_scale`).

MX and NVFP4 block scales follow each block of 32 (16) consecutive inputs of an output channel
(the weight viewed as ``(C_out, C_in/groups * k)``), so they are derived from the weight itself and are
not buffers. Forward: ``layer(FQ(x), FQ(W), bias)`` in float32, ``FQ`` the format's
quantize-dequantize; the bias stays float. ::

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.quant.args import QuantArgs
    >>> from nnsqueeze.quant.floatq import convert_float_
    >>> from nnsqueeze.quant.observers import MinMaxObserver
    >>> q = convert_float_(nn.Linear(40, 3), QuantArgs(format="fp8-e4m3"), QuantArgs(format="fp8-e4m3",
    ...                    granularity="tensor", observer="minmax"))
    >>> q.start_calibration(MinMaxObserver, "fc"); _ = q(torch.randn(8, 40)); q.finish_calibration()
    >>> y = q(torch.randn(2, 40)); sorted(q.qparams())
    ['input_scale_', 'weight_scale_']
    >>> sd = q.state_dict(); q.pack_state(sd, ""); sd["weight"].dtype
    torch.uint8

For ONNX, FP8 tensors trace through :class:`FloatQDQFn`, one marker node ``nnsqueeze::FloatQDQ(x, scale)``
that :mod:`nnsqueeze.export.fp8` replaces by QuantizeLinear/DequantizeLinear with float8 zero points
(weights stored as float8 codes); dynamic activations through :class:`FloatDynQDQFn`
(``nnsqueeze::FloatDynQDQ(x)``), which becomes the run-time scale's ops and Q/DQ. The block formats
declare ``onnx_unsupported``: ONNX Runtime's CPU provider has no kernel for them, and the exporter
says so.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DataError
from ..ops.fp8 import fp8_dequantize, fp8_dynamic_fake_quantize, fp8_fake_quantize, fp8_quantize, fp8_scale
from ..ops.mx import (mx_dequantize, mx_fake_quantize, mx_quantize, nvfp4_dequantize, nvfp4_fake_quantize,
                      nvfp4_quantize, nvfp4_tensor_scale, pack_fp4, unpack_fp4)
from .args import QuantArgs
from .protocol import Packable, QuantizedModule
from .swap import swap_class

Tensor = torch.Tensor
DOMAIN, MARKER = "nnsqueeze", "FloatQDQ"   # the marker export/fp8.py replaces; never left in a file
DYN_MARKER = "FloatDynQDQ"                  # dynamic FP8 activations: the scale is computed in the graph
QPARAM_BUFFERS = ("weight_scale_", "weight_tensor_scale_", "input_scale_")


class FloatQDQFn(torch.autograd.Function):
    """The ONNX trace's stand-in for FP8 fake quantization (``axis``: None per tensor, 0 per channel):
    it exports as the marker node, which carries the math; the traced run itself only needs the shape,
    so forward is a copy (the exporter verifies the file against the eager simulation, not the trace)."""

    @staticmethod
    def forward(ctx, x, scale, fmt: str, axis: int | None):
        return x.clone()

    @staticmethod
    def symbolic(g, x, scale, fmt, axis):
        out = g.op(f"{DOMAIN}::{MARKER}", x, scale, fmt_s=fmt, axis_i=-1 if axis is None else int(axis))
        out.setType(x.type())
        return out


class FloatDynQDQFn(torch.autograd.Function):
    """The ONNX trace's stand-in for dynamic FP8 activations: marker ``nnsqueeze::FloatDynQDQ(x)``
    (attributes ``fmt``, ``token``: 1 per token, 0 per tensor, ``block``: the row length per token);
    a copy when run, as :class:`FloatQDQFn`."""

    @staticmethod
    def forward(ctx, x, fmt: str, per_token: bool, block: int):
        return x.clone()

    @staticmethod
    def symbolic(g, x, fmt, per_token, block):
        out = g.op(f"{DOMAIN}::{DYN_MARKER}", x, fmt_s=fmt, token_i=int(per_token), block_i=int(block))
        out.setType(x.type())
        return out


def _unsupported(args: QuantArgs) -> str | None:
    if args.info.kind != "block":
        return None
    return (f"ONNX Runtime's CPU provider has no kernel for {args.format} (block-scaled DequantizeLinear with "
            f"{args.scale_dtype} scales and {args.info.element} elements), so the file could not be checked")


class FloatQuantMixin(QuantizedModule, Packable):
    """Shared state and maths of the float-format layers (mixed into nn.Linear / nn.Conv*d)."""

    onnx_quantized = True
    onnx_custom_opsets = MappingProxyType({DOMAIN: 1})
    revertible = True

    weight: nn.Parameter
    bias: nn.Parameter | None
    wargs: QuantArgs
    aargs: QuantArgs | None = None     # None: activations stay float (weight-only simulation)
    _float_class: type | None = None
    _observer: object | None = None

    # -- setup ----------------------------------------------------------------------------------
    def _setup_float(self, wargs: QuantArgs, aargs: QuantArgs | None) -> None:
        if not wargs.is_float:
            raise ValueError(f"float-format layers take FP8/MX/NVFP4 weights, got {wargs.describe()}")
        if aargs is not None and (aargs.info.kind != "float" or aargs.granularity not in ("tensor", "token")
                                  or (aargs.granularity == "token" and not aargs.dynamic)):
            raise ValueError("activations: fp8-e4m3 / fp8-e5m2, static per tensor or dynamic per tensor / per "
                             f"token, got {aargs.describe()}")
        if aargs is not None and aargs.granularity == "token" and not isinstance(self, nn.Linear):
            raise ValueError(f"per-token activation scales are one per row of a Linear's input; a "
                             f"{type(self).__name__} has none: use granularity per-tensor")
        self.wargs, self.aargs, self._observer = wargs, aargs, None
        self.onnx_unsupported = _unsupported(wargs)
        dev = self.weight.device
        if wargs.info.kind == "float":
            self.register_buffer("weight_scale_", torch.ones((self.weight.shape[0],) if self._per_channel else (),
                                                             device=dev))
        elif wargs.format == "nvfp4":
            self.register_buffer("weight_tensor_scale_", torch.ones((), device=dev))
        if aargs is not None and not aargs.dynamic:
            self.register_buffer("input_scale_", torch.ones((), device=dev))
        self.refresh_weight_scale_()

    @property
    def _per_channel(self) -> bool:
        return self.wargs.granularity == "channel"

    def _masked(self) -> Tensor:
        mask = getattr(self, "weight_mask", None)
        return self.weight if mask is None else self.weight * mask

    @torch.no_grad()
    def refresh_weight_scale_(self) -> None:
        """Scales of the current weight: FP8 ``amax / max_finite``, NVFP4's tensor scale."""
        w = self._masked().detach()
        if self.wargs.info.kind == "float":
            self.weight_scale_.copy_(fp8_scale(w, self.wargs.format, 0 if self._per_channel else None))
        elif self.wargs.format == "nvfp4":
            self.weight_tensor_scale_.copy_(nvfp4_tensor_scale(w.abs().amax() if w.numel() else 0.0))

    # -- the protocol ---------------------------------------------------------------------------
    @property
    def qargs(self) -> QuantArgs:
        return self.wargs

    @property
    def act_qargs(self) -> QuantArgs | None:
        return self.aargs

    def qparams(self) -> dict[str, Tensor]:
        return {b: self._buffers[b] for b in QPARAM_BUFFERS if self._buffers.get(b) is not None}

    def dequantized_weight(self) -> Tensor:
        """The weight on the format's grid, shaped like the float weight."""
        w, fmt = self._masked(), self.wargs.format
        if self.wargs.info.kind == "float":
            return fp8_fake_quantize(w, self.weight_scale_, fmt, 0 if self._per_channel else None)
        rows = w.reshape(w.shape[0], -1)          # (C_out, C_in/groups * k): blocks run along each row
        out = nvfp4_fake_quantize(rows, self.weight_tensor_scale_) if fmt == "nvfp4" else mx_fake_quantize(rows, fmt)
        return out.reshape(w.shape)

    def revert_(self) -> nn.Module:
        """Back to the plain float layer (same object, the float weight it was converted from)."""
        for b in QPARAM_BUFFERS:
            self._buffers.pop(b, None)
        for a in ("wargs", "aargs", "_observer", "onnx_unsupported"):
            self.__dict__.pop(a, None)
        cls = self._float_class
        self.__dict__.pop("_float_class", None)
        swap_class(self, cls)
        return self

    # -- calibration of the activations ---------------------------------------------------------
    def start_calibration(self, make_observer: Callable[..., object], name: str) -> None:
        """Until :meth:`finish_calibration`, inputs stay float and their range is observed (static FP8
        activations only: weight-only and dynamic layers need no calibration)."""
        static = self.aargs is not None and not self.aargs.dynamic
        self._observer = make_observer(name=f"{name} input") if static else None

    @property
    def calibrated_batches(self) -> int:
        return 0 if self._observer is None else self._observer.count_

    @torch.no_grad()
    def finish_calibration(self) -> None:
        """``input_scale_ = amax / max_finite`` from the observer (min/max observers: ``max(-min, max)``;
        others: their symmetric 8-bit scale times 127)."""
        obs, self._observer = self._observer, None
        if obs is None:
            return
        if getattr(obs, "min_", None) is not None:
            amax = torch.maximum(obs.min_.abs(), obs.max_.abs()).float()
        else:
            amax = obs.qparams(bits=8, symmetric=True)[0].float() * 127
        if not bool(torch.isfinite(amax)):
            raise DataError(f"calibration at {obs.name}", "the input range is not finite",
                            fix="find where the inf/NaN comes from")
        self.input_scale_.copy_(fp8_scale(amax.reshape(1), self.aargs.format).reshape(()))

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        exporting = torch.onnx.is_in_onnx_export()
        if self._observer is not None:
            self._observer.observe(x)
        elif self.aargs is not None and self.aargs.dynamic:
            token = self.aargs.granularity == "token"
            x = FloatDynQDQFn.apply(x, self.aargs.format, token, getattr(self, "in_features", 0)) if exporting \
                else fp8_dynamic_fake_quantize(x, self.aargs.format, token)
        elif self.aargs is not None:
            x = FloatQDQFn.apply(x, self.input_scale_, self.aargs.format, None) if exporting \
                else fp8_fake_quantize(x, self.input_scale_, self.aargs.format)
        if exporting and self.wargs.info.kind == "float":
            w = FloatQDQFn.apply(self._masked(), self.weight_scale_, self.wargs.format,
                                 0 if self._per_channel else None)
        else:
            w = self.dequantized_weight()
        return self._layer(x, w.to(x.dtype), self.bias)

    # -- artifact: the weight as its codes ------------------------------------------------------
    def pack_state(self, sd: dict[str, Tensor], prefix: str) -> None:
        """``weight`` becomes uint8 codes (FP4 two per byte along each row); MX/NVFP4 block scales go
        in ``weight_block_scales`` (uint8 E8M0 / E4M3 codes, ``(C_out, blocks)``)."""
        key = prefix + "weight"
        w, fmt = sd.get(key), self.wargs.format
        if w is None or not w.is_floating_point():
            return
        mask = sd.get(prefix + "weight_mask")
        if mask is not None:
            w = w * mask
        if self.wargs.info.kind == "float":
            sd[key] = fp8_quantize(w, sd[prefix + "weight_scale_"], fmt, 0 if self._per_channel else None)
            return
        rows = w.reshape(w.shape[0], -1)
        codes, scales = (nvfp4_quantize(rows, sd[prefix + "weight_tensor_scale_"])[:2] if fmt == "nvfp4"
                         else mx_quantize(rows, fmt))
        sd[key] = (pack_fp4(codes) if self.wargs.bits == 4 else codes).contiguous()
        sd[prefix + "weight_block_scales"] = scales.contiguous()

    def unpack_state(self, sd: dict[str, Tensor], prefix: str) -> None:
        """The codes back to the float weight on the grid (bit-exact to :meth:`dequantized_weight`)."""
        key, fmt = prefix + "weight", self.wargs.format
        q = sd.get(key)
        if q is None or q.dtype != torch.uint8:
            return
        shape = self.weight.shape
        if self.wargs.info.kind == "float":
            w = fp8_dequantize(q, sd[prefix + "weight_scale_"], fmt, 0 if self._per_channel else None)
        else:
            scales = sd.pop(prefix + "weight_block_scales")
            k = shape.numel() // shape[0]
            codes = unpack_fp4(q, k) if self.wargs.bits == 4 else q
            w = (nvfp4_dequantize(codes, scales, sd[prefix + "weight_tensor_scale_"]) if fmt == "nvfp4"
                 else mx_dequantize(codes, scales, fmt))
        sd[key] = w.reshape(shape).to(self.weight.dtype)

    def extra_repr(self) -> str:
        act = self.aargs.describe() if self.aargs is not None else "float activations"
        return f"{super().extra_repr()}, {self.wargs.describe()}, {act}"


class FloatQuantLinear(FloatQuantMixin, nn.Linear):
    def _layer(self, x, w, b):
        return F.linear(x, w, b)


class FloatQuantConv1d(FloatQuantMixin, nn.Conv1d):
    def _layer(self, x, w, b):
        return self._conv_forward(x, w, b)


class FloatQuantConv2d(FloatQuantMixin, nn.Conv2d):
    def _layer(self, x, w, b):
        return self._conv_forward(x, w, b)


FLOAT_MODULE_MAP: dict[type, type] = {nn.Linear: FloatQuantLinear, nn.Conv1d: FloatQuantConv1d,
                                      nn.Conv2d: FloatQuantConv2d}


def convert_float_(module: nn.Module, wargs: QuantArgs, aargs: QuantArgs | None = None) -> FloatQuantMixin:
    """Turn a plain ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` into its float-format class, in place;
    weight scales come from its current weight, ``input_scale_`` starts at 1 (calibrate or load it)."""
    cls = FLOAT_MODULE_MAP.get(type(module))
    if cls is None:
        raise TypeError(f"cannot float-quantize a {type(module).__name__}; supported: "
                        f"{', '.join(c.__name__ for c in FLOAT_MODULE_MAP)}")
    float_class = type(module)
    swap_class(module, cls)
    module._float_class = float_class
    try:
        module._setup_float(wargs, aargs)
    except BaseException:
        module.revert_()
        raise
    return module

