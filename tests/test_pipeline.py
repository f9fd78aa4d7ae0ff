"""End to end through the Python API on a model and data the package has never seen."""

import copy
import json

import pytest
import torch
from tiny_cnn import TinyCNN, make_data
from torch import nn

import nnsqueeze as nsq
from nnsqueeze.errors import DataError, ModelError, RecipeError, TargetError
from nnsqueeze.isa import describe

RECIPE = [
    {"prune": {"sparsity": 0.5, "scope": "global", "schedule": "oneshot"}},
    {"finetune": {"steps": 12, "lr": 1e-3}},
    {"quantize": {}},
]
FAST = {"evaluate": {"runs": 3, "warmup": 1}}


def _recipe(steps):
    return {"steps": steps, **FAST}


def test_compress_save_load_round_trip(tiny_cnn, toy_data, tmp_path):
    before = copy.deepcopy(tiny_cnn.state_dict())
    result = nsq.compress(tiny_cnn, _recipe(RECIPE), train_data=toy_data["train"], calib_data=toy_data["calib"],
                          eval_data=toy_data["eval"], progress=False)
    # The user's model is left untouched.
    assert all(torch.equal(before[k], v) for k, v in tiny_cnn.state_dict().items())
    r = result.report
    for side in ("baseline", "compressed"):
        for key in ("accuracy", "params", "nonzero_params", "size_bytes", "latency_ms"):
            assert key in r[side], (side, key)
        assert set(r[side]["latency_ms"]) == {"torch", "onnxruntime"}
    assert [s["name"] for s in r["steps"]] == ["prune", "finetune", "quantize"]
    assert r["environment"]["cpu"] and r["environment"]["threads"] == 2
    assert r["environment"]["isa"] == describe()  # the CPU kernel class reduce_range 'auto' assumed
    assert r["compressed"]["nonzero_params"] < 0.6 * r["baseline"]["nonzero_params"]
    assert r["compressed"]["size_bytes"] < r["baseline"]["size_bytes"]
    assert r["export"]["compressed"]["max_abs_diff"] >= 0
    assert any("sparsity" in v for v in r["layers"].values())
    assert any("bits" in v for v in r["layers"].values())

    out = result.save(tmp_path / "art")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["model.safetensors", "nnsqueeze.json", "recipe.yaml", "report.json", "report.md", "model.onnx"])
    isa = describe()
    assert json.loads((out / "nnsqueeze.json").read_text())["isa"] == isa
    assert f"- isa: arch={isa['arch']}, isa={isa['isa']}, u8s8_saturates={isa['u8s8_saturates']}" in \
        (out / "report.md").read_text()
    restored = nsq.load(out, model=TinyCNN())
    x = toy_data["eval"][0][0]
    assert torch.equal(restored(x), result.model.eval()(x))

    # The ONNX file written by export_onnx is the verified one, and runs in ONNX Runtime.
    from nnsqueeze.export.ort import OrtModule

    figs = nsq.export_onnx(result, tmp_path / "m.onnx")
    assert figs["size_bytes"] == (tmp_path / "m.onnx").stat().st_size
    ort_out = OrtModule(str(tmp_path / "m.onnx"))(x)
    assert (ort_out.argmax(-1) == result.model(x).argmax(-1)).float().mean() >= 0.95


def test_plain_model_export(tiny_cnn, tmp_path):
    x = torch.randn(3, 1, 37)
    figs = nsq.export_onnx(tiny_cnn, tmp_path / "fp32.onnx", example_inputs=x)
    assert figs["max_abs_diff"] < 1e-4
    with pytest.raises(nsq.ExportError, match="example inputs"):
        nsq.export_onnx(tiny_cnn, tmp_path / "x.onnx")


def test_custom_metric_callable(tiny_cnn, toy_data):
    calls = []

    def neg_loss(model, data):
        calls.append(1)
        return -sum(float(nn.functional.cross_entropy(model(x), y)) for x, y in data)

    result = nsq.compress(tiny_cnn, _recipe([{"quantize": {}}]), calib_data=toy_data["calib"],
                          eval_data=toy_data["eval"], metric=neg_loss, progress=False)
    assert result.report["baseline"]["accuracy"] < 0 and len(calls) >= 3


def test_a_new_step_plugs_in_without_touching_the_runner(tiny_cnn, toy_data):
    from nnsqueeze.registry import STEPS
    from nnsqueeze.steps.base import Step, StepConfig

    class HalveConfig(StepConfig):
        factor: float = 0.5

    @STEPS.register("test-halve")
    class Halve(Step):
        Config = HalveConfig
        default_targets = ["Linear"]

        def run(self, model, ctx):
            for name, layer in self.select(model, ctx, supported=(nn.Linear,)).layers:
                layer.weight.data *= self.config.factor
                ctx.report.layer(name, halved=True)
            return model

    try:
        result = nsq.compress(tiny_cnn, _recipe([{"test-halve": {"factor": 0.25}}]), calib_data=toy_data["calib"],
                              progress=False)
        w = result.model.classifier[1].weight
        assert torch.allclose(w, 0.25 * tiny_cnn.classifier[1].weight)
        assert result.report["layers"]["classifier.1"]["halved"] is True
    finally:
        STEPS._items.pop("test-halve")


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(recipe=[{"quantize": {}}], calib_data=[(torch.randn(4, 3, 37), torch.zeros(4))]), DataError,
     "fails on inputs of shape"),
    (dict(recipe=[{"quantize": {}}], calib_data=[]), DataError, "empty"),
    (dict(recipe=[{"finetune": {"steps": 2}}], calib_data=make_data(1)), DataError, "no train_data"),
    (dict(recipe=[{"prune": {"sparsity": 0.5, "schedule": "gradual"}}, {"quantize": {}}], calib_data=make_data(1)),
     RecipeError, "needs a training step"),
    (dict(recipe=[{"quantize": {"targets": ["Conv2d"]}}], calib_data=make_data(1)), TargetError, "Conv2d"),
    (dict(recipe=[{"quantize": {"targets": ["ReLU"]}}], calib_data=make_data(1)), TargetError, "no supported layer"),
])
def test_bad_input_is_typed_and_names_the_problem(tiny_cnn, kwargs, error, words):
    with pytest.raises(error, match=words):
        nsq.compress(tiny_cnn, kwargs.pop("recipe"), progress=False, **kwargs)


def test_non_finite_weights_are_a_model_error(tiny_cnn):
    with torch.no_grad():
        tiny_cnn.classifier[1].weight[0, 0] = float("nan")
    with pytest.raises(ModelError, match=r"classifier\.1\.weight.*NaN"):
        nsq.compress(tiny_cnn, [{"quantize": {}}], calib_data=make_data(1), progress=False)


def test_not_a_model():
    with pytest.raises(ModelError, match="torch.nn.Module"):
        nsq.compress("model.pt", "int8", calib_data=make_data(1))


def test_slower_or_larger_compressed_model_is_flagged():
    from nnsqueeze.pipeline import _flag_regressions
    from nnsqueeze.report import ReportBuilder

    rb = ReportBuilder()
    rb.baseline = {"latency_ms": {"onnxruntime": 1.0}, "size_bytes": 100, "measured": {"latency_batch": 8}}
    rb.compressed = {"latency_ms": {"onnxruntime": 2.0}, "size_bytes": 150}
    _flag_regressions(rb)
    notes = " ".join(n["note"] for n in rb.notes)
    assert "slower than the baseline" in notes and "2 ms vs 1 ms" in notes and "larger than the baseline" in notes
    rb2 = ReportBuilder()
    rb2.baseline, rb2.compressed = rb.compressed | {"measured": {"latency_batch": 8}}, rb.baseline
    _flag_regressions(rb2)
    assert rb2.notes == []


def test_baselines_are_measured_once_per_setting(tiny_cnn, toy_data):
    kw = dict(train_data=toy_data["train"], calib_data=toy_data["calib"], eval_data=toy_data["eval"], progress=False)
    recipe = {"steps": [{"prune": {"sparsity": 0.5}}], "evaluate": {"runs": 2, "warmup": 1}}
    cache: dict = {}
    first = nsq.compress(tiny_cnn, recipe, baselines=cache, **kw).report
    assert len(cache) == 1 and not any(n["step"] == "baseline" for n in first["notes"])
    second = nsq.compress(tiny_cnn, {**recipe, "steps": [{"prune": {"sparsity": 0.7}}]}, baselines=cache, **kw).report
    assert second["baseline"] == first["baseline"] and second["export"]["baseline"] == first["export"]["baseline"]
    assert any(n["step"] == "baseline" and "reused" in n["note"] for n in second["notes"])
    assert second["compressed"]["nonzero_params"] < first["compressed"]["nonzero_params"]  # measured anew
    other = nsq.compress(tiny_cnn, {**recipe, "evaluate": {"runs": 3, "warmup": 1}}, baselines=cache, **kw).report
    assert len(cache) == 2 and not any(n["step"] == "baseline" for n in other["notes"])  # other settings: measured
