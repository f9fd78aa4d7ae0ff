"""result.save(out, overwrite=...): what an artifact owns is replaced, nothing else is touched."""

import json

import pytest
from torch import nn

from nnsqueeze.artifact import ARTIFACT_FILES, MANIFEST, WEIGHTS, check_out, only_ours
from nnsqueeze.errors import ArtifactError
from nnsqueeze.pipeline import CompressionResult
from nnsqueeze.recipe import load_recipe
from nnsqueeze.report import Report


def result(onnx: bytes | None = None) -> CompressionResult:
    return CompressionResult(model=nn.Linear(3, 2), report=Report({"baseline": {}, "compressed": {}}),
                             recipe=load_recipe("int8"), onnx=onnx)


def tree(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def add_plots(out, user_file=False):
    (out / "plots").mkdir()
    (out / "plots" / "weights.png").write_bytes(b"png")
    (out / "plots" / "plots.json").write_text(json.dumps({"plots": ["weights.png"]}))
    if user_file:
        (out / "plots" / "mine.png").write_bytes(b"my figure")


def test_save_refuses_an_existing_artifact_without_overwrite(tmp_path):
    out = result(b"onnx").save(tmp_path / "art")
    before = tree(tmp_path)
    with pytest.raises(ArtifactError, match="(?s)artifact that exists already.*overwrite=True"):
        result().save(out)
    assert tree(tmp_path) == before


def test_overwrite_keeps_the_users_files_and_drops_our_stale_ones(tmp_path):
    out = result(b"onnx").save(tmp_path / "art")
    add_plots(out, user_file=True)
    (out / "data").mkdir()
    (out / "data" / "train.csv").write_text("1,2")
    (out / "notes.md").write_text("mine")
    result().save(out, overwrite=True)  # no ONNX this time
    files = tree(out)
    assert "model.onnx" not in files  # ours and stale: it described the old model
    assert files["notes.md"] == b"mine" and files["data/train.csv"] == b"1,2"
    assert files["plots/mine.png"] == b"my figure"  # the user's figure stays, our old plots go
    assert "plots/weights.png" not in files and "plots/plots.json" not in files
    assert json.loads(files[MANIFEST])["files"]["onnx"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no temp dir, no lock


def test_only_ours(tmp_path):
    out = result(b"onnx").save(tmp_path / "art")
    assert only_ours(out) and set(p.name for p in out.iterdir()) <= ARTIFACT_FILES
    add_plots(out)
    assert only_ours(out)
    (out / "plots" / "mine.png").write_bytes(b"x")
    assert not only_ours(out)
    (out / "plots" / "mine.png").unlink()
    (out / "notes.md").write_text("mine")
    assert not only_ours(out)
    (out / "notes.md").unlink()
    (out / MANIFEST).write_text("{}")  # a manifest we could not have written
    assert not only_ours(out) and not only_ours(tmp_path / "none")


def test_save_into_an_unwritable_place_fails_before_writing(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match="is a file, not a directory"):
        result().save(tmp_path / "file" / "art")
    with pytest.raises(ArtifactError, match="exists and is not a directory"):
        check_out(tmp_path / "file")
    assert tree(tmp_path) == {"file": b"x"}


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    from nnsqueeze import artifact

    def broken(model):
        raise RuntimeError("serialization failed")

    monkeypatch.setattr(artifact, "weights_bytes", broken)
    with pytest.raises(RuntimeError):
        result().save(tmp_path / "art")
    out = tmp_path / "old"
    monkeypatch.undo()
    result().save(out)
    before = tree(out)
    monkeypatch.setattr("nnsqueeze.safeio._fill", lambda d, files: (_ for _ in ()).throw(OSError(28, "disk full")))
    with pytest.raises(OSError, match="disk full"):
        result().save(out, overwrite=True)
    assert tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert WEIGHTS in before
