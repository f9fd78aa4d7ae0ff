"""Per-tensor activation qparams for the quantized ops between activations.

:class:`ActQuantState` holds named per-tensor qparams (``<name>_scale_``, ``<name>_zero_point_``)
calibrated by one observer each; the fx-inserted ``add``/``matmul`` quantizers
(:mod:`nnsqueeze.quant.functional`) and the Hugging Face attention quantizer
(:mod:`nnsqueeze.quant.attention`) both derive from it, so it sits below both. ::

    >>> import torch
    >>> from nnsqueeze.quant.observers import MinMaxObserver
    >>> class Two(ActQuantState):
    ...     def __init__(self):
    ...         super().__init__(); self._register_qparams(("a",))
    >>> m = Two()
    >>> m.start_calibration(MinMaxObserver, "demo")
    >>> m._observers["a"].observe(torch.tensor([0.0, 2.55]))
    >>> m.finish_calibration()
    >>> round(float(m.a_scale_), 6), int(m.a_zero_point_), op_kernels("add", m.ascheme)
    (0.01, 0, 'QLinearAdd')
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..ops.quant import fake_quantize_ste, qrange
from .act_scheme import ActScheme, act_qdq_export

Tensor = torch.Tensor

ACT_QMIN, ACT_QMAX = qrange(8, signed=False)


class ActQuantState(nn.Module):
    """Per-tensor qparams for named activations (``<name>_scale_``, ``<name>_zero_point_``) in the
    codes of :attr:`ascheme` (default uint8 asymmetric), calibrated by one observer each; shared by
    :class:`~nnsqueeze.quant.functional.OpQuant` and the attention quantizer."""

    ascheme: ActScheme = ActScheme()

    def _register_qparams(self, names: Iterable[str], scheme: ActScheme | None = None) -> None:
        self.ascheme = scheme or ActScheme()
        self._qnames = tuple(names)
        for n in self._qnames:
            self.register_buffer(f"{n}_scale_", torch.ones(()))
            self.register_buffer(f"{n}_zero_point_", torch.zeros((), dtype=torch.int32))
        self._observers: dict[str, Any] | None = None

    def start_calibration(self, make_observer: Callable[..., Any], name: str) -> None:
        self._observers = {n: make_observer(name=f"{name} {n}") for n in self._qnames}

    @property
    def calibrated_batches(self) -> int:
        return 0 if self._observers is None else self._observers[self._qnames[0]].count_

    @torch.no_grad()
    def finish_calibration(self) -> None:
        a = self.ascheme
        for n, obs in (self._observers or {}).items():
            s, z = obs.qparams(bits=a.bits, symmetric=a.symmetric)
            self._buffers[f"{n}_scale_"].copy_(s)
            self._buffers[f"{n}_zero_point_"].copy_(z)
        self._observers = None

    def _fq(self, x: Tensor, n: str) -> Tensor:
        s, z = self._buffers[f"{n}_scale_"], self._buffers[f"{n}_zero_point_"]
        if torch.onnx.is_in_onnx_export():  # exported as QuantizeLinear -> [Clip ->] DequantizeLinear
            if self.ascheme.is_default:
                return torch.fake_quantize_per_tensor_affine(x, s, z, ACT_QMIN, ACT_QMAX)
            return act_qdq_export(x, s, z, self.ascheme)
        qmin, qmax = self.ascheme.qrange
        return fake_quantize_ste(x, s, z, qmin, qmax).to(x.dtype)


def op_kernels(kind: str, scheme: ActScheme) -> str:
    """How ONNX Runtime runs an op quantized in ``scheme`` (for the report)."""
    if not scheme.int8_kernels:
        return f"float {'Add' if kind == 'add' else 'MatMul'} on exact 16-bit Q/DQ values (no 16-bit kernel)"
    return "QLinearAdd" if kind == "add" else "integer MatMul"
