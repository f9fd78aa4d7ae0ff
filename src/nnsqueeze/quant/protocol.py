"""The declared interface of quantized layers: what export, the artifact and the latency guard may
ask of a module, as nominal types checked with ``isinstance`` instead of ``hasattr`` probes.

Four small ABCs, because the module families do not all have every part:

- :class:`ExportHints`: what the ONNX exporter reads (verify with quantized tolerances, on the mean
  difference, extra opset domains, bf16 constant storage, why ONNX Runtime cannot run the layer's
  form: ``onnx_unsupported``, which the exporter raises as ExportError). Declared class defaults;
  a family or an instance overrides them (``steps/quantize.py`` marks some fake-quant layers
  ``onnx_verify_mean``).
- :class:`Packable`: ``pack_state`` / ``unpack_state`` store a compact form of the module's tensors
  in the artifact's state dict (codes, entropy-coded blobs, tied tensors once) and restore it
  exactly; ``pack()`` / ``unpack(packed)`` do the same on the module's own state dict.
- :class:`QuantizedModule` (an :class:`ExportHints`): a layer whose weight is held in a reduced
  format: ``qargs`` (the weight's :class:`~nnsqueeze.quant.args.QuantArgs`), ``act_qargs`` (its
  input's, None: float), ``dequantized_weight()`` (the float weight it computes with), ``qparams()``
  (its quantization-parameter tensors by state-dict name), ``revertible`` and ``revert_()`` (back to
  the plain float layer, same object). Plots, sensitivity, reports and exporters read a layer's
  scheme from ``qargs`` / ``act_qargs`` only, never from family attributes (``bits``, ``signed``...).
- :class:`QuantizedOp` (an :class:`ExportHints`): an activation-op quantizer a parent module holds
  (attention matmuls, fx add/matmul); ``revert_in(owner, attr)`` takes it out so the op runs in float.

Families swap in by reassigning ``__class__``, so ``abstractmethod`` is never enforced by
instantiation; ``tests/quant/test_protocol.py`` checks that every family class leaves none abstract
(the float-format classes of :mod:`nnsqueeze.quant.floatq`: ``tests/steps/test_quantize_float.py``).
The bases use ``metaclass=ABCMeta``, not ``ABC``: ``ABC``'s empty ``__slots__`` would give the
families another object layout than the float layers, and ``__class__`` assignment refuses that.

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.quant.dynamic import convert_dynamic_
    >>> from nnsqueeze.quant.protocol import Packable, QuantizedModule
    >>> q = convert_dynamic_(nn.Linear(4, 3), bits=8)
    >>> isinstance(q, QuantizedModule), isinstance(q, Packable), q.revertible, sorted(q.qparams())
    (True, True, True, ['weight_scale_', 'weight_zero_point_'])
    >>> q.qargs.describe(), q.act_qargs.describe()
    ('int8 channel sym', 'int8 tensor asym dynamic')
    >>> packed = q.pack(); packed["weight"].dtype                   # the stored form: int8 codes
    torch.int8
    >>> r = convert_dynamic_(nn.Linear(4, 3), bits=8); r.unpack(packed)
    >>> torch.equal(r.dequantized_weight(), q.dequantized_weight())
    True
    >>> q.dequantized_weight().shape
    torch.Size([3, 4])
    >>> type(q.revert_()).__name__, isinstance(q, QuantizedModule)
    ('Linear', False)
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from types import MappingProxyType
from typing import TYPE_CHECKING, ClassVar, Mapping

import torch
from torch import nn

from ..errors import ModelError

if TYPE_CHECKING:
    from .args import QuantArgs


class ExportHints(metaclass=ABCMeta):  # noqa: B024 - a declared mixin of defaults, checked by isinstance
    """Declared export hints (read by :func:`nnsqueeze.export.onnx.export_onnx`); defaults: none."""

    #: verify the export with quantized tolerances (and run the QDQ post-processing)
    onnx_quantized: bool = False
    #: verify on the mean absolute difference instead of the max (run-time activation ranges)
    onnx_verify_mean: bool = False
    #: opset domains the export emits (e.g. ``{"com.microsoft": 1}``); never mutated in place
    onnx_custom_opsets: Mapping[str, int] = MappingProxyType({})
    #: store bf16-exact constants as bf16 (bf16 layers)
    onnx_bf16_storage: bool = False
    #: why ONNX Runtime cannot run this layer's form (the exporter raises ExportError with it); None: it can
    onnx_unsupported: str | None = None


class Packable(metaclass=ABCMeta):
    """Tensors stored compactly in the artifact (``nnsqueeze.artifact.pack_state`` calls these)."""

    @abstractmethod
    def pack_state(self, sd: dict[str, torch.Tensor], prefix: str) -> None:
        """Replace this module's entries of ``sd`` (keys ``prefix + name``) by their stored form."""

    @abstractmethod
    def unpack_state(self, sd: dict[str, torch.Tensor], prefix: str) -> None:
        """Turn the stored form back into the module's state-dict entries, exactly."""

    def pack(self) -> dict[str, torch.Tensor]:
        """This module's own state dict (no prefix) in its stored form (:meth:`pack_state`)."""
        sd = {k: v.detach().clone() for k, v in self.state_dict().items()}  # type: ignore[attr-defined]
        self.pack_state(sd, "")
        return sd

    def unpack(self, packed: Mapping[str, torch.Tensor]) -> None:
        """Load what :meth:`pack` gave (from a module of the same kind and shape), bit-exact."""
        sd = {k: v.clone() for k, v in packed.items()}
        self.unpack_state(sd, "")
        self.load_state_dict(sd, strict=True)  # type: ignore[attr-defined]


class QuantizedModule(ExportHints):
    """A layer whose weight is held in a reduced format (see the module docstring)."""

    #: ``revert_()`` gives the plain float layer computing the layer's float function on its own
    #: (no fused activation lost); the latency guard reverts only such layers
    revertible: ClassVar[bool] = False

    @property
    @abstractmethod
    def qargs(self) -> "QuantArgs | None":
        """The weight's scheme; None only where the weight is no QuantArgs scheme (a clustered
        layer's k-entry centroid table)."""

    @property
    def act_qargs(self) -> "QuantArgs | None":
        """How the layer's input is quantized (static or dynamic); None: activations stay float."""
        return None

    @abstractmethod
    def dequantized_weight(self) -> torch.Tensor:
        """The float weight the layer computes with, shaped like the float layer's weight."""

    @abstractmethod
    def qparams(self) -> dict[str, torch.Tensor]:
        """Quantization-parameter tensors by their state-dict name (empty: the dtype is the format)."""

    def revert_(self) -> nn.Module:
        """Back to the plain float layer, in place; families that cannot say ``revertible = False``."""
        raise ModelError(type(self).__name__, "this quantized layer cannot go back to float",
                         fix="check `revertible` before calling revert_()")


def layer_bits(module: QuantizedModule) -> dict[str, int | None]:
    """The report's per-layer ``bits`` / ``act_bits`` of a quantized layer, from its declared
    ``qargs`` / ``act_qargs`` (``act_bits`` None: float activations)."""
    w, a = module.qargs, module.act_qargs
    return {"bits": None if w is None else w.bits, "act_bits": None if a is None else a.bits}


class QuantizedOp(ExportHints):
    """An activation-op quantizer held by a parent module (``owner``) under the attribute ``attr``."""

    def revertible_in(self, owner: nn.Module) -> bool:
        """Whether :meth:`revert_in` can take this quantizer out of ``owner``."""
        return True

    @abstractmethod
    def revert_in(self, owner: nn.Module, attr: str) -> None:
        """Take this quantizer out of ``owner`` so that its op runs in float again."""
