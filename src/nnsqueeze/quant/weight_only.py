"""Weight-only quantized Linear (W8A16 / W4A16 group-wise), exported to ORT's ``MatMulNBits``.

Weights are stored as unsigned ``bits``-bit codes with one scale (and zero point) per group of
``group_size`` consecutive input elements of each output row (``group_size: -1``: one group per
row); activations stay float. The torch layer computes ``x @ dequant(W).T + b`` with exactly the
dequantized weight ORT uses, so the two agree to float rounding. A plain ``nn.Linear`` is
converted in place and gains ``weight_scale_`` (N, G) and ``weight_zero_point_`` (N, G) uint8.

Export (opset ``com.microsoft``): ``MatMulNBits(x, B, scales[, zero_points], K, N, bits,
block_size) -> Add(bias)``, where ``B`` is (N, blocks, block_size * bits / 8) uint8 with two 4-bit
codes per byte (low nibble first, :mod:`nnsqueeze.ops.int4`); the grid is
:mod:`nnsqueeze.ops.rtn`'s in its unsigned storage layout. ``block_size`` is the group size,
which ORT wants a power of two >= 16; the symmetric zero point (``2**(bits-1)``) is ORT's default
and is not stored. In the artifact, 4-bit codes are packed two per byte too::

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.quant.weight_only import convert_weight_only_
    >>> layer = convert_weight_only_(nn.Linear(300, 7), bits=4, group_size=128)
    >>> layer.weight_scale_.shape
    torch.Size([7, 3])
    >>> sd = layer.state_dict(); layer.pack_state(sd, ""); tuple(sd["weight"].shape), sd["weight"].dtype
    ((7, 150), torch.uint8)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.int4 import pack_int4, unpack_int4
from ..ops.rtn import QuantGrid, dequantize_groups, quantize_groups
from ..ops.quant import sqnr_db
from .args import QuantArgs, weight_only_args
from .protocol import Packable, QuantizedModule
from .swap import swap_class

Tensor = torch.Tensor


def weight_only_qparams(w: Tensor, bits: int, group_size: int, symmetric: bool,
                        full_range: bool = False) -> tuple[Tensor, Tensor]:
    """Scales (N, G) float32 and zero points (N, G) int32 of ``w`` (N, K) on this layer's grid:
    :class:`~nnsqueeze.ops.rtn.QuantGrid` in the unsigned (``MatMulNBits``) layout, a zero scale
    (all-zero group) stored as 1; ``full_range``: the symmetric grid over every code."""
    grid = QuantGrid(bits, None if group_size <= 0 else group_size, symmetric, unsigned=True, empty_scale=1.0,
                     full_range=full_range)
    return grid.qparams(w)


def codes_of(w: Tensor, scale: Tensor, zero_point: Tensor, bits: int, group_size: int) -> Tensor:
    """uint8 codes (N, K) of ``w`` (N, K) with group parameters (N, G) (unsigned layout)."""
    return quantize_groups(w, scale, zero_point, group_size, 0, (1 << bits) - 1).to(torch.uint8)


def _block_size(k: int, group_size: int) -> int:
    return max(16, 1 << (k - 1).bit_length()) if group_size <= 0 else group_size


def matmul_nbits_blob(codes: Tensor, bits: int, block: int) -> Tensor:
    """(N, K) uint8 codes -> (N, blocks, block * bits / 8) uint8, K padded with zero codes."""
    n, k = codes.shape
    blocks = -(-k // block)
    padded = F.pad(codes, (0, blocks * block - k)).reshape(n, blocks, block)
    return pack_int4(padded) if bits == 4 else padded


class _MatMulNBitsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, blob, scales, zps, bias, k, n, bits, block):
        return F.linear(x, w, bias)

    @staticmethod
    def symbolic(g, x, w, blob, scales, zps, bias, k, n, bits, block):
        from torch.onnx import symbolic_helper as sh

        k, n, bits, block = (sh._maybe_get_const(v, "i") for v in (k, n, bits, block))
        ins = [x, blob, scales] + ([] if zps is None or sh._is_none(zps) else [zps])
        y = g.op("com.microsoft::MatMulNBits", *ins, K_i=k, N_i=n, bits_i=bits, block_size_i=block)
        return g.op("Add", y, bias)


class WeightOnlyLinear(QuantizedModule, Packable, nn.Linear):
    """See the module docstring; attributes set by :func:`convert_weight_only_`."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    full_range: bool = False   # symmetric grid over every code (nnsqueeze.ops.rtn)
    onnx_custom_opsets = {"com.microsoft": 1}

    def _setup(self, bits: int, group_size: int, symmetric: bool, full_range: bool = False) -> None:
        if bits not in (4, 8):
            raise ValueError(f"weight-only bits must be 4 or 8 (ONNX Runtime MatMulNBits), got {bits}")
        if group_size > 0 and (group_size < 16 or group_size & (group_size - 1)):
            raise ValueError(f"group_size must be a power of two >= 16 or -1 (per row), got {group_size}")
        self.bits, self.group_size, self.symmetric = int(bits), int(group_size), bool(symmetric)
        if full_range:
            self.full_range = True   # an instance attribute only when set (the class default is False)
        n, k = self.weight.shape
        groups = 1 if group_size <= 0 else -(-k // group_size)
        dev = self.weight.device
        self.register_buffer("weight_scale_", torch.ones(n, groups, device=dev))
        self.register_buffer("weight_zero_point_", torch.zeros(n, groups, dtype=torch.uint8, device=dev))
        self.refresh_weight_qparams_()

    @property
    def qargs(self) -> QuantArgs:
        """int ``bits``, ``group(group_size)`` (channel: one group per row); activations stay float.
        Stored as unsigned codes (``MatMulNBits``' layout) whatever ``symmetric`` says."""
        return weight_only_args(self.bits, self.group_size, self.symmetric, self.full_range)

    @torch.no_grad()
    def refresh_weight_qparams_(self) -> None:
        s, z = weight_only_qparams(self.weight.detach(), self.bits, self.group_size, self.symmetric, self.full_range)
        self.weight_scale_.copy_(s)
        self.weight_zero_point_.copy_(z.to(torch.uint8))

    def weight_codes(self) -> Tensor:
        return codes_of(self.weight, self.weight_scale_, self.weight_zero_point_, self.bits, self.group_size)

    def dequantized_weight(self) -> Tensor:
        return dequantize_groups(self.weight_codes(), self.weight_scale_, self.weight_zero_point_,
                                 self.group_size).to(self.weight.dtype)

    def qparams(self) -> dict[str, Tensor]:
        return {"weight_scale_": self.weight_scale_, "weight_zero_point_": self.weight_zero_point_}

    def weight_sqnr_db(self) -> float:
        return sqnr_db(self.weight.detach(), self.dequantized_weight())

    def forward(self, x: Tensor) -> Tensor:
        if self.training:  # straight-through: value of the quantized weight, gradient to the float one
            w = self.weight + (self.dequantized_weight() - self.weight).detach()
            return F.linear(x, w, self.bias)
        if torch.onnx.is_in_onnx_export():
            return self._export_forward(x)
        return F.linear(x, self.dequantized_weight(), self.bias)

    @torch.no_grad()
    def _export_forward(self, x: Tensor) -> Tensor:
        """Constants computed outside the trace (numpy round trip), then one MatMulNBits node."""
        def const(t: Tensor) -> Tensor:
            return torch.from_numpy(t.detach().cpu().numpy().copy())

        w = self.dequantized_weight()
        n, k = self.out_features, self.in_features
        block = _block_size(k, self.group_size)
        blob = matmul_nbits_blob(self.weight_codes(), self.bits, block)
        zps = None
        if not self.symmetric:
            z = self.weight_zero_point_
            zps = (pack_int4(z) if self.bits == 4 else z).reshape(-1).clone()
        bias = self.bias if self.bias is not None else torch.zeros(n)
        consts = [const(t) for t in (w, blob, self.weight_scale_.reshape(-1), bias)]
        zps = None if zps is None else const(zps)
        return _MatMulNBitsFn.apply(x, consts[0], consts[1], consts[2], zps, consts[3], k, n, self.bits, block)

    # -- artifact packing --------------------------------------------------------------------
    def pack_state(self, sd: dict, prefix: str) -> None:
        key, zkey = prefix + "weight", prefix + "weight_zero_point_"
        w = sd.get(key)
        if w is not None and w.is_floating_point():
            q = codes_of(w, sd[prefix + "weight_scale_"], sd[zkey], self.bits, self.group_size)
            sd[key] = pack_int4(q) if self.bits == 4 else q
            if self.bits == 4:
                sd[zkey] = pack_int4(sd[zkey])

    def unpack_state(self, sd: dict, prefix: str) -> None:
        key, zkey = prefix + "weight", prefix + "weight_zero_point_"
        q = sd.get(key)
        if q is not None and q.dtype == torch.uint8:
            n, k = self.weight.shape
            if self.bits == 4:
                q = unpack_int4(q, k)
                sd[zkey] = unpack_int4(sd[zkey], self.weight_scale_.shape[1])
            sd[key] = dequantize_groups(q, sd[prefix + "weight_scale_"], sd[zkey],
                                        self.group_size).to(self.weight.dtype)

    def extra_repr(self) -> str:
        g = "per-row" if self.group_size <= 0 else f"g{self.group_size}"
        return f"{super().extra_repr()}, w{self.bits} {g} {'sym' if self.symmetric else 'asym'}, float activations"


def convert_weight_only_(module: nn.Linear, bits: int = 4, group_size: int = 128,
                         symmetric: bool = True, full_range: bool = False) -> WeightOnlyLinear:
    """Turn a plain ``nn.Linear`` into a :class:`WeightOnlyLinear`, in place (same object)."""
    if type(module) is not nn.Linear:
        raise TypeError(f"weight-only quantization converts plain nn.Linear, not {type(module).__name__}")
    swap_class(module, WeightOnlyLinear)
    module._setup(bits, group_size, symmetric, full_range)
    return module
