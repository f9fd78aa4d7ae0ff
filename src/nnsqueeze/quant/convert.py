"""One ``convert(module, args)``: a float layer (or a quantized one, for its next form) becomes the
quantized layer that ``args`` describes, in place, through one registry.

The registry maps ``(module type, args kind)`` to a converter, the family's own function. The kind
comes from the weight :class:`~nnsqueeze.quant.args.QuantArgs` and, for int weights, from the
activation args ``aargs`` (:func:`args_kind`):

- ``int-static``: fake-quant ``QuantLinear`` / ``QuantConv1d`` / ``QuantConv2d``
  (:func:`~nnsqueeze.quant.modules.convert_`);
- ``int-dynamic``: ``DynamicQuantLinear`` (:func:`~nnsqueeze.quant.dynamic.convert_dynamic_`);
- ``int-weight-only`` (``aargs`` None): ``WeightOnlyLinear``
  (:func:`~nnsqueeze.quant.weight_only.convert_weight_only_`) and ``QuantEmbedding``
  (:func:`~nnsqueeze.quant.embedding.convert_embedding_`); a ``WeightOnlyLinear`` given its own
  args packs into ``PackedLinear`` (registered by :mod:`nnsqueeze.llm.packed`);
- ``float``: the FP8 / MX / NVFP4 ``FloatQuant*`` layers (:func:`~nnsqueeze.quant.floatq.convert_float_`);
- ``half``: ``HalfLinear`` / ``HalfConv*d`` / ``HalfEmbedding`` (:func:`~nnsqueeze.quant.half.convert_half_`).

A new format of an existing kind needs no edit here; a new family is one :func:`register` call.
Keyword ``options`` go to the converter (the fused ``act`` and ``quant_output`` of the fake-quant
layers, ``smooth`` / ``outliers`` of the dynamic ones). The clustered and shared layers
(:mod:`nnsqueeze.steps.cluster`, :mod:`nnsqueeze.steps.share`) are not here: a k-entry centroid
table with its own codes, and tied tensors, are not a :class:`QuantArgs` scheme. ::

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.quant.args import QuantArgs
    >>> from nnsqueeze.quant.convert import convert
    >>> w8, a8 = QuantArgs(), QuantArgs(symmetric=False, granularity="tensor", observer="minmax")
    >>> type(convert(nn.Linear(4, 3), w8, a8)).__name__, type(convert(nn.Linear(4, 3), w8)).__name__
    ('QuantLinear', 'WeightOnlyLinear')
    >>> type(convert(nn.Conv1d(2, 2, 3), QuantArgs(format="fp8-e4m3"))).__name__
    'FloatQuantConv1d'
    >>> convert(nn.LSTM(2, 2), w8)
    Traceback (most recent call last):
    ...
    nnsqueeze.errors.ModelError: convert LSTM: no converter for a LSTM with int8 channel sym weights ...
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..errors import ModelError
from .act_scheme import ActScheme
from .args import DYNAMIC_UINT8, QuantArgs, weight_only_args
from .dynamic import convert_dynamic_
from .embedding import convert_embedding_
from .floatq import FLOAT_MODULE_MAP, convert_float_
from .half import HALF_MAP, convert_half_
from .modules import MODULE_MAP, convert_
from .scheme import WeightScheme
from .weight_only import convert_weight_only_

Converter = Callable[..., nn.Module]  # (module, args, aargs, **options) -> the converted module
__all__ = ["CONVERTERS", "DYNAMIC_UINT8", "KINDS", "args_kind", "convert", "half_args", "register",
           "weight_only_args"]
KINDS = ("int-static", "int-dynamic", "int-weight-only", "float", "half")
CONVERTERS: dict[tuple[type, str], Converter] = {}
HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
_HALF_NAMES = {"float16": "fp16", "bfloat16": "bf16"}  # the half step's recipe and record spelling


def register(module_types: type | tuple[type, ...], kind: str) -> Callable[[Converter], Converter]:
    """Decorator: ``fn(module, args, aargs, **options)`` converts each of ``module_types`` (exact
    types, as class-name targets match) for args of ``kind``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    types = module_types if isinstance(module_types, tuple) else (module_types,)

    def deco(fn: Converter) -> Converter:
        for t in types:
            if (t, kind) in CONVERTERS:
                raise ValueError(f"a converter for ({t.__name__}, {kind}) is already registered")
            CONVERTERS[(t, kind)] = fn
        return fn
    return deco


def args_kind(args: QuantArgs, aargs: QuantArgs | None = None) -> str:
    """The registry kind of weight ``args`` with activation ``aargs`` (None: activations stay float)."""
    kind = args.info.kind
    if kind in ("float", "block"):
        return "float"
    if kind == "half":
        return "half"
    if aargs is None:
        return "int-weight-only"
    return "int-dynamic" if aargs.dynamic else "int-static"


def convert(module: nn.Module, args: QuantArgs, aargs: QuantArgs | None = None, **options: Any) -> nn.Module:
    """``module`` converted in place (same object) to the layer ``args`` (weights) and ``aargs``
    (activations; None: float) describe; returns it. A :class:`~nnsqueeze.errors.ModelError` names
    the pairs that exist when none is registered for ``(type(module), args_kind(args, aargs))``."""
    kind = args_kind(args, aargs)
    fn = CONVERTERS.get((type(module), kind))
    if fn is None:
        name = type(module).__name__
        have = sorted(t.__name__ for t, k in CONVERTERS if k == kind)
        raise ModelError(f"convert {name}", f"no converter for a {name} with {args.describe()} weights "
                         f"({kind}); {kind} converts {', '.join(have) or 'nothing yet'}",
                         fix="target a supported layer type, or register a converter (nnsqueeze.quant.convert)")
    return fn(module, args, aargs, **options)


def half_args(dtype: str) -> QuantArgs:
    """``fp16`` / ``bf16`` args of the half step's ``dtype`` ('float16' or 'bfloat16')."""
    return QuantArgs(format=_HALF_NAMES[dtype])


def _weight_only_group(args: QuantArgs) -> int:
    return args.group_size if args.granularity == "group" else -1  # -1: one group per row


@register(tuple(MODULE_MAP), "int-static")
def _fake_quant(module: nn.Module, args: QuantArgs, aargs: QuantArgs, *, act: str | None = None,
                quant_output: bool | None = None) -> nn.Module:
    scheme = WeightScheme.from_args(args)
    return convert_(module, weight_bits=scheme.bits, act=act, quant_output=quant_output, scheme=scheme,
                    act_scheme=ActScheme.from_args(aargs))


@register(nn.Linear, "int-dynamic")
def _dynamic(module: nn.Module, args: QuantArgs, aargs: QuantArgs, *, smooth: torch.Tensor | None = None,
             outliers: torch.Tensor | None = None) -> nn.Module:
    if aargs.bits != 8 or aargs.symmetric or aargs.granularity != "tensor":
        raise ValueError("dynamic activations are uint8 per tensor (ONNX DynamicQuantizeLinear), "
                         f"got {aargs.describe()}")
    return convert_dynamic_(module, bits=args.bits, signed=args.symmetric, smooth=smooth, outliers=outliers)


@register(nn.Linear, "int-weight-only")
def _weight_only(module: nn.Module, args: QuantArgs, aargs: None) -> nn.Module:
    return convert_weight_only_(module, args.bits, _weight_only_group(args), args.symmetric, args.full_range)


@register(nn.Embedding, "int-weight-only")
def _embedding(module: nn.Module, args: QuantArgs, aargs: None) -> nn.Module:
    if args != QuantArgs():
        raise ValueError(f"embeddings quantize to int8 per row, symmetric; got {args.describe()}")
    return convert_embedding_(module)


@register(tuple(FLOAT_MODULE_MAP), "float")
def _float(module: nn.Module, args: QuantArgs, aargs: QuantArgs | None) -> nn.Module:
    return convert_float_(module, args, aargs)


@register(tuple(HALF_MAP), "half")
def _half(module: nn.Module, args: QuantArgs, aargs: None) -> nn.Module:
    if aargs is not None:
        raise ValueError(f"{args.format} layers take no activation args (they compute in {args.format})")
    return convert_half_(module, HALF_DTYPES[args.format])
