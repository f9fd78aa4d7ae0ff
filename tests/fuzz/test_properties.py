"""Property-based fuzzing (Hypothesis, derandomized): random recipes, manifests and safetensors
headers either load or raise the reader's typed error, never anything else."""

from __future__ import annotations

import json
import struct

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from nnsqueeze.artifact import MANIFEST, WEIGHTS, load
from nnsqueeze.errors import ArtifactError, NnsqueezeError, RecipeError
from nnsqueeze.recipe import Recipe, parse_yaml
from nnsqueeze.safe_weights import DTYPES, read_safetensors

FAST = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
KEYS = st.sampled_from(["steps", "version", "seed", "name", "prune", "quantize", "sparsity", "bits", "layers",
                        "ranks", "k", "record", "config", "evaluate", "threads", "export", "x"])
SCALARS = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=20)
VALUES = st.recursive(SCALARS, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(KEYS | st.text(max_size=8),
                                                                                         kids, max_size=4),
                      max_leaves=30)


@FAST
@given(VALUES)
def test_random_recipe_data_is_accepted_or_a_recipe_error(data):
    try:
        Recipe.from_dict(data)
    except RecipeError as e:
        assert len(str(e)) < 10_000


@FAST
@given(VALUES, st.sampled_from(["yaml", "json"]))
def test_random_recipe_text_is_accepted_or_a_recipe_error(data, fmt):
    text = yaml.safe_dump(data) if fmt == "yaml" else json.dumps(data)
    try:
        Recipe.from_dict(parse_yaml(text, "r"), "r")
    except RecipeError:
        pass


@FAST
@given(st.text(max_size=300))
def test_random_yaml_text_is_a_recipe_error_at_worst(text):
    try:
        parse_yaml(text, "r")
    except RecipeError:
        pass


STEP_NAMES = ["prune", "cluster", "lowrank", "quantize", "quantize-dynamic", "weight-only", "structured-prune",
              "half", "share", "rtn", "mixed", "nm-prune"]
LAYER = st.sampled_from(["0", "1", "2", "nope", "0.weight", ""])
RECORDS = st.fixed_dictionaries({}, optional={
    "layers": st.lists(LAYER, max_size=3) | st.dictionaries(LAYER, VALUES, max_size=3),
    "ranks": st.lists(st.integers(-5, 3_000_000_000), max_size=2),
    "heads": st.dictionaries(LAYER, st.lists(st.integers(-3, 10**6), max_size=4), max_size=2),
    "shrink": st.lists(st.tuples(LAYER, st.sampled_from(["out", "in"]), st.lists(st.integers(-2, 10), max_size=4)),
                       max_size=2),
    "groups": st.lists(st.lists(LAYER, max_size=3), max_size=2),
    "folded": VALUES, "embeddings": VALUES, "pack": st.booleans(), "bits": VALUES, "group_size": VALUES,
})


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


@FAST
@given(st.sampled_from(STEP_NAMES), RECORDS, st.dictionaries(KEYS, VALUES, max_size=2))
def test_random_manifest_records_load_or_raise_artifact_error(tmp_path_factory, name, record, config):
    from safetensors.torch import save

    d = tmp_path_factory.mktemp("m")
    (d / MANIFEST).write_text(json.dumps({"format_version": 1, "steps": [
        {"name": name, "config": config, "record": record}]}))
    (d / WEIGHTS).write_bytes(save(_model().state_dict()))
    try:
        load(d, _model())
    except ArtifactError:
        pass


@pytest.mark.parametrize("record, words", [
    ({"layers": {"0": {"kind": "svd", "ranks": [3_000_000_000]}}}, "ranks"),
    ({"layers": {"0": {"kind": "svd", "ranks": [-1]}}}, "ranks"),
])
def test_lowrank_rank_bounded_by_the_layer(tmp_path, record, words):
    (tmp_path / MANIFEST).write_text(json.dumps({"format_version": 1, "steps": [
        {"name": "lowrank", "config": {}, "record": record}]}))
    with pytest.raises(ArtifactError, match=words):
        load(tmp_path, _model())


def test_cluster_k_bounded_by_the_layer(tmp_path):
    (tmp_path / MANIFEST).write_text(json.dumps({"format_version": 1, "steps": [
        {"name": "cluster", "config": {}, "record": {"layers": {"0": 10**13}}}]}))
    with pytest.raises(ArtifactError, match=r"steps\[0\] \('cluster'\).*cluster record: 0: k"):
        load(tmp_path, _model())


def test_missing_module_and_other_width_are_artifact_errors(tmp_path):
    from nnsqueeze.artifact import weights_bytes

    (tmp_path / MANIFEST).write_text(json.dumps({"format_version": 1, "steps": [
        {"name": "prune", "config": {"sparsity": 0.5}, "record": {"layers": ["nope.deeper"]}}]}))
    (tmp_path / WEIGHTS).write_bytes(weights_bytes(_model()))
    with pytest.raises(ArtifactError, match="nope.deeper"):
        load(tmp_path, _model())
    (tmp_path / MANIFEST).write_text(json.dumps({"format_version": 1, "steps": []}))
    with pytest.raises(ArtifactError, match="do not fit.*\n.*same widths"):
        load(tmp_path, nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))


DTYPE = st.sampled_from(list(DTYPES) + ["F128", "", "f32", "I4"])
ENTRY = st.fixed_dictionaries({"dtype": DTYPE | VALUES, "shape": st.lists(st.integers(-3, 2**62), max_size=3) | VALUES,
                               "data_offsets": st.lists(st.integers(-8, 2**63), min_size=0, max_size=3) | VALUES})


@FAST
@given(st.dictionaries(st.text(max_size=6), ENTRY | VALUES, max_size=3), st.binary(max_size=64),
       st.none() | st.integers(0, 2**64 - 1))
def test_random_safetensors_headers_read_or_raise(tmp_path_factory, header, data, n):
    raw = json.dumps(header).encode()
    p = tmp_path_factory.mktemp("st") / "w.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw) if n is None else n) + raw + data)
    try:
        out = read_safetensors(p, ArtifactError)
    except ArtifactError:
        return
    assert sum(t.numel() * t.element_size() for t in out.values()) <= len(data)


@FAST
@given(st.dictionaries(st.text(min_size=1, max_size=6), st.sampled_from([torch.float32, torch.bfloat16, torch.int8,
                                                                        torch.bool, torch.float16, torch.int64]),
                       max_size=4), st.lists(st.integers(0, 3), max_size=3))
def test_valid_files_read_exactly_as_safetensors_wrote_them(tmp_path_factory, dtypes, shape):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.randn(shape, generator=g) * 10).to(dt) for k, dt in dtypes.items()}
    p = tmp_path_factory.mktemp("st") / "w.safetensors"
    save_file(sd, str(p))
    out = read_safetensors(p, ArtifactError)
    assert out.keys() == sd.keys()
    for k in sd:
        assert out[k].dtype == sd[k].dtype and torch.equal(out[k], sd[k])


def test_threads_capped_at_cpu_count(caplog):
    import os

    r = Recipe.from_dict({"steps": [{"prune": {"sparsity": 0.5}}], "evaluate": {"threads": 2000}})
    assert r.evaluate.threads == (os.cpu_count() or 1)
    assert "capped" in caplog.text


def test_deep_python_recipe_is_a_recipe_error():
    data: list = []
    for _ in range(5000):
        data = [data]
    with pytest.raises(RecipeError, match="nested more than 64"):
        Recipe.from_dict({"steps": data})
    assert isinstance(RecipeError("a", "b"), NnsqueezeError)
