"""Dynamic int8 Linear: int8 weights, activations quantized at run time (``DynamicQuantizeLinear``).

A plain ``nn.Linear`` is converted in place (class swapped; ``weight``/``bias`` keys kept) and
gains ``weight_scale_`` (N,) and ``weight_zero_point_`` (N,) int32 buffers. Weights are
per-output-channel, either

- ``signed=True``: symmetric int8 codes (zero point 0), ``bits`` 8 or 7 (7 = reduced range: on
  x86 CPUs without VNNI ONNX Runtime's u8s8 kernels saturate int16 pair sums with 8-bit weights);
- ``signed=False``: asymmetric uint8 codes with a per-channel zero point (ORT's u8u8 kernels
  accumulate in int32 and never saturate, at full 8-bit resolution).

Optionally the layer is *smoothed* (SmoothQuant's outlier migration, done inside the layer so it
stays exact for post-LayerNorm models such as BERT, whose normalised output also feeds a residual):
``y = (x * r) (W * s)^T`` with ``r = 1/s`` per input channel, stored as ``input_multiplier_`` (K,)
and the smoothed weight ``W * s``. The per-tensor run-time activation range then no longer spans
the few outlier channels. :func:`dynamic_fake_linear` is the float32 simulation used to choose ``s``.

Optionally a few *outlier input channels* (calibrated, e.g. BERT's one massive FFN channel, 15-25x
the median channel range) skip quantization altogether (LLM.int8()'s decomposition): their
multiplier is 0 on the int8 path and they go through a small float32 matmul instead,
``y = int8(x * r) + x[..., idx] @ W_o^T``, stored as ``outlier_index_`` (k,) int64 and
``outlier_weight_`` (N, k) float32 holding fp16-rounded values (stored as fp16 in ONNX); exported
as ``Gather -> MatMul -> Add``.

Eval forward computes exactly what ONNX Runtime computes (:func:`nnsqueeze.ops.dynamic.int_linear`);
export writes ``[Mul r ->] DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul -> Add``, the pattern ORT's
own dynamic quantizer writes and fuses into ``DynamicQuantizeMatMul``::

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.quant.dynamic import convert_dynamic_
    >>> layer = convert_dynamic_(nn.Linear(5, 3), bits=8)
    >>> y = layer(torch.randn(2, 5))
    >>> sd = layer.state_dict(); layer.pack_state(sd, ""); sd["weight"].dtype
    torch.int8
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.dynamic import dynamic_qparams, dynamic_quantize, int_linear
from ..ops.equalize import fold_scales
from ..ops.quant import dequantize, fake_quantize_ste, qparams, qrange, quantize, sqnr_db
from .args import DYNAMIC_UINT8, QuantArgs
from .protocol import Packable, QuantizedModule
from .swap import swap_class

Tensor = torch.Tensor


def dynamic_matmul_symbolic(g, a, b, b_scale=None, b_zero_point=None):
    """ONNX symbolic of ``a @ b`` with ``a`` quantized at run time (``DynamicQuantizeLinear``: uint8,
    per tensor): ``MatMulInteger -> Cast -> Mul(scale_a * scale_b)``, the pattern ONNX Runtime's own
    dynamic quantizer writes. ``b`` is quantized at run time the same way when ``b_scale`` is None
    (the attention matmuls, :mod:`nnsqueeze.quant.attention`); otherwise ``b`` already holds codes
    with ``b_scale`` / ``b_zero_point`` (a Linear's transposed (K, N) weight codes, per column)."""
    qa, sa, za = g.op("DynamicQuantizeLinear", a, outputs=3)
    if b_scale is None:
        b, b_scale, b_zero_point = g.op("DynamicQuantizeLinear", b, outputs=3)
    acc = g.op("MatMulInteger", qa, b, za, b_zero_point)
    accf = g.op("Cast", acc, to_i=1)  # FLOAT
    return g.op("Mul", accf, g.op("Mul", sa, b_scale))


class _DynamicLinearFn(torch.autograd.Function):
    """Value: the ORT-exact computation; ONNX: the standard dynamic-quantization pattern."""

    @staticmethod
    def forward(ctx, x, w_codes_t, w_scale, w_zp, bias):  # noqa: D401
        return int_linear(x, w_codes_t.T, w_scale, w_zp, bias)

    @staticmethod
    def symbolic(g, x, w_codes_t, w_scale, w_zp, bias):
        return g.op("Add", dynamic_matmul_symbolic(g, x, w_codes_t, w_scale, w_zp), bias)


class DynamicQuantLinear(QuantizedModule, Packable, nn.Linear):
    """See the module docstring. Attributes ``bits``/``signed`` are set by :func:`convert_dynamic_`."""

    bits: int = 8
    signed: bool = True
    revertible = True  # revert_() folds a smoothing back: the same float function
    onnx_quantized = True  # tells the exporter to verify with quantized tolerances
    onnx_verify_mean = True  # ... on the mean difference (run-time ranges amplify float noise, see verify_onnx)

    def _setup(self, bits: int, signed: bool, smooth: Tensor | None = None,
               outliers: Tensor | None = None) -> None:
        qrange(bits, signed)
        self.bits, self.signed = int(bits), bool(signed)
        n, k, dev = self.weight.shape[0], self.in_features, self.weight.device
        idx = None
        if outliers is not None:  # (k_out,) input channels kept out of the int8 path
            idx = torch.as_tensor(outliers, dtype=torch.int64, device=dev).reshape(-1)
            if idx.numel() == 0 or idx.numel() >= k or int(idx.min()) < 0 or int(idx.max()) >= k \
                    or idx.unique().numel() != idx.numel():
                raise ValueError(f"outliers must be 1..{k - 1} distinct input channels in [0, {k})")
        if smooth is not None:  # (K,) s > 0: weight columns * s, inputs * (1/s)
            s = smooth.detach().to(dev, torch.float64).reshape(-1)
            if s.numel() != k or not bool((s > 0).all()) or not bool(torch.isfinite(s).all()):
                raise ValueError(f"smooth must hold {k} positive finite scales")
        elif idx is not None:
            s = torch.ones(k, dtype=torch.float64, device=dev)
        self.register_buffer("weight_scale_", torch.ones(n, device=dev))
        self.register_buffer("weight_zero_point_", torch.zeros(n, dtype=torch.int32, device=dev))
        with torch.no_grad():
            if idx is not None:
                self.register_buffer("outlier_index_", idx)
                # fp16-rounded (ONNX stores them in half the bytes, exactly; relative change <= 2^-11)
                w_o = self.weight.detach()[:, idx].float()
                if bool(w_o.abs().max() < 60000):
                    w_o = w_o.half().float()
                self.register_buffer("outlier_weight_", w_o.clone())
                s = s.clone()
                s[idx] = 1.0
                self.weight[:, idx] = 0  # out of the int8 weights' per-row ranges
            if smooth is not None or idx is not None:
                # The layer is its own producer: a multiplier of ones becomes r = 1/s, the weight W * s.
                (r,), (w,) = fold_scales(s, [torch.ones(k, dtype=torch.float32, device=dev)], [self.weight])
                self.weight.copy_(w)
                if idx is not None:
                    r[idx] = 0.0
                self.register_buffer("input_multiplier_", r)
        self.refresh_weight_qparams_()

    def _outlier_part(self, x: Tensor) -> Tensor | None:
        """``x[..., idx] @ W_o^T`` (float32), or None without outlier channels."""
        idx = getattr(self, "outlier_index_", None)
        if idx is None:
            return None
        return x.index_select(-1, idx) @ self.outlier_weight_.to(x.dtype).T

    def _smoothed_input(self, x: Tensor) -> Tensor:
        r = getattr(self, "input_multiplier_", None)
        return x if r is None else x * r.to(x.dtype)

    @property
    def qargs(self) -> QuantArgs:
        """int ``bits`` per output channel, symmetric when ``signed``."""
        return QuantArgs(bits=self.bits, symmetric=self.signed)

    @property
    def act_qargs(self) -> QuantArgs:
        """uint8 per tensor, range taken at run time (ONNX DynamicQuantizeLinear)."""
        return DYNAMIC_UINT8

    @property
    def qmin_qmax(self) -> tuple[int, int]:
        return qrange(self.bits, self.signed)

    @torch.no_grad()
    def refresh_weight_qparams_(self) -> None:
        w = self.weight.detach().float()
        s, z = qparams(w.amin(1), w.amax(1), bits=self.bits, symmetric=self.signed)
        self.weight_scale_.copy_(s)
        self.weight_zero_point_.copy_(z)

    def weight_codes(self) -> Tensor:
        """(N, K) int32 codes."""
        return quantize(self.weight.detach(), self.weight_scale_, self.weight_zero_point_, *self.qmin_qmax, axis=0)

    def fake_quant_weight(self) -> Tensor:
        return fake_quantize_ste(self.weight, self.weight_scale_, self.weight_zero_point_, *self.qmin_qmax, axis=0)

    def dequantized_weight(self) -> Tensor:
        """(N, K) the weight the int8 path multiplies (smoothed ``W * s`` when smoothed; outlier columns 0)."""
        return dequantize(self.weight_codes(), self.weight_scale_, self.weight_zero_point_, axis=0)

    def qparams(self) -> dict[str, Tensor]:
        return {"weight_scale_": self.weight_scale_, "weight_zero_point_": self.weight_zero_point_}

    def weight_sqnr_db(self) -> float:
        return sqnr_db(self.weight.detach(), self.fake_quant_weight().detach())

    def forward(self, x: Tensor) -> Tensor:
        out = self._outlier_part(x)
        if self.training:  # straight-through fake quantization of weights only
            self.refresh_weight_qparams_()
            y = F.linear(self._smoothed_input(x), self.fake_quant_weight(), self.bias)
            return y if out is None else y + out
        bias = self.bias if self.bias is not None else torch.zeros(self.out_features, device=x.device)
        if torch.onnx.is_in_onnx_export():
            return self._export_forward(x, bias)
        xs = self._smoothed_input(x)  # float32 multiply: the same IEEE op as ONNX Mul
        codes = self.weight_codes()
        zp = None if self.signed else self.weight_zero_point_
        y = int_linear(xs, codes, self.weight_scale_, zp, bias).to(x.dtype)
        return y if out is None else y + out

    @torch.no_grad()
    def _export_forward(self, x: Tensor, bias: Tensor) -> Tensor:
        def const(t: Tensor) -> Tensor:  # numpy round trip: the tracer records a constant, not the maths
            return torch.from_numpy(t.detach().cpu().numpy().copy())

        r = getattr(self, "input_multiplier_", None)
        xs = x if r is None else x * const(r.to(x.dtype))
        dt = torch.int8 if self.signed else torch.uint8
        codes_t = const(self.weight_codes().T.contiguous().to(dt))
        y = _DynamicLinearFn.apply(xs, codes_t, const(self.weight_scale_), const(self.weight_zero_point_.to(dt)),
                                   const(bias.float()))
        idx = getattr(self, "outlier_index_", None)
        if idx is None:
            return y
        return y + x.index_select(-1, const(idx)) @ const(self.outlier_weight_.T.contiguous())

    @torch.no_grad()
    def revert_(self) -> nn.Linear:
        """Back to a plain float ``nn.Linear`` (same object) computing the same float function
        (a smoothing ``1/s`` is folded back into the weight columns); used by the latency guard."""
        r = self._buffers.pop("input_multiplier_", None)
        if r is not None:
            self.weight.copy_((self.weight.detach().double() * r.double()).to(self.weight.dtype))
        idx, w_o = self._buffers.pop("outlier_index_", None), self._buffers.pop("outlier_weight_", None)
        if idx is not None:
            self.weight[:, idx] = w_o.to(self.weight.dtype)
        for b in ("weight_scale_", "weight_zero_point_"):
            self._buffers.pop(b, None)
        for a in ("bits", "signed"):
            self.__dict__.pop(a, None)
        swap_class(self, nn.Linear)
        return self

    # -- artifact packing (Packable) ----------------------------------------------------------
    def pack_state(self, sd: dict, prefix: str) -> None:
        key = prefix + "weight"
        w = sd.get(key)
        if w is not None and w.is_floating_point():
            q = quantize(w, sd[prefix + "weight_scale_"], sd[prefix + "weight_zero_point_"], *self.qmin_qmax, axis=0)
            sd[key] = q.to(torch.int8 if self.signed else torch.uint8)

    def unpack_state(self, sd: dict, prefix: str) -> None:
        key = prefix + "weight"
        q = sd.get(key)
        if q is not None and q.dtype in (torch.int8, torch.uint8):
            sd[key] = dequantize(q, sd[prefix + "weight_scale_"], sd[prefix + "weight_zero_point_"],
                                 axis=0).to(self.weight.dtype)

    def extra_repr(self) -> str:
        kind = f"int{self.bits} sym" if self.signed else f"uint{self.bits} asym"
        sm = ", smoothed" if getattr(self, "input_multiplier_", None) is not None else ""
        idx = getattr(self, "outlier_index_", None)
        if idx is not None:
            sm += f", {idx.numel()} float outlier channel(s)"
        return f"{super().extra_repr()}, w {kind} per-channel, a uint8 dynamic per-tensor{sm}"


def convert_dynamic_(module: nn.Linear, bits: int | None = None, signed: bool = True,
                     smooth: Tensor | None = None, outliers: Tensor | None = None) -> DynamicQuantLinear:
    """Turn a plain ``nn.Linear`` into a :class:`DynamicQuantLinear`, in place (same object).

    ``bits=None``: 8, or 7 for signed codes where this CPU's ONNX Runtime u8s8 kernels saturate
    (:func:`nnsqueeze.isa.weight_range`), so the exported layer computes what the layer does.

    ``smooth``: optional (in_features,) positive scales ``s``; ``outliers``: optional input channel
    indices computed in float32 instead (see the module docstring). The layer's float function is
    unchanged, only what gets quantized moves.
    """
    if type(module) is not nn.Linear:
        raise TypeError(f"dynamic quantization converts plain nn.Linear, not {type(module).__name__}")
    if bits is None:
        from ..isa import weight_range

        bits = weight_range(8, "auto", u8s8=signed).bits
    w0 = module.weight.detach().clone()
    swap_class(module, DynamicQuantLinear)
    try:
        module._setup(bits, signed, smooth, outliers)
    except ValueError:
        swap_class(module, nn.Linear)
        with torch.no_grad():
            module.weight.copy_(w0)
        raise
    return module


def dynamic_fake_linear(x: Tensor, weight: Tensor, bias: Tensor | None, s: Tensor | None, bits: int = 8,
                        signed: bool = True, outliers: Tensor | None = None) -> Tensor:
    """Float32 fake-quantized dynamic int8 layer ``x -> x W^T + b`` smoothed by ``s`` (None: not
    smoothed), with ``outliers`` input channels (None: none) in float: the cheap simulation the
    smoothing search runs instead of the exact :func:`nnsqueeze.ops.dynamic.int_linear`.
    ``x`` (..., K), ``weight`` (N, K), ``s`` (K,), ``outliers`` (k,) int64."""
    x, w = x.detach().float(), weight.detach().float()
    x0, w0 = x, w
    if s is not None:
        x, w = x / s.float(), w * s.float()
    if outliers is not None:
        x, w = x.index_fill(-1, outliers, 0.0), w.index_fill(1, outliers, 0.0)
    xs, xz = dynamic_qparams(x)
    xq = (dynamic_quantize(x, xs, xz).float() - xz.float()) * xs
    qmin, qmax = qrange(bits, signed)
    ws, wz = qparams(w.amin(1), w.amax(1), bits=bits, symmetric=signed)
    wq = dequantize(quantize(w, ws, wz, qmin, qmax, axis=0), ws, wz, axis=0)
    y = F.linear(xq, wq, None if bias is None else bias.detach().float())
    if outliers is not None:
        y = y + x0.index_select(-1, outliers) @ w0[:, outliers].T
    return y
