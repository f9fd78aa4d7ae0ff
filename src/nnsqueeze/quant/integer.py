"""The integer arithmetic of ONNX Runtime's QLinearConv / QGemm, reproduced in torch.

A fake-quant conv that ORT fuses into QLinearConv (int8 weights, 8-bit activations, quantized
output) is computed by ORT as ::

    acc  = sum((x_q - x_zp) * w_q) + bias_q                  # exact int32
    y_q  = round_half_even(clamp(float32(acc) * M, qmin - y_zp, qmax - y_zp)) + y_zp
    M    = float32(float32(x_scale * w_scale[c]) / y_scale)   # per output channel, float32

(``MlasRequantizeOutput``; the multiplier as in ORT's ``QLinearConv::ComputeOutputScale``). A float
simulation (dequantized conv, then ``round(y / y_scale)``) lands within a rounding error of the same
value, so on every output that sits near a rounding boundary the code can differ by one; in a deep
network (EfficientNet-Lite0: 50 quantized layers at 224x224) those flips accumulate to several
output steps. :func:`requantized_forward` computes ORT's integers exactly: the products on the codes
(exact in float32 while every partial sum stays below 2**24, else in float64), the int32 bias, the
float32 multiplier, then half-to-even rounding.

Only valid for what ORT runs on exact int32 accumulators: x86 with VNNI/AMX, ARM, and AVX2 with
7-bit weight codes or depthwise convs (``nnsqueeze.isa``; ``weights.reduce_range``).
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

_EXACT_F32 = float(1 << 24)  # integers up to 2**24 are exact in float32


def fit_clip_scale(scale: Tensor, zero_point: Tensor, qrange: tuple[int, int], top: float = 6.0) -> Tensor:
    """A range that starts at 0 and was meant to end at ``top`` (a saturating ReLU6), whose float32
    top code ``scale * (qmax - zp)`` lands a few ulps above ``top``: the scale nudged down until the
    top code is ``<= top``. ONNX Runtime then drops the Clip(0, 6) before the QuantizeLinear
    (ClipQuantFusion tolerates 1 float32 epsilon), so the conv fuses into QLinearConv; otherwise it
    would stay a float Conv. Input and output of the same tensor get the same scale (same rule)."""
    qmin, qmax = qrange
    if scale.dim() or int(zero_point) != qmin:
        return scale
    s = scale.float().clone()
    span = torch.tensor(float(qmax - qmin), dtype=torch.float32)
    limit = torch.tensor(top, dtype=torch.float32)
    for _ in range(8):  # a few ulps at most
        if not (limit < s * span <= limit * (1 + 1e-6)):
            break
        s = torch.nextafter(s, torch.zeros_like(s))
    return s


def requant_multiplier(x_scale: Tensor, w_scale: Tensor, y_scale: Tensor) -> Tensor:
    """ORT's per-channel output multiplier ``(x_scale * w_scale) / y_scale`` in float32, in its order."""
    return (x_scale.float() * w_scale.float()) / y_scale.float()


def integer_accumulate(layer, x_codes: Tensor, w_codes: Tensor, bias_codes: Tensor | None) -> Tensor:
    """``layer._layer`` on integer codes (input minus its zero point, weight codes), exactly, plus the
    int32 bias codes, as a float tensor holding integers: float32 when the largest possible partial
    sum, ``max|x| * sum|w|`` per output channel plus ``max|bias|``, is exact in float32 (any
    summation order), else float64."""
    w64 = w_codes.double()
    bound = float(x_codes.abs().max()) * float(w64.abs().reshape(w64.shape[0], -1).sum(1).max()) \
        if x_codes.numel() else 0.0
    if bias_codes is not None:
        bound += float(bias_codes.abs().max()) if bias_codes.numel() else 0.0
    # float32 when every partial sum, the bias included, is an exact integer there: the same values,
    # half the memory traffic on the large early activations
    dtype = torch.float32 if bound < _EXACT_F32 else torch.float64
    acc = layer._layer(x_codes.to(dtype), w64.to(dtype), None)
    if bias_codes is not None:
        shape = [1] * acc.dim()
        shape[1 if acc.dim() > 1 and not isinstance(layer, torch.nn.Linear) else -1] = -1
        acc = acc + bias_codes.to(dtype).reshape(shape)
    return acc


def requantize(acc: Tensor, multiplier: Tensor, zero_point: Tensor, qmin: int, qmax: int,
               channel_dim: int) -> Tensor:
    """``MlasRequantizeOutput``: float32(acc) * multiplier, clamped to the codes, rounded half to even,
    plus the zero point. Returns the codes as float32."""
    shape = [1] * acc.dim()
    shape[channel_dim] = -1
    m = multiplier.reshape(shape) if multiplier.dim() else multiplier
    z = float(zero_point)
    y = acc.float() * m  # int32 -> float32 conversion rounds to nearest even, like cvtepi32_ps
    y = torch.clamp(y, qmin - z, qmax - z)
    return torch.round(y) + z


def requantized_forward(layer, x: Tensor) -> Tensor:
    """The layer's eval forward as ORT's fused integer kernel computes it (see the module docstring):
    dequantized output values. ``layer`` is a calibrated fake-quant conv/linear with a quantized output."""
    from ..ops.quant import quantize

    qmin, qmax = layer.act_qrange
    xs, xz = layer.input_scale_, layer.input_zero_point_
    x_codes = quantize(x, xs, xz, qmin, qmax).float() - xz.float()
    w_codes = layer.weight_codes().float()
    b = layer.bias_codes()
    acc = integer_accumulate(layer, x_codes, w_codes, b)
    ys, yz = layer.output_scale_, layer.output_zero_point_
    mult = requant_multiplier(xs, layer.weight_scale_, ys)
    channel_dim = acc.dim() - 1 if isinstance(layer, torch.nn.Linear) else 1
    q = requantize(acc, mult, yz, qmin, qmax, channel_dim)
    if layer.act in ("relu", "relu6"):  # max(Q(y), zp) = Q(relu(y)): exact, Q is monotone
        q = torch.clamp(q, min=float(yz))
    if layer.act == "relu6":
        q = torch.clamp(q, max=float(torch.round(6.0 / ys.float()) + yz.float()))
    return (q - yz.float()) * ys.float()


def qlinear_add_codes(a: Tensor, b: Tensor, sa: Tensor, za: Tensor, sb: Tensor, zb: Tensor, sc: Tensor,
                      zc: Tensor, qmin: int, qmax: int) -> Tensor:
    """The output codes of ONNX Runtime's x86 ``QLinearAdd`` (MLAS's AVX2 kernel, which AVX-512 CPUs
    run too) for float inputs ``a``, ``b`` of the same shape, quantized per tensor (``s*``, ``z*``)::

        r_ac, r_bc = float32(sa / sc), float32(sb / sc)
        fixed = zc - fma(r_ac, za, r_bc * zb)                # float32 (the compiler contracts it)
        c = round_half_even(fma(a_q, r_ac, fma(b_q, r_bc, fixed)))   saturated to [qmin, qmax]

    A product of an 8-bit code and a float32 is exact in float64, so each fma is one float64 sum
    rounded once to float32. Checked element for element against ORT in
    ``tests/quant/test_integer_add.py``. Returns the codes as float32."""
    from ..ops.quant import quantize

    def fma(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
        return (x.double() * y.double() + z.double()).float()

    qa = quantize(a, sa, za, qmin, qmax).float()
    qb = quantize(b, sb, zb, qmin, qmax).float()
    rac, rbc = sa.float() / sc.float(), sb.float() / sc.float()
    fixed = zc.float() - fma(rac, za.float(), rbc * zb.float())
    return torch.clamp(torch.round(fma(qa, rac, fma(qb, rbc, fixed))), qmin, qmax)
