"""Dynamic int8 Linear: int8 weights, activations quantized at run time (``DynamicQuantizeLinear``).

A plain ``nn.Linear`` is converted in place (class swapped; ``weight``/``bias`` keys kept) and
gains ``weight_scale_`` (N,) and ``weight_zero_point_`` (N,) int32 buffers. Weights are
per-output-channel, either

- ``signed=True``: symmetric int8 codes (zero point 0), ``bits`` 8 or 7 (7 = reduced range: on
  x86 CPUs without VNNI ONNX Runtime's u8s8 kernels saturate int16 pair sums with 8-bit weights);
- ``signed=False``: asymmetric uint8 codes with a per-channel zero point (ORT's u8u8 kernels
  accumulate in int32 and never saturate, at full 8-bit resolution).

Eval forward computes exactly what ONNX Runtime computes (:func:`nnsqueeze.ops.dynamic.int_linear`);
export writes ``DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul -> Add``, the pattern ORT's
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

from ..ops.dynamic import int_linear
from ..ops.quant import dequantize, fake_quantize_ste, qparams, qrange, quantize, sqnr_db

Tensor = torch.Tensor


class _DynamicLinearFn(torch.autograd.Function):
    """Value: the ORT-exact computation; ONNX: the standard dynamic-quantization pattern."""

    @staticmethod
    def forward(ctx, x, w_codes_t, w_scale, w_zp, bias):  # noqa: D401
        return int_linear(x, w_codes_t.T, w_scale, w_zp, bias)

    @staticmethod
    def symbolic(g, x, w_codes_t, w_scale, w_zp, bias):
        xq, xs, xz = g.op("DynamicQuantizeLinear", x, outputs=3)
        acc = g.op("MatMulInteger", xq, w_codes_t, xz, w_zp)
        accf = g.op("Cast", acc, to_i=1)  # FLOAT
        scale = g.op("Mul", xs, w_scale)
        y = g.op("Mul", accf, scale)
        return g.op("Add", y, bias)


class DynamicQuantLinear(nn.Linear):
    """See the module docstring. Attributes ``bits``/``signed`` are set by :func:`convert_dynamic_`."""

    bits: int = 8
    signed: bool = True
    onnx_quantized = True  # tells the exporter to verify with quantized tolerances
    onnx_verify_mean = True  # ... on the mean difference (run-time ranges amplify float noise, see verify_onnx)

    def _setup(self, bits: int, signed: bool) -> None:
        qrange(bits, signed)
        self.bits, self.signed = int(bits), bool(signed)
        n, dev = self.weight.shape[0], self.weight.device
        self.register_buffer("weight_scale_", torch.ones(n, device=dev))
        self.register_buffer("weight_zero_point_", torch.zeros(n, dtype=torch.int32, device=dev))
        self.refresh_weight_qparams_()

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

    def weight_sqnr_db(self) -> float:
        return sqnr_db(self.weight.detach(), self.fake_quant_weight().detach())

    def forward(self, x: Tensor) -> Tensor:
        if self.training:  # straight-through fake quantization of weights only
            self.refresh_weight_qparams_()
            return F.linear(x, self.fake_quant_weight(), self.bias)
        bias = self.bias if self.bias is not None else torch.zeros(self.out_features, device=x.device)
        if torch.onnx.is_in_onnx_export():
            return self._export_forward(x, bias)
        codes = self.weight_codes()
        zp = None if self.signed else self.weight_zero_point_
        return int_linear(x, codes, self.weight_scale_, zp, bias).to(x.dtype)

    @torch.no_grad()
    def _export_forward(self, x: Tensor, bias: Tensor) -> Tensor:
        def const(t: Tensor) -> Tensor:  # numpy round trip: the tracer records a constant, not the maths
            return torch.from_numpy(t.detach().cpu().numpy().copy())

        dt = torch.int8 if self.signed else torch.uint8
        codes_t = const(self.weight_codes().T.contiguous().to(dt))
        return _DynamicLinearFn.apply(x, codes_t, const(self.weight_scale_), const(self.weight_zero_point_.to(dt)),
                                      const(bias.float()))

    # -- artifact packing (duck-typed by nnsqueeze.artifact) ---------------------------------
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
        return f"{super().extra_repr()}, w {kind} per-channel, a uint8 dynamic per-tensor"


def convert_dynamic_(module: nn.Linear, bits: int = 8, signed: bool = True) -> DynamicQuantLinear:
    """Turn a plain ``nn.Linear`` into a :class:`DynamicQuantLinear`, in place (same object)."""
    if type(module) is not nn.Linear:
        raise TypeError(f"dynamic quantization converts plain nn.Linear, not {type(module).__name__}")
    module.__class__ = DynamicQuantLinear
    module._setup(bits, signed)
    return module
