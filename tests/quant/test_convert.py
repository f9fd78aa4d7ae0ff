"""The one ``convert(module, args)`` dispatcher (nnsqueeze.quant.convert) and the one class swap
(nnsqueeze.quant.swap): each args kind installs its family, equal bit for bit to that family's own
function on a copy of the same layer (state dict and outputs), and the quantized weight matches a
float64 re-derivation of the grid; unsupported pairs are typed errors; a new family is one
registration."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import nnsqueeze
from nnsqueeze.errors import ModelError
from nnsqueeze.llm.packed import PackedLinear, pack_linear_
from nnsqueeze.quant import convert as cv
from nnsqueeze.quant.act_scheme import ActScheme
from nnsqueeze.quant.args import QuantArgs
from nnsqueeze.quant.dynamic import convert_dynamic_
from nnsqueeze.quant.embedding import convert_embedding_
from nnsqueeze.quant.floatq import convert_float_
from nnsqueeze.quant.half import convert_half_
from nnsqueeze.quant.modules import convert_
from nnsqueeze.quant.scheme import WeightScheme
from nnsqueeze.quant.weight_only import convert_weight_only_

A8 = QuantArgs(symmetric=False, granularity="tensor", observer="minmax")


def _same(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    assert type(a) is type(b)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))


def _layer(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return {"linear": nn.Linear(37, 5), "conv1d": nn.Conv1d(3, 7, 5), "conv2d": nn.Conv2d(3, 5, 3),
            "embedding": nn.Embedding(11, 6)}[kind]


INPUTS = {"linear": lambda: torch.randn(4, 37), "conv1d": lambda: torch.randn(2, 3, 13),
          "conv2d": lambda: torch.randn(2, 3, 9, 7), "embedding": lambda: torch.tensor([[0, 3, 10], [5, 5, 1]])}


CASES = [("linear", WeightScheme()), ("conv1d", WeightScheme()), ("conv2d", WeightScheme(bits=4, symmetric=False)),
         ("linear", WeightScheme(bits=3, granularity="per-group", group_size=8)),
         ("conv2d", WeightScheme(bits=5, granularity="per-tensor"))]


@pytest.mark.parametrize("kind,scheme", CASES, ids=[f"{k}-{s.describe()}" for k, s in CASES])
def test_int_static_is_the_fake_quant_family(kind, scheme):
    torch.manual_seed(1)
    x = INPUTS[kind]()
    ref = convert_(copy.deepcopy(_layer(kind)), weight_bits=scheme.bits, act="relu", scheme=scheme,
                   act_scheme=ActScheme(bits=8, symmetric=True))
    got = cv.convert(_layer(kind), scheme.args(), QuantArgs(granularity="tensor"), act="relu")
    _same(got, ref, x)
    if not scheme.symmetric:
        return  # the asymmetric grid's zero point rounding is tested in tests/ops; here: equal to the family
    # symmetric: the weight sits on round(w / s) * s, s = absmax / (2^(b-1) - 1) of its row, group (the
    # last group of a 37-wide row is 5 long, with its own scale) or the whole tensor; float64
    w = _layer(kind).weight.detach().double()
    flat, qmax = w.reshape(w.shape[0], -1), (1 << scheme.bits - 1) - 1

    def on_grid(g: torch.Tensor) -> torch.Tensor:
        s = g.abs().max() / qmax
        return (g / s).round() * s

    if scheme.granularity == "per-tensor":
        ref64 = on_grid(flat)
    else:
        size = scheme.group_size or flat.shape[1]
        ref64 = torch.stack([torch.cat([on_grid(g) for g in torch.split(r, size)]) for r in flat])
    assert torch.allclose(got.fake_quant_weight().detach().double(), ref64.reshape(w.shape), rtol=0, atol=1e-6)


def test_int_dynamic_and_weight_only_and_embedding():
    torch.manual_seed(2)
    x = torch.randn(3, 37)
    idx = torch.tensor([4, 30])
    ref = convert_dynamic_(copy.deepcopy(_layer("linear")), bits=7, signed=True, outliers=idx)
    got = cv.convert(_layer("linear"), QuantArgs(bits=7), cv.DYNAMIC_UINT8, outliers=idx)
    _same(got, ref, x)
    for g in (None, 16):
        ref = convert_weight_only_(copy.deepcopy(_layer("linear")), 4, -1 if g is None else g, False)
        got = cv.convert(_layer("linear"), cv.weight_only_args(4, g, False))
        _same(got, ref, x)
        a = cv.weight_only_args(4, g, False)
        _same(cv.convert(got, a), pack_linear_(ref), x)   # its own args again: the packed form
        assert isinstance(got, PackedLinear) and cv.convert(got, a) is got
        with pytest.raises(ValueError, match="holds int4 .* codes, not int8"):
            cv.convert(got, cv.weight_only_args(8, g, False))
    e = INPUTS["embedding"]()
    _same(cv.convert(_layer("embedding"), QuantArgs()), convert_embedding_(copy.deepcopy(_layer("embedding"))), e)
    with pytest.raises(ValueError, match="int8 per row"):
        cv.convert(_layer("embedding"), QuantArgs(bits=4))


@pytest.mark.parametrize("fmt", ["fp8-e4m3", "mxfp4", "nvfp4"])
def test_float_formats(fmt):
    torch.manual_seed(3)
    layer, x = nn.Linear(96, 5), torch.randn(3, 96)  # 96 inputs: whole MX (32) and NVFP4 (16) blocks
    aargs = QuantArgs(format="fp8-e4m3", granularity="tensor", observer="minmax") if fmt == "fp8-e4m3" else None
    wargs = QuantArgs(format=fmt)
    _same(cv.convert(copy.deepcopy(layer), wargs, aargs), convert_float_(copy.deepcopy(layer), wargs, aargs), x)


@pytest.mark.parametrize("dtype,fmt", [("float16", "fp16"), ("bfloat16", "bf16")])
@pytest.mark.parametrize("kind", ["linear", "conv2d", "embedding"])
def test_half(kind, dtype, fmt):
    ref = convert_half_(copy.deepcopy(_layer(kind)), getattr(torch, dtype))
    got = cv.convert(_layer(kind), cv.half_args(dtype))
    _same(got, ref, INPUTS[kind]())
    assert cv.half_args(dtype) == QuantArgs(format=fmt)
    assert torch.equal(got.weight.double(), _layer(kind).weight.detach().to(getattr(torch, dtype)).double())


def test_kinds():
    assert cv.args_kind(QuantArgs(), A8) == "int-static"
    assert cv.args_kind(QuantArgs(), cv.DYNAMIC_UINT8) == "int-dynamic"
    assert cv.args_kind(QuantArgs(bits=4)) == "int-weight-only"
    assert cv.args_kind(QuantArgs(format="fp8-e5m2")) == cv.args_kind(QuantArgs(format="mxfp6-e2m3")) == "float"
    assert cv.args_kind(QuantArgs(format="bf16")) == "half"


def test_unsupported_pairs_are_typed_errors():
    with pytest.raises(ModelError, match=r"convert Conv2d: no converter .*int-dynamic.*converts Linear") as e:
        cv.convert(nn.Conv2d(2, 2, 1), QuantArgs(), cv.DYNAMIC_UINT8)
    assert "register a converter" in str(e.value)
    with pytest.raises(ModelError, match="no converter for a Embedding with fp8-e4m3"):
        cv.convert(nn.Embedding(3, 2), QuantArgs(format="fp8-e4m3"))
    with pytest.raises(ValueError, match="kind must be one of"):
        cv.register(nn.Linear, "int-sparse")
    with pytest.raises(ValueError, match="already registered"):
        cv.register(nn.Linear, "half")(lambda m, a, aa: m)


def test_a_new_family_is_one_registration(monkeypatch):
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.tensor([0.26, -1.0, 0.5]))

    class QuantTiny(Tiny):
        pass

    monkeypatch.setattr(cv, "CONVERTERS", dict(cv.CONVERTERS))  # registration undone after the test

    @cv.register(Tiny, "int-weight-only")
    def _tiny(m, args, aargs):
        with torch.no_grad():  # round to the symmetric int grid, scale absmax / qmax
            s = m.weight.abs().max() / ((1 << args.bits - 1) - 1)
            m.weight.copy_((m.weight / s).round() * s)
        from nnsqueeze.quant.swap import swap_class
        return swap_class(m, QuantTiny)

    t = Tiny()
    got = cv.convert(t, QuantArgs(bits=3))
    assert got is t and type(got) is QuantTiny
    assert torch.allclose(got.weight.detach().double(), torch.tensor([1 / 3, -1.0, 2 / 3], dtype=torch.float64))


def test_the_class_swap_is_written_once():
    src = Path(nnsqueeze.__file__).parent
    sites = [str(p.relative_to(src)) for p in sorted(src.rglob("*.py"))
             if re.search(r"^\s*[\w.]+\.__class__\s*=", p.read_text(encoding="utf-8"), re.M)]
    assert sites == ["quant/swap.py"]
