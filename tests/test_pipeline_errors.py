"""Hostile inputs to ``nsq.compress``: every user mistake is a typed error naming what, where (stage,
step, batch) and the fix, raised from the user's own exception; nothing silently wrong."""

import pytest
import torch
from torch import nn

import nnsqueeze as nsq
from nnsqueeze.errors import DataError, MetricError, ModelError, RecipeError
from nnsqueeze.pipeline import make_steps
from nnsqueeze.recipe import load_recipe, presets

FAST = {"evaluate": {"runs": 1, "warmup": 0, "per_step": False}, "export": {"onnx": None}}


def _recipe(*steps):
    return {"steps": list(steps), **FAST}


def _data(n=3, batch=8, features=6, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, features, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(n)]


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))


class Counting(nn.Module):
    """An MLP that counts its forwards (to prove nothing ran) and raises on a marked batch."""

    def __init__(self):
        super().__init__()
        self.net, self.calls = _mlp(), 0

    def forward(self, x):
        self.calls += 1
        if x[0, 0] == 99:
            raise KeyError("marked batch")
        return self.net(x)


# ---- the user's own exceptions, wrapped with where they happened ----------------------------------

def test_data_generator_that_raises_names_the_batch():
    def gen():
        yield from _data(2)
        raise ValueError("disk gone")

    with pytest.raises(DataError, match=r"calib_data batch 2.*ValueError: disk gone") as e:
        nsq.compress(_mlp(), _recipe({"quantize": {}}), calib_data=gen(), progress=False)
    assert isinstance(e.value.__cause__, ValueError)


class Flaky:
    """A re-iterable loader whose second batch fails to load."""

    def __iter__(self):
        yield _data(1)[0]
        raise OSError("corrupt record 17")


def test_loader_that_raises_inside_a_step_names_step_and_batch():
    with pytest.raises(DataError, match=r"steps\[0\]\.quantize: calib_data batch 1.*OSError: corrupt record 17") as e:
        nsq.compress(_mlp(), _recipe({"quantize": {}}), calib_data=Flaky(), eval_data=_data(1), progress=False)
    assert isinstance(e.value.__cause__, OSError)


def test_model_forward_that_raises_names_stage_and_batch():
    ev = _data(3)
    ev[2][0][0, 0] = 99
    with pytest.raises(ModelError, match=r"baseline: eval_data batch 2.*forward raised KeyError") as e:
        nsq.compress(Counting(), _recipe({"quantize": {}}), calib_data=_data(1), eval_data=ev, progress=False)
    assert isinstance(e.value.__cause__, KeyError)


def test_metric_that_raises_is_wrapped():
    def bad(model, data):
        raise ZeroDivisionError("no samples")

    with pytest.raises(MetricError, match=r"baseline: metric 'bad'.*ZeroDivisionError: no samples") as e:
        nsq.compress(_mlp(), _recipe({"quantize": {}}), calib_data=_data(1), eval_data=_data(1), metric=bad,
                     progress=False)
    assert isinstance(e.value.__cause__, ZeroDivisionError)


@pytest.mark.parametrize("value, words", [
    ("0.9", "returned str"), (None, "returned NoneType"), (torch.tensor([0.5, 0.7]), r"tensor of shape \(2,\)"),
    (float("nan"), "is nan"), (float("inf"), "is inf"),
])
def test_metric_value_must_be_a_finite_number(value, words):
    with pytest.raises(MetricError, match=words):
        nsq.compress(_mlp(), _recipe({"quantize": {}}), calib_data=_data(1), eval_data=_data(1),
                     metric=lambda m, d: value, progress=False)


def test_metric_number_types_are_accepted():
    res = nsq.compress(_mlp(), _recipe({"quantize": {}}), calib_data=_data(1), eval_data=_data(1),
                       metric=lambda m, d: torch.tensor(0.25), progress=False)
    assert res.report["baseline"]["accuracy"] == 0.25 and isinstance(res.report["baseline"]["accuracy"], float)


# ---- data ------------------------------------------------------------------------------------------

def test_calibration_batches_of_mismatched_shapes():
    calib = _data(2) + [(torch.randn(8, 5), torch.zeros(8, dtype=torch.long))]
    with pytest.raises(DataError, match=r"calib_data batch 2: inputs of shape \(8, 5\) differ from batch 0's "
                       r"\(8, 6\)") as e:
        nsq.compress(_mlp(), _recipe({"quantize": {}}), calib_data=calib, eval_data=_data(1), progress=False)
    assert isinstance(e.value.__cause__, RuntimeError)


def test_labels_out_of_range():
    ev = [(x, y + 1) for x, y in _data(2, classes=4)]  # 1-based labels 1..4 for a 4-output model
    ev[0][1][0] = 4
    with pytest.raises(DataError, match=r"eval_data batch 0: labels range over \[\d, 4\] but the model has 4 outputs"):
        nsq.compress(_mlp(), _recipe({"quantize": {}}), calib_data=_data(1), eval_data=ev, progress=False)


@pytest.mark.parametrize("which", ["calib_data", "eval_data", "train_data"])
def test_nan_inputs_are_refused_naming_data_and_batch(which):
    data = _data(3)
    data[1][0][2, 3] = float("nan")  # batch 1, so the first-batch probe alone would not see it
    kwargs = {"calib_data": _data(1), "eval_data": _data(1), "train_data": _data(1), which: data}
    model = Counting()
    with pytest.raises(DataError, match=rf"(?s){which} batch 1: inputs hold NaN values.*fix: clean or impute"):
        nsq.compress(model, _recipe({"finetune": {"steps": 1}}, {"quantize": {}}), progress=False, **kwargs)


def test_nan_inside_tuple_or_dict_inputs_is_located():
    x = torch.randn(8, 6)
    x[0, 0] = float("nan")
    with pytest.raises(DataError, match=r"calib_data batch 0: inputs\['x'\] hold NaN"):
        nsq.compress(_mlp(), _recipe({"quantize": {}}), calib_data=[{"x": x}], progress=False)
    with pytest.raises(DataError, match=r"calib_data batch 0: inputs\[1\] hold NaN"):
        nsq.compress(_mlp(), _recipe({"quantize": {}}), calib_data=[((torch.randn(8, 6), x), None)], progress=False)


def test_endless_generator_is_bounded(monkeypatch):
    monkeypatch.setattr("nnsqueeze.data.MAX_GENERATOR_BATCHES", 50)
    batch, pulled = _data(1)[0], []

    def endless():
        while True:
            pulled.append(1)
            yield batch

    with pytest.raises(DataError, match=r"(?s)calib_data: the data generator yielded more than 50 batches.*islice"):
        nsq.compress(_mlp(), _recipe({"quantize": {}}), calib_data=endless(), progress=False)
    assert len(pulled) == 51  # read one past the limit, then stopped
    gen = (b for b in _data(50))  # exactly at the limit: accepted
    nsq.compress(_mlp(), _recipe({"quantize": {}}), calib_data=gen, progress=False)


@pytest.mark.parametrize("data, words", [
    ({"x": torch.zeros(2)}, "got a dict"), ("batches.pt", "got a str"), ([[]], "empty batch tuple"),
    (iter([]), "empty"),
])
def test_data_of_the_wrong_kind(data, words):
    with pytest.raises(DataError, match=words):
        nsq.compress(_mlp(), _recipe({"quantize": {}}), calib_data=data, progress=False)


def test_callable_metric_without_eval_data():
    with pytest.raises(DataError, match="eval_data: metric 'mine' was given but no eval_data"):
        def mine(model, data):
            return 1.0
        nsq.compress(_mlp(), _recipe({"quantize": {}}), calib_data=_data(1), metric=mine, progress=False)


def test_default_metric_without_eval_data_is_noted():
    res = nsq.compress(_mlp(), _recipe({"quantize": {}}), calib_data=_data(1), progress=False)
    assert "accuracy" not in res.report["baseline"]
    assert any("no eval_data" in n["note"] for n in res.report["notes"])


# ---- models ----------------------------------------------------------------------------------------

def test_meta_device_model():
    with torch.device("meta"):
        model = _mlp()
    with pytest.raises(ModelError, match="(?s)meta device.*load real weights first"):
        nsq.compress(model, _recipe({"quantize": {}}), calib_data=_data(1), progress=False)


@pytest.mark.parametrize("jit", ["script", "trace"])
def test_torchscript_model(jit):
    model = torch.jit.script(_mlp()) if jit == "script" else torch.jit.trace(_mlp(), _data(1)[0][0])
    with pytest.raises(ModelError, match="(?s)TorchScript models are not supported.*original nn.Module"):
        nsq.compress(model, _recipe({"quantize": {}}), calib_data=_data(1), progress=False)


class DictOut(nn.Module):
    def __init__(self, keys):
        super().__init__()
        self.net, self.keys = _mlp(), keys

    def forward(self, x):
        z = self.net(x)
        return {k: z if k == "logits" else -z for k in self.keys}


def test_dict_output_without_logits_asks_which_to_score():
    with pytest.raises(ModelError, match=r"keys \['scores', 'aux'\] and no 'logits'"):
        nsq.compress(DictOut(["scores", "aux"]), _recipe({"quantize": {}}), calib_data=_data(1),
                     eval_data=_data(1), progress=False)


def test_dict_output_with_logits_is_scored_on_logits(caplog):
    ev = _data(2)
    model = DictOut(["aux", "logits"])
    with torch.no_grad():
        want = sum(int((model.net(x).argmax(-1) == y).sum()) for x, y in ev) / 16
    with caplog.at_level("INFO", logger="nnsqueeze"):
        res = nsq.compress(model, _recipe({"quantize": {}}), calib_data=_data(1), eval_data=ev, progress=False)
    assert res.report["baseline"]["accuracy"] == want
    assert "scoring its 'logits' entry" in caplog.text


def test_finetune_with_every_parameter_frozen():
    model = Counting()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ModelError, match=r"steps\[0\]\.finetune: every parameter of the model is frozen"):
        nsq.compress(model, _recipe({"finetune": {"steps": 2}}), train_data=_data(2), progress=False)


# ---- step order --------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps, words", [
    ([{"quantize": {}}, {"quantize": {}}], r"steps\[1\]\.quantize: cannot run after steps\[0\]\.quantize"),
    ([{"quantize": {}}, {"prune": {"sparsity": 0.5}}], r"(?s)steps\[1\]\.prune.*after steps\[0\]\.quantize.*"
     r"fix: put prune before quantize"),
    ([{"half": {}}, {"finetune": {"steps": 2}}], r"steps\[1\]\.finetune: cannot train after steps\[0\]\.half"),
    ([{"quantize-dynamic": {}}, {"quantize": {}}], r"steps\[1\]\.quantize.*after steps\[0\]\.quantize-dynamic"),
    ([{"weight-only": {"bits": 8, "group_size": -1}}, {"distill": {"steps": 2}}], "cannot train after"),
    ([{"cluster": {"bits": 3}}, {"finetune": {"steps": 1}}, {"prune": {"sparsity": 0.5}}],
     r"steps\[2\]\.prune.*after steps\[0\]\.cluster"),
    ([{"qat": {}}, {"finetune": {"steps": 1}}, {"lowrank": {}}], r"steps\[2\]\.lowrank.*after steps\[0\]\.qat"),
])
def test_impossible_step_order_is_rejected_before_any_step_runs(steps, words):
    model = Counting()
    with pytest.raises(RecipeError, match=words):
        nsq.compress(model, _recipe(*steps), train_data=_data(2), calib_data=_data(1), progress=False)
    assert model.calls == 0  # not even the probe ran


@pytest.mark.parametrize("name", sorted(presets()))
def test_every_preset_has_a_valid_order(name):
    make_steps(load_recipe(name))


@pytest.mark.parametrize("steps", [
    ["prune", "finetune", "quantize"], ["qat", "finetune"], ["prune", "distill", "cluster", "distill"],
    ["lowrank", "prune", "distill", "cluster", "distill"], ["share", "finetune", "cluster"],
    ["structured-prune", "nm-prune", "finetune"], ["smoothquant", "quantize"], ["quantize", "finetune"],
    ["mixed-int8", "distill"], ["group-lasso", "finetune", "quantize-dynamic"], ["wanda", "gptq"],
])
def test_legitimate_orders_are_accepted(steps):
    required = {"group-lasso": {"strength": 1e-4}, "share": {"groups": [["0", "2"]]}, "prune": {"sparsity": 0.5},
                "structured-prune": {"ratio": 0.3}}
    make_steps(load_recipe([{s: required.get(s, {})} for s in steps]))


class ConvFc(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv1d(1, 4, 3, padding=1), nn.Linear(32, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_quantizers_on_disjoint_targets_may_follow_each_other():
    # dynamic int8 on the Linear, then static int8 on the Conv1d: different modules, a valid recipe
    torch.manual_seed(0)
    data = [(torch.randn(8, 1, 8), torch.randint(0, 5, (8,))) for _ in range(2)]
    recipe = _recipe({"quantize-dynamic": {"targets": ["Linear"]}}, {"quantize": {"targets": ["Conv1d"]}})
    r = nsq.compress(ConvFc(), recipe, calib_data=data, eval_data=data, progress=False)
    kinds = {type(m).__name__ for m in r.model.modules()}
    assert not {"Linear", "Conv1d"} & kinds  # both layers were swapped for quantized ones
    with pytest.raises(RecipeError, match=r"steps\[1\]\.quantize: cannot run after steps\[0\]"):
        nsq.compress(ConvFc(), _recipe({"quantize-dynamic": {}}, {"quantize": {"targets": ["Linear"]}}),
                     calib_data=data, progress=False)
