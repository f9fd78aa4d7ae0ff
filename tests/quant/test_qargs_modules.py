"""Every quantized family declares its scheme as QuantArgs (``qargs`` / ``act_qargs``), the grid
properties of QuantArgs match closed forms, and ``pack()`` / ``unpack()`` round-trip bit-exact on
odd shapes (the reference: the source layer's own dequantized weight and output)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from nnsqueeze.errors import ModelError
from nnsqueeze.llm.packed import pack_linear_
from nnsqueeze.ops.quant import NF4_LEVELS
from nnsqueeze.quant.args import DYNAMIC_UINT8, QuantArgs
from nnsqueeze.quant.convert import convert
from nnsqueeze.quant.dynamic import convert_dynamic_
from nnsqueeze.quant.embedding import convert_embedding_
from nnsqueeze.quant.floatq import convert_float_
from nnsqueeze.quant.half import convert_half_
from nnsqueeze.quant.modules import convert_
from nnsqueeze.quant.protocol import QuantizedModule, layer_bits
from nnsqueeze.quant.scheme import WeightScheme
from nnsqueeze.quant.weight_only import convert_weight_only_
from nnsqueeze.sensitivity import FORMATS, quantize_weights
from nnsqueeze.steps import cluster, share
from nnsqueeze.steps.quantize_config import WeightsConfig, weight_scheme

SCHEMES = [WeightScheme(bits=8), WeightScheme(bits=3), WeightScheme(bits=4, symmetric=False),
           WeightScheme(bits=5, granularity="per-tensor"),
           WeightScheme(bits=4, granularity="per-group", group_size=16),
           WeightScheme(bits=6, symmetric=False, granularity="per-group", group_size=8),
           WeightScheme(bits=4, levels="nf4"), WeightScheme(bits=4, levels="pow2"),
           WeightScheme(bits=3, levels="kmeans"), WeightScheme(bits=6, levels="pow2")]


# -- the grid properties against closed forms ------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8, 16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_uniform_code_range_is_the_closed_form(bits, symmetric):
    a = QuantArgs(bits=bits, symmetric=symmetric)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2 ** bits - 1)
    assert (a.qmin, a.qmax) == (lo, hi)
    assert not a.nonuniform and a.level_count is None and a.initial_levels() is None
    assert a.has_zero_point == (not symmetric) and a.signed_codes == symmetric


@pytest.mark.parametrize("levels,bits", [("pow2", 3), ("pow2", 4), ("pow2", 6), ("nf4", 4), ("kmeans", 2),
                                         ("kmeans", 5)])
def test_level_tables_are_the_closed_forms(levels, bits):
    a = QuantArgs(bits=bits, levels=levels)
    lv = a.initial_levels().double()
    if levels == "pow2":   # 0 and +-2^-k, k = 0 .. 2^(bits-1) - 2
        mags = [2.0 ** -k for k in range(2 ** (bits - 1) - 1)]
        ref = torch.tensor(sorted([-m for m in mags] + [0.0] + mags), dtype=torch.float64)
    elif levels == "nf4":
        ref = torch.tensor(NF4_LEVELS, dtype=torch.float64)
    else:                  # k-means starts from 2^bits evenly spaced levels
        ref = torch.tensor([-1 + 2 * i / (2 ** bits - 1) for i in range(2 ** bits)], dtype=torch.float64)
    assert torch.allclose(lv, ref, rtol=0, atol=1e-7)
    assert a.nonuniform and a.level_count == ref.numel() and (a.qmin, a.qmax) == (0, ref.numel() - 1)
    assert not a.has_zero_point and not a.signed_codes and not a.int8_kernels
    assert a.learned_levels == (levels == "kmeans")


@pytest.mark.parametrize("sch", SCHEMES, ids=lambda s: s.describe())
def test_fake_quant_codes_lie_in_the_declared_range_on_odd_shapes(sch):
    torch.manual_seed(0)
    for layer in (nn.Linear(37, 5), nn.Conv1d(3, 7, 5), nn.Conv2d(2, 3, (3, 5))):
        q = convert_(layer, scheme=sch)
        a = q.qargs
        assert a == sch.args() and a.int8_kernels == sch.int8_kernels
        codes = q.weight_codes().to(torch.int64)
        assert a.qmin <= int(codes.min()) and int(codes.max()) <= a.qmax
        assert codes.dtype == torch.int64 and q.weight_codes().dtype == (torch.int8 if a.signed_codes else torch.uint8)


def test_sensitivity_formats_give_the_step_keys_they_replace():
    # the quantize step's weights keys of each int candidate, as the table held them before
    before = {"int8": {"bits": 8}, "int7": {"bits": 7}, "int4-mse": {"bits": 4, "clip": "mse"},
              "nf4": {"bits": 4, "levels": "nf4"}, "kmeans4": {"bits": 4, "levels": "kmeans"},
              "int4-g128": {"bits": 4, "granularity": "per-group", "group_size": 128}}
    for name, keys in before.items():
        assert quantize_weights(FORMATS[name]) == keys
    for name, a in FORMATS.items():   # and back through the recipe's own conversion
        assert weight_scheme(WeightsConfig(**quantize_weights(a))).args() == a, name
    with pytest.raises(ValueError, match="int format only"):
        quantize_weights(QuantArgs(format="fp8-e4m3"))


# -- every family declares its scheme ----------------------------------------------------------
# (kind, float layer factory, convert it to the family, expected qargs, expected act_qargs)
FAMILIES = [
    ("fake-quant", lambda: nn.Linear(13, 6), lambda m: convert_(m, scheme=WeightScheme(bits=4, levels="nf4")),
     QuantArgs(bits=4, levels="nf4"), QuantArgs(symmetric=False, granularity="tensor")),
    ("dynamic", lambda: nn.Linear(13, 6), lambda m: convert_dynamic_(m, bits=7, signed=False),
     QuantArgs(bits=7, symmetric=False), DYNAMIC_UINT8),
    ("weight-only", lambda: nn.Linear(40, 3), lambda m: convert_weight_only_(m, 4, 16, False),
     QuantArgs(bits=4, symmetric=False, granularity="group(16)"), None),
    ("packed", lambda: nn.Linear(40, 3), lambda m: pack_linear_(convert_weight_only_(m, 8, -1)),
     QuantArgs(bits=8), None),
    ("embedding", lambda: nn.Embedding(11, 5), convert_embedding_, QuantArgs(), None),
    ("half", lambda: nn.Conv1d(2, 3, 3), lambda m: convert_half_(m, torch.bfloat16), QuantArgs(format="bf16"), None),
    ("float", lambda: nn.Linear(64, 3),
     lambda m: convert_float_(m, QuantArgs(format="fp8-e5m2", granularity="tensor"),
                              QuantArgs(format="fp8-e5m2", granularity="tensor", dynamic=True)),
     QuantArgs(format="fp8-e5m2", granularity="tensor"), QuantArgs(format="fp8-e5m2", granularity="tensor",
                                                                   dynamic=True)),
]


@pytest.mark.parametrize("kind,make,to_family,want_w,want_a", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_every_family_declares_qargs_that_convert_back_to_it(kind, make, to_family, want_w, want_a):
    torch.manual_seed(1)
    m = to_family(make())
    assert isinstance(m, QuantizedModule)
    assert m.qargs == want_w and m.act_qargs == want_a
    assert layer_bits(m) == {"bits": want_w.bits, "act_bits": None if want_a is None else want_a.bits}
    # the dispatcher, given the declared args, builds the same kind of layer from a float one
    again = convert(make(), m.qargs, m.act_qargs)
    if kind == "packed":   # packing is the weight-only layer converted with its own args
        again = convert(again, m.qargs)
    assert type(again) is type(m) and again.qargs == m.qargs and again.act_qargs == m.act_qargs


def test_clustered_layers_have_no_qargs():
    m = nn.Linear(3, 2)
    cluster._convert(m, torch.tensor([0.5, -2.0]), torch.tensor([[0, 1, 2], [2, 1, 0]]))
    assert m.qargs is None and m.act_qargs is None and layer_bits(m) == {"bits": None, "act_bits": None}


# -- pack() / unpack() ----------------------------------------------------------------------
def _fake(layer, sch):
    return lambda: convert_(copy.deepcopy(layer), scheme=sch)


def _round_trip_cases():
    torch.manual_seed(2)
    lin, c1, c2 = nn.Linear(37, 5), nn.Conv1d(3, 7, 5), nn.Conv2d(2, 3, (3, 5))
    cases = [(f"fake {s.describe()} {type(b).__name__}", _fake(b, s), x)
             for s in SCHEMES for b, x in ((lin, torch.randn(4, 37)), (c1, torch.randn(2, 3, 11)),
                                            (c2, torch.randn(2, 2, 7, 9)))]
    wl = nn.Linear(300, 7)
    cases += [
        ("dynamic int8", lambda: convert_dynamic_(copy.deepcopy(lin), bits=8), torch.randn(4, 37)),
        ("dynamic uint7", lambda: convert_dynamic_(copy.deepcopy(lin), bits=7, signed=False), torch.randn(4, 37)),
        ("weight-only int4 g32", lambda: convert_weight_only_(copy.deepcopy(wl), 4, 32, True), torch.randn(3, 300)),
        ("weight-only int8 asym", lambda: convert_weight_only_(copy.deepcopy(wl), 8, -1, False), torch.randn(3, 300)),
        ("packed int4 g64", lambda: pack_linear_(convert_weight_only_(copy.deepcopy(wl), 4, 64, False)),
         torch.randn(3, 300)),
        ("embedding", lambda: convert_embedding_(nn.Embedding(13, 7).requires_grad_(False)),
         torch.tensor([[0, 12, 5], [3, 3, 1]])),
        ("fp8-e4m3", lambda: convert(copy.deepcopy(lin), QuantArgs(format="fp8-e4m3")), torch.randn(4, 37)),
        ("mxfp4", lambda: convert(copy.deepcopy(c1), QuantArgs(format="mxfp4")), torch.randn(2, 3, 11)),
        ("nvfp4", lambda: convert(copy.deepcopy(lin), QuantArgs(format="nvfp4")), torch.randn(4, 37)),
    ]
    return cases


CASES = _round_trip_cases()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_pack_unpack_round_trip_is_bit_exact_on_odd_shapes(case):
    _, make, x = case
    torch.manual_seed(3)
    src = make().eval()
    if hasattr(src, "start_calibration"):   # give the activation qparams real values
        from nnsqueeze.quant.observers import MinMaxObserver

        src.start_calibration(MinMaxObserver, "layer")
        src(x)
        src.finish_calibration()
    packed = src.pack()
    own = src.state_dict()
    stored = sum(v.numel() * v.element_size() for v in packed.values())
    assert stored <= sum(v.numel() * v.element_size() for v in own.values())
    torch.manual_seed(4)
    dst = make().eval()            # another layer of the same kind and shape (different weights)
    if hasattr(dst, "weight") and isinstance(dst.weight, nn.Parameter):
        with torch.no_grad():
            dst.weight.add_(1.0)
    dst.unpack(packed)
    assert torch.equal(dst.dequantized_weight(), src.dequantized_weight())
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))
    for k, v in dst.state_dict().items():   # nothing else changed on the way either
        assert torch.equal(v, own[k]) or k == "weight", k


def test_shared_layers_refuse_pack_of_a_lone_layer():
    lead, m = nn.Linear(4, 3), nn.Linear(4, 3)
    share._tie(lead, "lead", m, bias=False)
    with pytest.raises(ModelError, match="lead.weight"):
        m.pack()
    with pytest.raises(ModelError, match="pack the whole model"):
        m.unpack({})
