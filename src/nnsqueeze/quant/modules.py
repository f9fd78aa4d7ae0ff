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
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.lsq import lsq_fake_quantize, lsq_grad_scale
from ..ops.quant import (EPS, NF4_LEVELS, dequantize, fake_quantize_bias, fake_quantize_levels, fake_quantize_ste,
                         nearest_level, pow2_levels, qrange, quantize, quantize_bias, sqnr_db)
from ..ops.rtn import row_qparams
from .act_scheme import ActScheme, act_qdq_export
from .fold import bn_factor, bn_train_forward
from .lowbit_marker import lowbit_weight, stores_lowbit
from .packing import PackingMixin
from .protocol import Packable, QuantizedModule
from .rows import WeightRowsMixin
from .scheme import WeightScheme

Tensor = torch.Tensor

ACT_QMIN, ACT_QMAX = qrange(8, signed=False)  # default activations: asymmetric uint8 per tensor (ActScheme())


# qparam buffers a fake-quant layer may hold (revert_ drops them; qparams() returns those present)
QPARAM_BUFFERS = ("weight_scale_", "weight_zero_point_", "weight_levels_", "input_scale_", "input_zero_point_",
                  "output_scale_", "output_zero_point_")


class FakeQuantMixin(WeightRowsMixin, PackingMixin, QuantizedModule, Packable):
    """Shared state and maths of the fake-quant layers (mixed into nn.Linear / nn.Conv*d)."""

    onnx_quantized = True  # export hint (:mod:`nnsqueeze.quant.protocol`); fake-quant layers export as QDQ

    weight: nn.Parameter
    bias: nn.Parameter | None

    # Plain attributes set by convert_ (not state: the step's record carries them for rebuild).
    weight_bits: int = 8
    wscheme: WeightScheme = WeightScheme()
    ascheme: ActScheme = ActScheme()  # activation codes (input, and output when quantized)
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
        self.wscheme, self.weight_bits = scheme, scheme.bits
        self.act, self.quant_output = act, bool(quant_output)
        self._observers, self._export_cache, self._input_sum, self._input_mean = None, None, None, None
        self.weight_frozen = False
        dev = self.weight.device
        rows = self.weight_rows_count()
        self.register_buffer("weight_scale_", torch.ones(rows, device=dev))
        if scheme.levels == "uniform" and not scheme.symmetric:
            self.register_buffer("weight_zero_point_", torch.zeros(rows, dtype=torch.int32, device=dev))
        if scheme.levels != "uniform":
            k = 16 if scheme.levels == "nf4" else (1 << scheme.bits) - (scheme.levels == "pow2")
            init = pow2_levels(scheme.bits) if scheme.levels == "pow2" else (
                torch.tensor(NF4_LEVELS) if scheme.levels == "nf4" else torch.linspace(-1, 1, k))
            self.register_buffer("weight_levels_", init.to(dev))
        self.register_buffer("input_scale_", torch.ones((), device=dev))
        self.register_buffer("input_zero_point_", torch.zeros((), dtype=torch.int32, device=dev))
        if self.quant_output:
            self.register_buffer("output_scale_", torch.ones((), device=dev))
            self.register_buffer("output_zero_point_", torch.zeros((), dtype=torch.int32, device=dev))
        if scheme.levels == "kmeans":
            self.learn_levels_()
        self.refresh_weight_scale_()

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
        for a in ("weight_bits", "wscheme", "ascheme", "onnx_custom_opsets", "weight_frozen", "act", "quant_output",
                  "onnx_verify_mean", "_observers", "_export_cache", "_input_sum", "_input_mean"):
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

    def effective_weight(self) -> Tensor:
        """The float weight the codes approximate: the masked weight, times the folded BatchNorm
        factor ``gamma / sqrt(running_var + eps)`` when a BN is attached for QAT (``self.bn``)."""
        w = self.masked_weight()
        bn = self._modules.get("bn")
        if bn is None:
            return w
        f = bn_factor(bn)
        return w * f.reshape(-1, *([1] * (w.dim() - 1)))

    def effective_bias(self) -> Tensor | None:
        """The float bias: ``bias``, or with an attached BN ``(bias - mean) * f + beta``."""
        bn = self._modules.get("bn")
        if bn is None:
            return self.bias
        b = self.bias if self.bias is not None else torch.zeros_like(bn.running_mean)
        beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        return (b - bn.running_mean) * bn_factor(bn) + beta

    @torch.no_grad()
    def learn_levels_(self) -> None:
        """k-means levels (``2**bits``) of the absmax-normalized weight rows (``levels: kmeans``)."""
        from ..ops.kmeans import kmeans1d

        rows = self.weight_rows(self.effective_weight().detach().float())
        norm = rows / rows.abs().amax(1, keepdim=True).clamp(min=EPS)  # zero padding: absmax unchanged
        mask = self.weight_row_mask()
        if mask is not None:
            norm = norm[mask]  # real weights only
        centroids, _ = kmeans1d(norm, 1 << self.weight_bits, init="linear")
        lv = torch.full((1 << self.weight_bits,), float(centroids[-1]))  # pad (when fewer distinct values)
        lv[:centroids.numel()] = centroids
        self.weight_levels_.copy_(torch.sort(lv).values)

    @torch.no_grad()
    def refresh_weight_scale_(self, force: bool = False) -> None:
        """Weight scales (and zero points) from the current weights, per the scheme; a no-op once
        ``weight_frozen`` (learned scales or codes) unless ``force``."""
        if self.weight_frozen and not force:
            return
        sc = self.wscheme
        rows = self.weight_rows(self.effective_weight().detach().float())
        if sc.levels != "uniform":
            (scale,) = self.per_row(lambda r: (r.abs().amax(1),), rows)
            if sc.granularity == "per-tensor":
                scale = scale.amax().expand_as(scale)
            self.weight_scale_.copy_(scale.clamp(min=EPS))
            return
        if sc.granularity == "per-tensor":
            rows_for_range = rows.reshape(1, -1)
        else:
            rows_for_range = rows
        # clip: mse searches 20 ratios of the range down to 0.3 (nnsqueeze.ops.rtn.row_qparams)
        clip = {"clip_grid": 20, "clip_min": 0.3} if sc.clip == "mse" else {}

        def stats(r):
            return row_qparams(r, sc.bits, sc.symmetric, **clip)
        # per-group: a partial last group gets its own scale/zero point from its own values only
        scale, zp = stats(rows_for_range) if sc.granularity == "per-tensor" else self.per_row(stats, rows)
        self.weight_scale_.copy_(scale.expand(rows.shape[0]))
        if not sc.symmetric:
            self.weight_zero_point_.copy_(zp.expand(rows.shape[0]))

    def _weight_zp(self) -> Tensor:
        zp = self._buffers.get("weight_zero_point_")
        return zp if zp is not None else torch.zeros_like(self.weight_scale_, dtype=torch.int32)

    def fake_quant_weight(self) -> Tensor:
        w = self.effective_weight()
        rows = self.weight_rows(w)
        if self.wscheme.levels != "uniform":
            return self.weight_from_rows(fake_quantize_levels(rows, self.weight_scale_, self.weight_levels_, axis=0))
        qmin, qmax = self.weight_qrange
        lsq = self._parameters.get("weight_step")
        if lsq is not None and self.training:  # padding outputs are dropped: no gradient to the step from them
            return self.weight_from_rows(lsq_fake_quantize(rows, lsq, self._weight_zp(), qmin, qmax, axis=0,
                                                           grad_scale=self._lsq_grad_scale()))
        return self.weight_from_rows(fake_quantize_ste(rows, self.weight_scale_, self._weight_zp(), qmin, qmax, axis=0))

    def weight_codes(self) -> Tensor:
        """Weight codes, shaped like the weight: int8 for symmetric grids, uint8 for asymmetric grids
        and level indices."""
        w = self.effective_weight().detach()
        rows = self.weight_rows(w)
        if self.wscheme.levels != "uniform":
            s = self.weight_scale_[:, None]
            return self.weight_from_rows(nearest_level(rows.float() / s, self.weight_levels_).to(torch.uint8))
        qmin, qmax = self.weight_qrange
        q = quantize(rows, self.weight_scale_, self._weight_zp(), qmin, qmax, axis=0)
        return self.weight_from_rows(q.to(torch.int8 if self.wscheme.symmetric else torch.uint8))

    @torch.no_grad()
    def set_weight_codes_(self, codes: Tensor) -> None:
        """Make the weight exactly ``dequantize(codes)`` (uniform grids; e.g. AdaRound's learned codes)
        and freeze the scales, so that nearest rounding reproduces ``codes``. No BN may be attached."""
        if self._modules.get("bn") is not None or self.wscheme.levels != "uniform":
            raise ValueError("set_weight_codes_ needs a uniform grid and no attached BatchNorm")
        if tuple(codes.shape) == tuple(self.weight.shape):
            codes = self.weight_rows(codes)  # codes given in the weight's shape -> (R, L) rows
        w = dequantize(codes.reshape(self.weight_scale_.shape[0], -1), self.weight_scale_, self._weight_zp(), axis=0)
        self.weight.copy_(self.weight_from_rows(w).to(self.weight.dtype))
        self.weight_frozen = True

    def weight_sqnr_db(self) -> float:
        w = self.effective_weight().detach()
        return sqnr_db(w, self.fake_quant_weight().detach())

    def quant_bias(self) -> Tensor | None:
        """The bias the simulation adds: int32 codes of scale ``input_scale_ * weight_scale_`` when
        ORT runs int8 kernels (what they add to the accumulator), else the float bias."""
        b = self.effective_bias()
        if b is None or not self.wscheme.int8_kernels:
            return b
        return fake_quantize_bias(b, self.input_scale_, self.weight_scale_)

    def bias_codes(self) -> Tensor | None:
        """int32 bias codes of scale ``input_scale_ * weight_scale_`` (what ORT adds), or None."""
        b = self.effective_bias()
        if b is None:
            return None
        return quantize_bias(b.detach(), self.input_scale_, self.weight_scale_)[0]

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
        return (self.quant_output and self.wscheme.int8_kernels and not stores_lowbit(self.wscheme)
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

    def _fq_folded(self, w_folded: Tensor) -> Tensor:
        """Fake-quantize an already BN-folded weight (QAT with an attached BN, batch statistics)."""
        rows = self.weight_rows(w_folded)
        qmin, qmax = self.weight_qrange
        if self.wscheme.levels != "uniform":
            return self.weight_from_rows(fake_quantize_levels(rows, self.weight_scale_, self.weight_levels_, axis=0))
        lsq = self._parameters.get("weight_step")
        if lsq is not None:
            return self.weight_from_rows(lsq_fake_quantize(rows, lsq, self._weight_zp(), qmin, qmax, axis=0,
                                                           grad_scale=self._lsq_grad_scale()))
        return self.weight_from_rows(fake_quantize_ste(rows, self.weight_scale_, self._weight_zp(), qmin, qmax, axis=0))

    def _lsq_grad_scale(self) -> float:
        """LSQ gradient scale from the real weights per step size (padding of partial groups excluded)."""
        return lsq_grad_scale(self.weight.numel(), self.weight_scale_.numel(), self.weight_qrange[1])

    def _export_forward(self, x: Tensor) -> Tensor:
        """Same numbers through torch's fake-quant ops, which the TorchScript ONNX exporter turns into
        QuantizeLinear/DequantizeLinear. Weight and bias are constants here; the exporter's
        post-processing stores the weight as int8 and the bias as int32 (see export/onnx.py).
        Schemes without int8 kernels (per-group, asymmetric, non-uniform levels) and 2..4-bit ones
        trace their quantized weight through a marker (quant/lowbit_marker.py) that export/lowbit.py
        turns into codes of the scheme's width (int4/uint4/int8/uint8) decoded in the graph."""
        cache = self._export_cache or self.export_constants()
        x = self._export_act(x, "input")
        if self.ascheme.bits > 8 and isinstance(self, nn.Linear) and x.dim() > 2:
            # 16-bit inputs run in float anyway; a DequantizeLinear'd weight feeding MatMul (a Linear
            # on 3-D inputs; 2-D ones export as Gemm) would be turned into MatMulNBits by ONNX Runtime,
            # which re-quantizes the input to 8 bits (measured: 1 output step off the simulation).
            # The grid values as a float constant are exact.
            w = cache["weight"]
        elif stores_lowbit(self.wscheme):
            w = lowbit_weight(self, cache["weight"], cache["group"])
        else:  # int8 kernels: Q/DQ that export/qdq.py folds into int8 codes
            zp = torch.zeros(self.weight.shape[0], dtype=torch.int32, device=self.weight.device)
            # Codes are within the (possibly narrower) weight range already; ONNX only knows int8.
            w = torch.fake_quantize_per_channel_affine(cache["weight"], self.weight_scale_, zp, 0, -128, 127)
        y = self._layer(x, w, cache["bias"])
        # A quantized output applies the ReLU itself (in the graph, or as a floor on the codes).
        return self._export_act(y, "output") if self.quant_output else self._act(y)

    def _export_act(self, x: Tensor, which: str) -> Tensor:
        """Activation Q/DQ for the exporter (``which="output"`` applies ``act`` first): uint8 through
        torch's op; other formats through :func:`~nnsqueeze.quant.act_scheme.act_qdq_export` (int8,
        Clip'd 8-bit container, int16). For 2..8-bit formats other than uint8 an absorbed ReLU
        becomes a floor at the zero point on the codes (exact: ``Q(relu(y)) = max(Q(y), zp)``), since
        ONNX Runtime only drops a ReLU before a QuantizeLinear whose zero point is the type minimum."""
        s, z = self._buffers[f"{which}_scale_"], self._buffers[f"{which}_zero_point_"]
        relu = which == "output" and self.act == "relu"
        if self.ascheme.is_default:
            return torch.fake_quantize_per_tensor_affine(self._act(x) if relu else x, s, z, ACT_QMIN, ACT_QMAX)
        if relu and self.ascheme.bits == 16:
            return act_qdq_export(self._act(x), s, z, self.ascheme)
        return act_qdq_export(x, s, z, self.ascheme, floor=int(z) if relu else None)

    @torch.no_grad()
    def export_constants(self) -> dict[str, Tensor | None]:
        """Quantized weight (BN folded, mask applied) and the simulated bias as plain tensors for tracing."""
        b = self.quant_bias()
        # The dequantized weight: on the grid and inside the code range even when the scale is
        # learned or clipped (the exporter's Q/DQ uses the full int8 range).
        w = self.fake_quant_weight()
        # per-group: the group length L as a plain int (shapes read while tracing would be graph values)
        group = self.weight_groups()[1] if self.wscheme.granularity == "per-group" else 0
        return {"weight": w.detach().clone(), "bias": None if b is None else b.detach().clone(), "group": group}

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
    module.__class__ = cls
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
