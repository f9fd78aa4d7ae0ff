"""Fake-quant Linear / Conv1d / Conv2d: torch layers that compute exactly what ONNX Runtime's int8
kernels compute, and export to QDQ ONNX.

A float layer is converted *in place* (its class is swapped, so parameters, hooks and the
``<name>.weight`` / ``<name>.bias`` state-dict keys are kept) and gains buffers for its qparams:

- ``weight_scale_`` (C_out,): symmetric per-output-channel int8 weight scales (zero point 0);
- ``input_scale_`` (), ``input_zero_point_`` () int32: per-tensor input quantization, by default
  asymmetric uint8; ``act_scheme`` (:class:`~nnsqueeze.quant.act_scheme.ActScheme`) picks 2..8 or
  16 bits, signed (symmetric, zero point 0) or unsigned codes;
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

``pack_state`` / ``unpack_state`` (:mod:`nnsqueeze.quant.packing`) store the weight as its codes in a
state dict and restore it bit-exact, for ~4x smaller artifacts (8x at 4 bits); how the weight is cut
into rows that each get a scale is in :mod:`nnsqueeze.quant.rows`.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.lsq import lsq_fake_quantize
from ..ops.quant import EPS, fake_quantize_ste, qrange
from .act_scheme import ActScheme
from .args import QuantArgs
from .fakequant_calib import FakeQuantCalibrationMixin
from .fakequant_export import ACT_QMAX, ACT_QMIN, FakeQuantExportMixin
from .fold import bn_train_forward
from .lowbit_marker import stores_lowbit
from .packing import PackingMixin
from .protocol import Packable, QuantizedModule
from .rows import WeightRowsMixin
from .scheme import WeightScheme
from .swap import swap_class
from .fakequant_weight import FakeQuantWeightMixin

Tensor = torch.Tensor

__all__ = ["ACT_QMAX", "ACT_QMIN", "QPARAM_BUFFERS", "FakeQuantMixin", "MODULE_MAP", "QuantConv1d", "QuantConv2d",
           "QuantLinear", "convert_", "export_mode", "fake_quant_modules"]

# qparam buffers a fake-quant layer may hold (revert_ drops them; qparams() returns those present)
QPARAM_BUFFERS = ("weight_scale_", "weight_zero_point_", "weight_levels_", "input_scale_", "input_zero_point_",
                  "output_scale_", "output_zero_point_")


class FakeQuantMixin(FakeQuantWeightMixin, FakeQuantCalibrationMixin, FakeQuantExportMixin, WeightRowsMixin,
                     PackingMixin, QuantizedModule, Packable):
    """Shared state, setup, revert and forward of the fake-quant layers (mixed into nn.Linear /
    nn.Conv*d). The weight maths are in :mod:`~nnsqueeze.quant.fakequant_weight`, calibration in
    :mod:`~nnsqueeze.quant.fakequant_calib`, the ONNX trace in :mod:`~nnsqueeze.quant.fakequant_export`."""

    onnx_quantized = True  # export hint (:mod:`nnsqueeze.quant.protocol`); fake-quant layers export as QDQ

    weight: nn.Parameter
    bias: nn.Parameter | None

    # Plain attributes set by convert_ (not state: the step's record carries them for rebuild).
    weight_bits: int = 8
    wscheme: WeightScheme = WeightScheme()
    ascheme: ActScheme = ActScheme()  # activation codes (input, and output when quantized)
    _qargs: QuantArgs                # wscheme.args() and ascheme.args(None), set with them (qargs, act_qargs)
    _act_qargs: QuantArgs
    weight_frozen: bool = False      # True: weight scales/codes were set (AdaRound, LSQ), never re-derived
    act: str | None = None          # "relu" or None
    quant_output: bool = False
    _float_class: type | None = None
    _observers: tuple | None = None  # (input observer, output observer or None) while calibrating
    _input_sum: list | None = None   # [per-input-channel sum (float64), count] while calibrating
    _input_mean: Tensor | None = None
    _export_cache: dict | None = None

    # -- setup -------------------------------------------------------------------------------
    def _setup_quant(self, weight_bits: int, act: str | None, quant_output: bool,
                     scheme: WeightScheme | None = None, act_scheme: ActScheme | None = None) -> None:
        if act not in (None, "relu", "relu6"):
            raise ValueError(f"act must be None, 'relu' or 'relu6', got {act!r}")
        self.ascheme = act_scheme or ActScheme()
        if self.ascheme.bits == 16:  # exported as com.microsoft 16-bit QuantizeLinear/DequantizeLinear
            self.onnx_custom_opsets = {"com.microsoft": 1}
        scheme = scheme or WeightScheme(bits=weight_bits)
        qrange(scheme.bits, signed=True)  # validates bits
        self.wscheme, self.weight_bits, self._qargs = scheme, scheme.bits, scheme.args()
        self._act_qargs = self.ascheme.args(None)
        self.act, self.quant_output = act, bool(quant_output)
        self._observers, self._export_cache, self._input_sum, self._input_mean = None, None, None, None
        self.weight_frozen = False
        dev = self.weight.device
        rows = self.weight_rows_count()
        self.register_buffer("weight_scale_", torch.ones(rows, device=dev))
        args = scheme.args()
        if args.has_zero_point:
            self.register_buffer("weight_zero_point_", torch.zeros(rows, dtype=torch.int32, device=dev))
        levels = args.initial_levels()  # None: a uniform grid
        if levels is not None:
            self.register_buffer("weight_levels_", levels.to(dev))
        self.register_buffer("input_scale_", torch.ones((), device=dev))
        self.register_buffer("input_zero_point_", torch.zeros((), dtype=torch.int32, device=dev))
        if self.quant_output:
            self.register_buffer("output_scale_", torch.ones((), device=dev))
            self.register_buffer("output_zero_point_", torch.zeros((), dtype=torch.int32, device=dev))
        if args.learned_levels:
            self.learn_levels_()
        self.refresh_weight_scale_()

    @property
    def qargs(self) -> QuantArgs:
        """The weight's :class:`~nnsqueeze.quant.args.QuantArgs` (``wscheme.args()``, set with it by
        ``convert_``: the forward reads it several times a call)."""
        return self._qargs

    @property
    def act_qargs(self) -> QuantArgs:
        """The input's (and quantized output's) :class:`~nnsqueeze.quant.args.QuantArgs`: int, per
        tensor, static (the observer is the step's, kept in its record, not by the layer)."""
        return self._act_qargs

    @property
    def weight_qrange(self) -> tuple[int, int]:
        return qrange(self.weight_bits, signed=self.wscheme.symmetric)

    @property
    def act_qrange(self) -> tuple[int, int]:
        """Code range of the input (and quantized output): the layer's :class:`ActScheme`."""
        return self.ascheme.qrange

    @property
    def revertible(self) -> bool:  # type: ignore[override]
        """A fused activation (``act``) would be lost by going back to the float layer alone."""
        return self.act is None

    def qparams(self) -> dict[str, Tensor]:
        return {b: self._buffers[b] for b in QPARAM_BUFFERS if self._buffers.get(b) is not None}

    def dequantized_weight(self) -> Tensor:
        """The fake-quantized (BN-folded, masked) weight the layer computes with."""
        return self.fake_quant_weight()

    def revert_(self) -> nn.Module:
        """Back to the plain float layer (same object); qparam buffers are dropped."""
        for b in QPARAM_BUFFERS:
            self._buffers.pop(b, None)
        for a in ("weight_bits", "wscheme", "ascheme", "_qargs", "_act_qargs", "onnx_custom_opsets", "weight_frozen",
                  "act", "quant_output", "onnx_verify_mean", "_observers", "_export_cache", "_input_sum",
                  "_input_mean"):
            self.__dict__.pop(a, None)
        cls = self._float_class
        self.__dict__.pop("_float_class", None)
        swap_class(self, cls)
        return self

    # -- forward -----------------------------------------------------------------------------
    def _layer(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _act(self, y: Tensor) -> Tensor:
        if self.act == "relu6":
            return F.relu6(y)
        return F.relu(y) if self.act == "relu" else y

    def runs_integer(self) -> bool:
        """True when ONNX Runtime runs this layer as one fused integer kernel (QLinearConv/QGemm with a
        quantized output), whose requantization :mod:`nnsqueeze.quant.integer` reproduces exactly."""
        return (self.quant_output and self.qargs.int8_kernels and not stores_lowbit(self.qargs)
                and self.ascheme.bits <= 8 and self._modules.get("bn") is None)

    def _quant_act(self, x: Tensor, which: str) -> Tensor:
        """Fake-quantize an activation (``which``: "input" or "output"), with LSQ while training."""
        step = self._parameters.get(f"{which}_step")
        s, z = self._buffers[f"{which}_scale_"], self._buffers[f"{which}_zero_point_"]
        qmin, qmax = self.act_qrange
        if step is not None and self.training:
            with torch.no_grad():
                s.copy_(step.detach().abs().clamp(min=EPS))
            return lsq_fake_quantize(x, step, z, qmin, qmax)
        return fake_quantize_ste(x, s, z, qmin, qmax)

    def forward(self, x: Tensor) -> Tensor:
        if self._observers is not None:  # calibration: float model, record ranges
            obs_in, obs_out = self._observers
            obs_in.observe(x)
            self._observe_input_mean(x)
            y = self._act(self._layer(x, self.effective_weight(), self.effective_bias()))
            if obs_out is not None:
                obs_out.observe(y)
            return y
        if torch.onnx.is_in_onnx_export():
            return self._export_forward(x)
        if self.training:
            # Quantization-aware training: weights move, so their scales follow (unless learned).
            if self._parameters.get("weight_step") is not None:
                with torch.no_grad():
                    self.weight_scale_.copy_(self.weight_step.detach().abs().clamp(min=EPS))
            else:
                self.refresh_weight_scale_()
        if not self.training and self.runs_integer():
            from .integer import requantized_forward

            y = requantized_forward(self, x)
            if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
                # same values, the float simulation's straight-through gradients
                y_sim = self._float_sim(x)
                y = y_sim + (y - y_sim).detach()
            return y
        return self._float_sim(x)

    def _float_sim(self, x: Tensor) -> Tensor:
        """Fake-quant forward in float: dequantized codes through the float layer."""
        bn = self._modules.get("bn")
        x = self._quant_act(x, "input")
        if bn is not None and self.training and not getattr(self, "bn_frozen", False):
            y = bn_train_forward(lambda w, b: self._layer(x, w, b), self.masked_weight(), self.bias, bn,
                                 lambda w: self._fq_folded(w))
        else:
            y = self._layer(x, self.fake_quant_weight(), self.quant_bias())
        y = self._act(y)
        if self.quant_output:
            y = self._quant_act(y, "output")
        return y

    def extra_repr(self) -> str:
        parts = [super().extra_repr(), f"{self.wscheme.describe()}, {self.ascheme.describe()}"]
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
             quant_output: bool | None = None, scheme: WeightScheme | None = None,
             act_scheme: ActScheme | None = None) -> FakeQuantMixin:
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
    swap_class(module, cls)
    module._float_class = float_class
    module._setup_quant(weight_bits, act, quant_output, scheme, act_scheme)
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
