"""Float formats (FP8, MX, NVFP4) as candidates of the ``mixed`` allocator and of sensitivity: stored bytes
per format against the artifact and closed forms, the allocator choosing FP8 where the measured sensitivity
says so, reload, ONNX export of an int8 + fp8 allocation, and the recipe errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import nnsqueeze as nsq
from nnsqueeze.errors import RecipeError
from nnsqueeze.export.ort import OrtModule
from nnsqueeze.quant.floatq import FloatQuantMixin
from nnsqueeze.quant.modules import QuantLinear
from nnsqueeze.recipe import Recipe
from nnsqueeze.sensitivity import FLOAT_FORMATS, format_args, sensitivity
from nnsqueeze.steps.mixed_precision import MixedPrecision, format_bytes


def _outlier_net() -> nn.Module:
    """Layer 0 reads an input channel 1000x larger than the rest that barely reaches the output (the
    weights on it are 1e-3): a static int8 input scale spends its codes on it and zeroes the others,
    while FP8 keeps ~4 significant bits of every value. Layer 2 reads plain ReLU outputs, where int8's
    uniform grid is finer than FP8's."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5)).eval()
    with torch.no_grad():
        m[0].weight[:, 0] *= 1e-3
    return m


def _outlier_data(n: int = 2):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.randn(64, 12, generator=g)
        x[:, 0] = 1000 * torch.randn(64, generator=g)
        out.append((x, torch.randint(0, 5, (64,), generator=g)))
    return out


def _odd_net() -> nn.Module:
    torch.manual_seed(0)   # rows of 27, 75 and 7 inputs: no multiple of a 16 / 32 block
    return nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(75, 7), nn.ReLU(),
                         nn.Linear(7, 3)).eval()


def _odd_data():
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(4, 3, 7, 5, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(2)]


def _mixed(model, data, formats, budget=None, export=False):
    step = {"formats": formats} | ({"budget": budget} if budget else {})
    recipe = Recipe.from_dict({"steps": [{"mixed": step}], "export": {"onnx": {} if export else None}})
    return nsq.compress(model, recipe, calib_data=data, eval_data=data, progress=False)


@pytest.mark.parametrize("fmt", sorted(FLOAT_FORMATS))
def test_bytes_estimate_is_what_the_artifact_stores(tmp_path, fmt):
    result = _mixed(_odd_net(), _odd_data(), [fmt])
    assert set(result.records[0]["record"]["formats"].values()) == {fmt}
    result.save(tmp_path / "a")
    sd = load_file(tmp_path / "a" / "model.safetensors")
    fresh = _odd_net()
    for name in ("0", "3", "5"):
        stored = sum(t.numel() * t.element_size() for k, t in sd.items() if k.rsplit(".", 1)[0] == name)
        assert format_bytes(fresh.get_submodule(name), fmt) == stored, (name, fmt)
        assert result.report["layers"][name]["bytes_estimate"] == stored


@pytest.mark.parametrize("fmt, bits_per_weight, extra", [
    ("mxfp4", 4.25, 0), ("nvfp4", 4.5, 4), ("mxfp8-e4m3", 8.25, 0), ("fp8-e4m3-dynamic", 8, 4 * 24),
    ("fp8-e4m3", 8, 4 * 24 + 4)])
def test_bytes_per_weight_closed_form(fmt, bits_per_weight, extra):
    layer = nn.Linear(96, 24, bias=False)   # rows of 96: whole blocks of 16 and 32
    assert format_bytes(layer, fmt) == 24 * 96 * bits_per_weight / 8 + extra


def test_int_group_candidate_counts_one_scale_per_group():
    layer = nn.Linear(40, 6)   # 40 inputs: two groups of 32 per row, the second of 8
    assert format_bytes(layer, "int4-g32") == 6 * 20 + 4 * 6 * 2 + 4 * 6
    assert format_args("int4-g32").describe() == "int4 group(32) sym"


def test_sensitivity_measures_float_candidates():
    rows = sensitivity(_outlier_net(), _outlier_data(), formats=["int8", "fp8-e4m3", "mxfp4"])
    sqnr = {(r["layer"], r["format"]): r["sqnr_db"] for r in rows}
    assert set(sqnr) == {(n, f) for n in ("0", "2") for f in ("int8", "fp8-e4m3", "mxfp4")}
    assert sqnr[("0", "fp8-e4m3")] > sqnr[("0", "int8")] + 20     # the outlier channel: fp8 wins by far
    assert sqnr[("2", "int8")] > sqnr[("2", "fp8-e4m3")] + 6      # plain ReLU outputs: int8 is finer
    assert 20 < sqnr[("0", "fp8-e4m3")] < 40                       # ~4 significant bits of signal, not exact


@pytest.mark.parametrize("fp8", ["fp8-e4m3", "fp8-e4m3-dynamic"])
def test_allocator_picks_fp8_where_sensitivity_says_so(tmp_path, fp8):
    data = _outlier_data()
    # 0.45 of fp32 bytes: room for one byte per weight everywhere, not for fp32 anywhere
    result = _mixed(_outlier_net(), data, ["int8", fp8, "fp32"], {"size_ratio": 0.45})
    assert result.records[0]["record"]["formats"] == {"0": fp8, "2": "int8"}
    figs = result.report["steps"][0]["figures"]
    assert figs["budget_met"] and figs["size_ratio_estimate"] <= 0.45 and figs["allocator"] == "exact"
    model = result.model
    assert isinstance(model[0], FloatQuantMixin) and model[0].wargs == format_args(fp8)
    assert model[0].aargs.dynamic == fp8.endswith("dynamic")
    assert isinstance(model[2], QuantLinear) and not isinstance(model[2], FloatQuantMixin)
    result.save(tmp_path / "a")
    loaded = nsq.load(tmp_path / "a", model=_outlier_net())
    x = data[0][0]
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.ort_isa
def test_int8_and_fp8_allocation_exports_and_runs_in_ort(tmp_path):
    data = _outlier_data()
    result = _mixed(_outlier_net(), data, ["int8", "fp8-e4m3", "fp32"], {"size_ratio": 0.45}, export=True)
    figs = result.report["export"]["compressed"]   # verified against the simulation before it was written
    assert figs["diff_to_tolerance"] <= 1 and figs["opset"] == 19
    assert figs["fp8_tensors"] == {"weights": 1, "activations": 1}
    assert figs["ort_int8_ops"]
    path = tmp_path / "m.onnx"
    nsq.export_onnx(result, path)
    x = data[1][0]
    with torch.no_grad():
        want = result.model(x)
    got = OrtModule(path.read_bytes())(x)
    # the int8 layer's ORT kernels round its requantization their own way: allow 2% of the range
    assert float((got - want).abs().max()) <= 0.02 * float(want.abs().max())


def test_user_candidate_list_with_int4_groups_and_mxfp4():
    data = _outlier_data()
    formats = ["int8", "fp8-e4m3", "int4-g32", "mxfp4"]
    result = _mixed(_outlier_net(), data, formats, {"size_ratio": 0.45})
    rec = result.records[0]["record"]
    assert rec["formats"] == {"0": "fp8-e4m3", "2": "int8"}
    cands = result.report["layers"]["0"]["candidates"]
    assert set(cands) == set(formats) and cands["mxfp4"]["bytes"] < cands["int4-g32"]["bytes"] < cands["int8"]["bytes"]
    # a tighter budget moves the layers down to the 4-bit formats, still by measured noise
    tight = _mixed(_outlier_net(), data, formats, {"size_ratio": 0.26})
    assert tight.records[0]["record"]["formats"] == {"0": "mxfp4", "2": "int8"}


def test_block_candidates_refuse_onnx_export_before_the_run():
    with pytest.raises(RecipeError, match=r"\['mxfp4'\] are block formats.*no kernel") as e:
        _mixed(_outlier_net(), _outlier_data(), ["int8", "mxfp4"], export=True)
    assert "export: {onnx: null}" in e.value.fix


@pytest.mark.parametrize("formats, message", [
    (["int8", "fp8-e4m2"], r"unknown formats \['fp8-e4m2'\]"),
    (["fp8"], r"unknown formats \['fp8'\]"),
])
def test_unknown_candidates_are_recipe_errors(formats, message):
    with pytest.raises(RecipeError, match=message) as e:
        MixedPrecision(MixedPrecision.Config.model_validate({"formats": formats}))
    assert "fp8-e4m3" in e.value.fix and "mxfp4" in e.value.fix


def test_sensitivity_refuses_unknown_float_names():
    with pytest.raises(RecipeError, match="unknown format 'mxfp3'"):
        sensitivity(_outlier_net(), _outlier_data(), formats=["mxfp3"])
