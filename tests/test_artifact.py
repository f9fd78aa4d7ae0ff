import json

import pytest
import torch
from torch import nn

from nnsqueeze.artifact import MANIFEST, load, read_manifest, write_dir
from nnsqueeze.errors import ArtifactError


def test_write_dir_is_atomic_and_replaces_artifacts(tmp_path):
    out = tmp_path / "art"
    write_dir(out, {MANIFEST: json.dumps({"format_version": 1}), "a.txt": "one"})
    with pytest.raises(ArtifactError, match="artifact that exists already"):  # replacing needs overwrite=True
        write_dir(out, {MANIFEST: json.dumps({"format_version": 1}), "b.txt": "two"})
    (out / "notes.txt").write_text("mine")
    # overwrite replaces (or removes) only the names it owns: a.txt here; the user's file stays.
    write_dir(out, {MANIFEST: json.dumps({"format_version": 1}), "b.txt": "two"}, overwrite=True, owned=["a.txt"])
    assert sorted(p.name for p in out.iterdir()) == ["b.txt", MANIFEST, "notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"
    # No temporary or backup directory is left beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_write_dir_failure_leaves_nothing(tmp_path):
    out = tmp_path / "art"
    with pytest.raises(TypeError):
        write_dir(out, {"ok": b"x", "bad": object()})  # type: ignore[dict-item]
    assert list(tmp_path.iterdir()) == []


def test_write_dir_refuses_foreign_directory(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(ArtifactError, match="not an nnsqueeze artifact"):
        write_dir(tmp_path / "mine", {MANIFEST: "{}"})
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


@pytest.mark.parametrize("content, words", [
    (None, "missing nnsqueeze.json"),
    ("{not json", "corrupt manifest"),
    ('{"format_version": "one"}', "no integer format_version"),
    ('{"format_version": 999}', "newer"),
])
def test_load_refuses_bad_manifests(tmp_path, content, words):
    if content is not None:
        (tmp_path / MANIFEST).write_text(content)
    with pytest.raises(ArtifactError, match=words):
        read_manifest(tmp_path)
    with pytest.raises(ArtifactError):
        load(tmp_path, nn.Linear(2, 2))


def test_load_missing_dir(tmp_path):
    with pytest.raises(ArtifactError, match="not found"):
        load(tmp_path / "nope", nn.Linear(2, 2))


def test_corrupt_weights(tmp_path):
    (tmp_path / MANIFEST).write_text(json.dumps({"format_version": 1, "steps": []}))
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ArtifactError, match="corrupt weights"):
        load(tmp_path, nn.Linear(2, 2))


def test_plain_round_trip_without_pickle(tmp_path):
    from nnsqueeze.artifact import weights_bytes

    m = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    write_dir(tmp_path / "a", {MANIFEST: json.dumps({"format_version": 1, "steps": []}),
                               "model.safetensors": weights_bytes(m)})
    fresh = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    x = torch.randn(4, 3)
    assert torch.equal(load(tmp_path / "a", fresh)(x), m(x))
    with pytest.raises(ArtifactError, match="do not fit"):
        load(tmp_path / "a", nn.Linear(3, 2))


@pytest.mark.parametrize("then,here,words", [
    ("avx512-vnni", "avx2", ["no longer holds here", "re-quantize on this machine", "weights.reduce_range: true"]),
    ("avx2", "arm64", ["7-bit weight codes", "still run exactly"]),
    ("avx2", "avx512", None),  # same kernel class (both saturate): nothing to say
    (None, "avx2", None),  # artifacts from before the ISA was recorded
])
def test_load_warns_when_the_cpu_kernel_class_differs(tmp_path, monkeypatch, caplog, then, here, words):
    from nnsqueeze.artifact import weights_bytes
    from nnsqueeze.isa import SATURATING

    m = nn.Linear(3, 2)
    manifest = {"format_version": 1, "steps": []}
    if then is not None:
        manifest["isa"] = {"arch": "x86_64", "isa": then, "u8s8_saturates": then in SATURATING}
    write_dir(tmp_path / "a", {MANIFEST: json.dumps(manifest), "model.safetensors": weights_bytes(m)})
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    monkeypatch.setenv("NNSQUEEZE_ISA", here)  # this machine, as the detector reports it
    with caplog.at_level("WARNING", logger="nnsqueeze"):
        load(tmp_path / "a", nn.Linear(3, 2))
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    if words is None:
        assert warned == []
    else:
        assert len(warned) == 1 and all(w in warned[0] for w in words), warned
        assert then in warned[0] and here in warned[0]
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before  # loading writes nothing
