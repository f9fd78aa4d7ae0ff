"""Activation quantization schemes of the fake-quant layers: bits and symmetry, and their ONNX form.

An :class:`ActScheme` says how a layer's input (and quantized output) become codes, per tensor:

- ``symmetric: false`` (default): unsigned codes ``[0, 2**bits - 1]`` with an integer zero point
  (uint8 for ``bits: 8``, the ONNX Runtime default);
- ``symmetric: true``: signed codes ``[-2**(bits-1), 2**(bits-1) - 1]``, zero point 0, scale
  ``absmax / (2**(bits-1) - 1)`` (int8 for ``bits: 8``);
- ``bits``: 2..8 or 16.

How the exported ONNX graph computes exactly the simulated codes (:func:`act_qdq_export`):

- 8 bits and 2..7 bits: uint8 QuantizeLinear/DequantizeLinear; signed codes are stored shifted by
  +128 (same values: ``(q + 128) - (z + 128) = q - z``), because ORT fuses its integer kernels
  (QLinearConv, QGemm, QLinearAdd, MatMulInteger) around uint8 Q/DQ pairs more often than around
  int8 ones; below 8 bits a ``Clip(codes, qmin, qmax)`` sits between Q and DQ, and the int8 kernels
  still run;
- 16 bits: ``com.microsoft`` QuantizeLinear/DequantizeLinear with an int16 zero point (the
  TorchScript exporter runs at opset 17, where the standard ops are 8-bit only); unsigned codes are
  stored shifted by -32768 in int16 (same values). ORT has no 16-bit conv/matmul kernels on CPU, so
  those layers compute in float on the exact dequantized 16-bit values (a Linear on 3-D inputs
  then stores its weight as float: ORT turns an int8-coded weight feeding MatMul into MatMulNBits,
  which would re-quantize the 16-bit input to 8 bits). ::

    >>> from nnsqueeze.quant.act_scheme import ActScheme
    >>> ActScheme(bits=4, symmetric=True).qrange, ActScheme().describe()
    ((-8, 7), 'a8 per-tensor asym')
    >>> ActScheme(bits=16).onnx_container()      # (ONNX dtype, code offset, Clip range)
    ('int16', -32768, None)
    >>> ActScheme(bits=4, symmetric=True).onnx_container()
    ('uint8', 128, (120, 135))
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..ops.quant import code_range, range_qparams
from .args import QuantArgs

Tensor = torch.Tensor

ACT_BITS = (2, 3, 4, 5, 6, 7, 8, 16)


def act_qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Code range of a ``bits``-bit activation (2..8 or 16), signed or unsigned."""
    if isinstance(bits, bool) or bits not in ACT_BITS:
        raise ValueError(f"activation bits must be one of 2..8 or 16, got {bits!r}")
    return code_range(bits, signed)


def act_qparams(min_val: Tensor, max_val: Tensor, bits: int = 8, symmetric: bool = False) -> tuple[Tensor, Tensor]:
    """:func:`nnsqueeze.ops.quant.qparams` on the code range of :func:`act_qrange` (16 bits included)."""
    return range_qparams(min_val, max_val, *act_qrange(bits, signed=symmetric), symmetric=symmetric)


@dataclass(frozen=True)
class ActScheme:
    bits: int = 8
    symmetric: bool = False

    def __post_init__(self) -> None:
        act_qrange(self.bits, bool(self.symmetric))  # validates bits
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be a bool, got {self.symmetric!r}")

    @property
    def qrange(self) -> tuple[int, int]:
        return act_qrange(self.bits, self.symmetric)

    @property
    def is_default(self) -> bool:
        """uint8 asymmetric: exported through torch's own fake-quant op, as before."""
        return self.bits == 8 and not self.symmetric

    @property
    def int8_kernels(self) -> bool:
        """Whether ORT can keep its 8-bit kernels (QLinearConv/QGemm) for this activation format."""
        return self.bits <= 8

    def describe(self) -> str:
        return f"a{self.bits} per-tensor {'sym' if self.symmetric else 'asym'}"

    def onnx_container(self, floor: int | None = None) -> tuple[str, int, tuple[int, int] | None]:
        """(ONNX code type, offset added to codes and zero point, container codes range of a Clip or
        None). ``floor``: a lowest code (an absorbed ReLU: the zero point), 2..8 bits only."""
        qmin, qmax = self.qrange
        if self.bits == 16:
            if floor is not None:
                raise ValueError("a code floor is for 2..8-bit containers")
            return "int16", (-32768 if qmin == 0 else 0), None
        lo = qmin if floor is None else max(qmin, int(floor))
        off = 128 if qmin < 0 else 0
        return "uint8", off, None if (lo + off, qmax + off) == (0, 255) else (lo + off, qmax + off)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def args(self, observer: str | None = "minmax") -> QuantArgs:
        """This format as :class:`~nnsqueeze.quant.args.QuantArgs`; ``observer``: the step's calibration
        method (one cached object per scheme and observer)."""
        return _args(self, observer)

    @classmethod
    def from_args(cls, a: QuantArgs) -> "ActScheme":
        """The format of int per-tensor static args (what the fake-quant layers take); ValueError for others."""
        if a.format != "int" or a.granularity != "tensor" or a.nonuniform or a.dynamic:
            raise ValueError(f"{a.describe()} has no ActScheme (int, uniform, per tensor, static)")
        return cls(bits=a.bits, symmetric=a.symmetric)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "ActScheme":
        return cls(**d) if d else cls()


@functools.lru_cache(maxsize=None)
def _args(scheme: ActScheme, observer: str | None) -> QuantArgs:
    return QuantArgs(bits=scheme.bits, symmetric=scheme.symmetric, granularity="tensor", observer=observer)


class _ActQDQ(torch.autograd.Function):
    """Fake quantization whose ONNX form is ``Q -> [Clip] -> DQ`` in the scheme's container (export only)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                container: str, offset: int, clip: tuple[int, int] | None) -> Tensor:
        s, z = scale.to(torch.float32), zero_point.to(torch.float32)
        lo, hi = (qmin, qmax) if clip is None else (clip[0] - offset, clip[1] - offset)
        return (torch.clamp(torch.round(x.to(torch.float32) / s) + z, lo, hi) - z) * s

    @staticmethod
    def symbolic(g, x, scale, zero_point, qmin, qmax, container, offset, clip):
        from onnx import TensorProto as TP

        onnx_t = {"int8": TP.INT8, "uint8": TP.UINT8, "int16": TP.INT16}[container]
        torch_t = {"int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16}[container]
        dom = "com.microsoft::" if container == "int16" else ""
        z = zero_point
        if offset:
            z = g.op("Add", g.op("Cast", z, to_i=TP.INT32),
                     g.op("Constant", value_t=torch.tensor(offset, dtype=torch.int32)))
        z = g.op("Cast", z, to_i=onnx_t)
        s = g.op("Cast", scale, to_i=TP.FLOAT)
        q = g.op(dom + "QuantizeLinear", x, s, z)
        if clip is not None:
            q = g.op("Clip", q, g.op("Constant", value_t=torch.tensor(clip[0], dtype=torch_t)),
                     g.op("Constant", value_t=torch.tensor(clip[1], dtype=torch_t)))
        out = g.op(dom + "DequantizeLinear", q, s, z)
        if dom:  # the exporter cannot infer a contrib op's output type: same as the input's
            out.setType(x.type())
        return out


def act_qdq_export(x: Tensor, scale: Tensor, zero_point: Tensor, scheme: ActScheme,
                   floor: int | None = None) -> Tensor:
    """Fake-quantize ``x`` for the ONNX exporter's trace in ``scheme``'s ONNX container (see module
    doc); ``floor``: lowest code kept (``max(Q(x), floor)``, an absorbed ReLU when it is the zero point)."""
    container, offset, clip = scheme.onnx_container(floor)
    qmin, qmax = scheme.qrange
    return _ActQDQ.apply(x, scale, zero_point, qmin, qmax, container, offset, clip)
