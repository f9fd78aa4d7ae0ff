import pytest

from nnsqueeze.errors import RecipeError
from nnsqueeze.recipe import Recipe, load_recipe, presets


def test_presets_are_listed_and_load():
    names = presets()
    assert {"int8", "prune-int8"} <= set(names)
    for name in names:
        r = load_recipe(name)
        assert r.steps and r.version == 1
    assert [s.name for s in load_recipe("prune-int8").steps] == ["prune", "finetune", "quantize"]


def test_yaml_file_and_round_trip(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("version: 1\nsteps:\n  - prune: {sparsity: 0.5, schedule: oneshot}\n")
    r = load_recipe(p)
    assert r.steps[0].name == "prune" and r.steps[0].config.sparsity == 0.5
    # The resolved recipe (defaults filled in) loads back to the same thing.
    again = Recipe.from_dict(r.to_dict())
    assert again.to_dict() == r.to_dict()


def test_list_of_step_dicts():
    r = load_recipe([{"prune": {"sparsity": 0.3, "schedule": "oneshot"}}])
    assert r.steps[0].config.sparsity == 0.3


@pytest.mark.parametrize("recipe, where, words", [
    ([{"bogus": {}}], "steps[0]", ["unknown step 'bogus'", "prune"]),
    ([{"prune": {"sparsity": 0.5, "colour": 1}}], "steps[0].prune.colour", ["unknown key 'colour'", "sparsity"]),
    ([{"prune": {"sparsity": "lots"}}], "steps[0].prune.sparsity", ["lots"]),
    ({"steps": [{"prune": {}}], "exprot": {}}, "recipe.exprot", ["unknown key 'exprot'", "export"]),
    ({"version": 99, "steps": [{"prune": {}}]}, "version", ["newer"]),
    ({"steps": []}, "recipe.steps", ["at least 1"]),
    ([{"prune": {}, "finetune": {}}], "steps[0]", ["one-key mapping"]),
    ([{"prune": [1, 2]}], "steps[0].prune", ["must be a mapping"]),
    ("no-such-preset", "no-such-preset", ["neither a recipe file nor a preset", "int8"]),
])
def test_errors_name_key_location_and_accepted_values(recipe, where, words):
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe)
    msg = str(e.value)
    assert where in msg
    for w in words:
        assert w in msg


def test_malformed_yaml_names_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("steps:\n  - prune: {sparsity: 0.5\n")
    with pytest.raises(RecipeError, match=r"bad.yaml:\d+:\d+.*malformed YAML"):
        load_recipe(p)


def test_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_nested_unknown_key_lists_accepted_keys():
    with pytest.raises(RecipeError) as e:
        load_recipe({"steps": [{"prune": {}}], "export": {"onnx": {"opset": 17, "bogus": 1}}})
    assert "export.onnx.bogus" in str(e.value) and "opset" in str(e.value)
