"""QuantArgs: validation (each rule, with its message), the record round trip, and the conversion of
every older scheme type and every preset's schemes to the QuantArgs expected."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from nnsqueeze.errors import RecipeError
from nnsqueeze.ops.rtn import QuantGrid
from nnsqueeze.quant.act_scheme import ActScheme
from nnsqueeze.quant.args import FORMATS, QuantArgs
from nnsqueeze.quant.scheme import WeightScheme
from nnsqueeze.recipe import load_recipe
from nnsqueeze.sensitivity import ALL_FORMATS, format_args


def test_defaults_per_format():
    # (format) -> (bits, granularity, group_size, scale_dtype)
    want = {"int": (8, "channel", None, "fp32"), "fp8-e4m3": (8, "channel", None, "fp32"),
            "fp8-e5m2": (8, "channel", None, "fp32"), "mxfp8-e4m3": (8, "block", 32, "e8m0"),
            "mxfp8-e5m2": (8, "block", 32, "e8m0"), "mxfp6-e3m2": (6, "block", 32, "e8m0"),
            "mxfp6-e2m3": (6, "block", 32, "e8m0"), "mxfp4": (4, "block", 32, "e8m0"),
            "nvfp4": (4, "block", 16, "fp8-e4m3"), "fp16": (16, "tensor", None, None),
            "bf16": (16, "tensor", None, None)}
    assert set(want) == set(FORMATS)
    for fmt, (bits, gran, size, scale) in want.items():
        a = QuantArgs(format=fmt)
        assert (a.bits, a.granularity, a.group_size, a.scale_dtype) == (bits, gran, size, scale), fmt
        assert QuantArgs.from_dict(a.to_dict()) == a   # the record form gives the same args back


def test_granularity_spellings():
    assert QuantArgs(granularity="group(64)") == QuantArgs(granularity="group", group_size=64)
    assert QuantArgs(granularity="per-channel").granularity == "channel"   # the older spelling
    assert QuantArgs(granularity="per-group", group_size=7).granularity_text == "group(7)"
    assert QuantArgs(format="mxfp4", granularity="block(32)").group_size == 32
    assert QuantArgs(format="nvfp4").granularity_text == "block(16)"


@pytest.mark.parametrize("kwargs, message", [
    ({"format": "fp8-e4m3", "granularity": "group(32)"}, "fp8-e4m3 has no group or block size"),
    ({"format": "fp8-e5m2", "granularity": "block(32)"}, "no group or block size"),
    ({"format": "mxfp4", "granularity": "block(16)"}, "mxfp4 is block\\(32\\) by its spec"),
    ({"format": "mxfp4", "granularity": "channel"}, "mxfp4 is block\\(32\\)"),
    ({"format": "nvfp4", "group_size": 32}, "nvfp4 is block\\(16\\)"),
    ({"format": "nvfp4", "scale_dtype": "e8m0"}, "does not fit nvfp4: fp8-e4m3"),
    ({"format": "mxfp8-e4m3", "scale_dtype": "fp32"}, "does not fit mxfp8-e4m3: e8m0"),
    ({"format": "fp16", "scale_dtype": "fp32"}, "none \\(leave it out\\)"),
    ({"format": "fp8-e4m3", "bits": 4}, "fp8-e4m3 is 8-bit"),
    ({"format": "fp8-e4m3", "symmetric": False}, "symmetric only"),
    ({"format": "mxfp4", "levels": "nf4"}, "int format only"),
    ({"format": "fp8-e4m3", "clip": "mse"}, "int format only"),
    ({"format": "bf16", "granularity": "channel"}, "granularity tensor only"),
    ({"bits": 9}, "int bits must be 2..8 or 16"),
    ({"bits": 1}, "int bits must be 2..8 or 16"),
    ({"granularity": "group"}, "needs a size"),
    ({"granularity": "block(32)"}, "block granularity is for the MX/NVFP4"),
    ({"granularity": "group(64)", "group_size": 32}, "disagree"),
    ({"granularity": "channel", "group_size": 32}, "group_size is for group"),
    ({"granularity": "rows"}, "tensor, channel, group\\(n\\) or block\\(n\\)"),
    ({"bits": 3, "levels": "nf4"}, "nf4 is a 4-bit table"),
    ({"levels": "pow2", "clip": "mse"}, "uniform levels only"),
    ({"clip_grid": 10}, "need clip: mse"),
    ({"dynamic": True, "observer": "minmax"}, "no observer"),
])
def test_invalid_combinations(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        QuantArgs(**kwargs)


def test_unknown_key_and_format_are_refused():
    with pytest.raises(ValidationError, match="Extra inputs"):
        QuantArgs(group=128)
    with pytest.raises(ValidationError):
        QuantArgs(format="fp8")


def test_parse_raises_recipe_error_with_where_and_fix():
    with pytest.raises(RecipeError) as e:
        QuantArgs.parse({"format": "fp8-e4m3", "granularity": "group(32)"}, "steps[0].quantize.weights")
    assert e.value.where == "steps[0].quantize.weights"
    assert "no group or block size" in e.value.problem and "docs/formats.md" in e.value.fix
    assert QuantArgs.parse("mxfp4", "x") == QuantArgs(format="mxfp4")


def test_frozen_and_hashable():
    a = QuantArgs(format="fp8-e4m3")
    with pytest.raises(ValidationError):
        a.bits = 4
    assert len({a, QuantArgs(format="fp8-e4m3"), QuantArgs()}) == 2


def test_describe():
    assert QuantArgs().describe() == "int8 channel sym"
    assert QuantArgs(bits=4, granularity="group(128)", symmetric=False, scale_dtype="fp16").describe() == \
        "int4 group(128) asym fp16-scales"
    assert QuantArgs(bits=8, symmetric=False, granularity="tensor", dynamic=True).describe() == \
        "int8 tensor asym dynamic"
    assert QuantArgs(format="fp8-e5m2", granularity="tensor").describe() == "fp8-e5m2 tensor"


# -- conversions from the older scheme types ------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, {"bits": 4}, {"bits": 3, "symmetric": False, "granularity": "per-tensor"},
                                {"bits": 4, "granularity": "per-group", "group_size": 300},
                                {"bits": 4, "levels": "nf4"}, {"bits": 5, "levels": "kmeans"},
                                {"bits": 4, "levels": "pow2"}, {"bits": 2, "clip": "mse"}])
def test_weight_scheme_round_trip(kw):
    s = WeightScheme(**kw)
    a = s.args()
    assert (a.format, a.bits, a.symmetric, a.levels, a.clip) == ("int", s.bits, s.symmetric, s.levels, s.clip)
    assert f"per-{a.granularity}" == s.granularity and a.group_size == s.group_size
    assert WeightScheme.from_args(a) == s


def test_weight_scheme_refuses_what_it_cannot_hold():
    for a in (QuantArgs(format="fp8-e4m3"), QuantArgs(bits=16), QuantArgs(scale_dtype="fp16")):
        with pytest.raises(ValueError, match="has no WeightScheme"):
            WeightScheme.from_args(a)


@pytest.mark.parametrize("bits, sym", [(8, False), (8, True), (4, True), (16, False), (2, False)])
def test_act_scheme_round_trip(bits, sym):
    s = ActScheme(bits=bits, symmetric=sym)
    a = s.args("percentile")
    assert (a.bits, a.symmetric, a.granularity, a.observer, a.dynamic) == (bits, sym, "tensor", "percentile", False)
    assert ActScheme.from_args(a) == s
    with pytest.raises(ValueError, match="has no ActScheme"):
        ActScheme.from_args(QuantArgs(format="fp8-e4m3", granularity="tensor"))


def test_quant_grid():
    g = QuantGrid(bits=4, group_size=128, symmetric=False, scale_dtype="fp16", clip_grid=20, clip_min=0.6,
                  unsigned=True)
    assert QuantArgs.from_grid(g) == QuantArgs(bits=4, granularity="group(128)", symmetric=False,
                                               scale_dtype="fp16", clip="mse", clip_grid=20, clip_min=0.6)
    assert QuantArgs.from_grid(QuantGrid(bits=8, group_size=-1)) == QuantArgs(bits=8)


def test_sensitivity_formats():
    want = {"int8": "int8 channel sym", "int7": "int7 channel sym", "int2": "int2 channel sym",
            "int4-mse": "int4 channel sym mse-clip", "nf4": "int4 channel nf4", "pow2-4": "int4 channel pow2",
            "kmeans4": "int4 channel kmeans", "fp16": "fp16 tensor", "bf16": "bf16 tensor"}
    got = {n: format_args(n).describe() for n in ALL_FORMATS}
    assert {k: got[k] for k in want} == want
    assert all(got[f"int{b}"] == f"int{b} channel sym" for b in range(2, 9))
    assert format_args("fp32") is None
    with pytest.raises(RecipeError, match="unknown format"):
        format_args("int9")


# -- every preset's schemes ---------------------------------------------------------------------
_W8 = QuantArgs(bits=8)
_A8 = QuantArgs(bits=8, symmetric=False, granularity="tensor", observer="minmax")
PRESETS = {  # preset -> [(step, part, QuantArgs)]; part: weights / activations / args / activation_args
    "int8": [("quantize", "weights", _W8), ("quantize", "activations", _A8)],
    "int8-mobile": [("quantize", "weights", _W8), ("quantize", "activations", _A8)],
    "int8-residual": [("quantize", "weights", _W8), ("quantize", "activations", _A8)],
    "prune-int8": [("quantize", "weights", _W8), ("quantize", "activations", _A8)],
    "w4a8-adaround": [("quantize", "weights", QuantArgs(bits=4, clip="mse")), ("quantize", "activations", _A8)],
    "int4-qat": [("qat", "weights", QuantArgs(bits=4)), ("qat", "activations", _A8)],
    "int8-dynamic": [("quantize-dynamic", "weights", _W8),
                     ("quantize-dynamic", "activation_args",
                      QuantArgs(bits=8, symmetric=False, granularity="tensor", dynamic=True))],
    "int8-dynamic-smooth": [("quantize-dynamic", "weights", _W8)],
    "int8-dynamic-bert": [("quantize-dynamic", "weights", _W8)],
    "w4-g128": [("weight-only", "args", QuantArgs(bits=4, granularity="group(128)", symmetric=False))],
    "w8-weight-only": [("weight-only", "args", QuantArgs(bits=8, granularity="channel"))],
    "w4-g128-gptq": [("gptq", "args", QuantArgs(bits=4, granularity="group(128)"))],
    "w4-g128-quarot-gptq": [("gptq", "args", QuantArgs(bits=4, granularity="group(128)", clip="mse",
                                                       clip_grid=20, clip_min=0.5))],
    "fp16": [("half", "args", QuantArgs(format="fp16"))],
    "bf16": [("half", "args", QuantArgs(format="bf16"))],
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_schemes(preset):
    steps = {s.name: s.config for s in load_recipe(preset).steps}
    for step, part, want in PRESETS[preset]:
        cfg = steps[step]
        got = getattr(cfg, part)() if part.endswith("args") else getattr(cfg, part).args()
        assert got == want, (preset, step, part, got.describe())


def test_mixed_preset_formats():
    cfg = load_recipe("mixed-int4").steps[0].config
    assert [format_args(f) for f in cfg.formats] == [QuantArgs(bits=8), QuantArgs(bits=4), None]
