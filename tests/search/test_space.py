"""Search spaces: parsing, validation (typed errors naming the key), trial -> recipe mapping."""

from __future__ import annotations

import optuna
import pytest

from nnsqueeze.errors import RecipeError
from nnsqueeze.recipe import Recipe
from nnsqueeze.search.space import Space, load_space, spaces

BASE = [{"prune": {"sparsity": 0.5}}, {"finetune": {"epochs": 1}}, {"quantize": {}}]


def test_param_forms_and_mapping():
    s = Space({"version": 1, "base": BASE, "params": {
        "prune": {"optional": True}, "prune.sparsity": [0.3, 0.9], "finetune.epochs": [1, 3],
        "finetune.lr": {"log": [1e-4, 1e-2]}, "quantize.weights.bits": {"choices": [4, 8]}}})
    kinds = {k: p.kind for k, p in s.params.items()}
    assert kinds == {"prune": "optional", "prune.sparsity": "float", "finetune.epochs": "int",
                     "finetune.lr": "log", "quantize.weights.bits": "choices"}
    r = s.recipe({"prune.sparsity": 0.7, "finetune.epochs": 2, "quantize.weights.bits": 4})
    assert isinstance(r, Recipe)
    assert [e.name for e in r.steps] == ["prune", "finetune", "quantize"]
    assert r.steps[0].config.sparsity == 0.7 and r.steps[1].config.epochs == 2
    assert r.steps[2].config.weights.bits == 4 and r.steps[2].config.activations.bits == 8  # the rest kept
    off = s.recipe({"prune": False, "prune.sparsity": 0.7})
    assert [e.name for e in off.steps] == ["finetune", "quantize"]


def test_suggest_skips_fields_of_switched_off_steps():
    s = Space({"base": BASE, "params": {"prune": {"optional": True}, "prune.sparsity": [0.3, 0.9]}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(12):
        t = study.ask()
        v = s.suggest(t)
        assert ("prune.sparsity" in v) == v["prune"]
        if v["prune"]:
            assert 0.3 <= v["prune.sparsity"] <= 0.9
        study.tell(t, 0.0)


def test_optional_field_is_removed_when_off_and_its_subfields_not_sampled():
    base = [{"quantize": {"weights": {"bits": 4, "clip": "mse", "adaround": {"iters": 10, "samples": 8}}}}]
    s = Space({"base": base, "params": {"quantize.weights.adaround": {"optional": True},
                                        "quantize.weights.adaround.iters": {"int": [5, 20]},
                                        "quantize.weights.bits": {"choices": [4, 8]}}})
    on = s.recipe({"quantize.weights.adaround": True, "quantize.weights.adaround.iters": 7})
    assert on.steps[0].config.weights.adaround.iters == 7 and on.steps[0].config.weights.adaround.samples == 8
    off = s.recipe({"quantize.weights.adaround": False})
    assert off.steps[0].config.weights.adaround is None          # removed: the field's default
    assert off.steps[0].config.weights.clip == "mse"             # its siblings kept
    assert base[0]["quantize"]["weights"]["adaround"] == {"iters": 10, "samples": 8}  # base untouched
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(16):
        t = study.ask()
        v = s.suggest(t)
        seen.add(v["quantize.weights.adaround"])
        assert ("quantize.weights.adaround.iters" in v) == v["quantize.weights.adaround"]
        assert "quantize.weights.bits" in v
        study.tell(t, 0.0)
    assert seen == {True, False}


def test_repeated_step_is_named_by_occurrence():
    s = Space({"base": [{"finetune": {"epochs": 1}}, {"quantize": {}}, {"finetune": {"epochs": 1}}],
               "params": {"finetune#2.epochs": [1, 4]}})
    assert s.recipe({"finetune#2.epochs": 3}).steps[2].config.epochs == 3
    with pytest.raises(RecipeError, match="finetune#1 or finetune#2"):
        Space({"base": [{"finetune": {}}, {"finetune": {}}], "params": {"finetune.epochs": [1, 4]}})


@pytest.mark.parametrize("params, match", [
    ({}, "searches nothing"),
    ({"prun.sparsity": [0.1, 0.2]}, "no step 'prun'"),
    ({"prune.sparsity": [0.9, 0.2]}, "low bound must be below"),
    ({"prune.sparsity": [0.3, 1.2]}, "value 1.2 makes an invalid recipe"),
    ({"prune.sparsity": {"floot": [0.1, 0.2]}}, "unknown key 'floot'"),
    ({"prune.sparsity": {"float": [0.1, 0.2], "choices": [1]}}, "exactly one of"),
    ({"prune.nope": [0.1, 0.2]}, "nope"),
    ({"prune.scope": {"optional": True}}, "optional field must be set in base"),
    ({"prune": {"optional": True}, "finetune": {"optional": True}, "quantize": {"optional": True}},
     "every step in base is optional"),
])
def test_bad_spaces(params, match):
    with pytest.raises(RecipeError, match=match):
        Space({"base": BASE, "params": params})


def test_contradictory_optional_step():
    # gradual pruning needs the fine-tuning step: switching it off can never make a valid recipe
    with pytest.raises(RecipeError, match="params.finetune.*needs a training step"):
        Space({"base": [{"prune": {"sparsity": 0.5, "schedule": "gradual"}}, {"finetune": {}}],
               "params": {"finetune": {"optional": True}}})


def test_version_and_unknown_top_key():
    with pytest.raises(RecipeError, match="unknown search space version 2"):
        Space({"version": 2, "base": BASE, "params": {"prune.sparsity": [0.3, 0.9]}})
    with pytest.raises(RecipeError, match="unknown key 'parms'"):
        Space({"base": BASE, "parms": {}})


def test_shipped_spaces_load():
    assert {"cnn", "encoder", "llm"} <= set(spaces())
    for name in spaces():
        assert load_space(name).params


def test_load_space_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_space(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: [\n")
    with pytest.raises(RecipeError, match="malformed YAML"):
        load_space(bad)


def test_check_values_accepts_what_the_space_can_sample_and_names_what_it_cannot():
    s = Space({"version": 1, "base": BASE, "params": {
        "prune": {"optional": True}, "prune.sparsity": [0.3, 0.9], "finetune.epochs": {"int": [1, 3]},
        "finetune.lr": {"log": [1e-4, 1e-2]}, "quantize.weights.bits": {"choices": [4, 8]}}})
    ok = s.check_values({"prune": True, "prune.sparsity": 0.45, "finetune.epochs": 2.0, "finetune.lr": 1e-3,
                         "quantize.weights.bits": 8}, "enqueue[0]")
    assert ok["finetune.epochs"] == 2 and isinstance(ok["finetune.epochs"], int)
    assert s.check_values({"quantize.weights.bits": 4}, "q") == {"quantize.weights.bits": 4}  # the rest sampled
    bad = [({"prune.sparity": 0.5}, "prune.sparity", "not a param"),
           ({"prune.sparsity": 0.95}, "prune.sparsity", r"outside the param's range \[0.3, 0.9\]"),
           ({"finetune.epochs": 1.5}, "finetune.epochs", "outside"),
           ({"finetune.lr": float("nan")}, "finetune.lr", "outside"),
           ({"quantize.weights.bits": 6}, "quantize.weights.bits", r"not one of \[4, 8\]"),
           ({"prune": "yes"}, "prune", "not one of"), ({}, "enqueue[3]", "mapping"), ([1], "enqueue[3]", "mapping")]
    for values, where, problem in bad:
        with pytest.raises(RecipeError, match=problem) as e:
            s.check_values(values, "enqueue[3]")
        assert e.value.where.endswith(where)
