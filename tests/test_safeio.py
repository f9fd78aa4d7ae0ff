"""Safe writes (nnsqueeze.safeio): probes before work, nothing of the user's replaced, no temp files left."""

import json
import threading

import pytest

from nnsqueeze import safeio
from nnsqueeze.errors import ArtifactError, ExportError
from nnsqueeze.safeio import LOCK, check_dir_target, probe_writable, write_dir, write_file

MARK = "m.json"
OURS = json.dumps({"format_version": 1})


def listing(d):
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def test_probe_refuses_a_path_under_a_regular_file(tmp_path):
    # As root, chmod does not stop writes; a path under a regular file is unwritable for everyone.
    (tmp_path / "f").write_text("x")
    with pytest.raises(ArtifactError, match="is a file, not a directory"):
        probe_writable(tmp_path / "f" / "sub" / "out", "--out")
    with pytest.raises(ExportError, match="is a file"):
        write_file(tmp_path / "f" / "m.onnx", b"data", "export", ExportError)
    assert listing(tmp_path) == ["f"]


def test_probe_refuses_an_unwritable_directory(tmp_path, monkeypatch):
    # Root ignores permission bits, so the refusal is simulated where the probe creates its file.
    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(safeio.tempfile, "mkstemp", denied)
    with pytest.raises(ArtifactError, match="cannot write in .*Permission denied"):
        check_dir_target(tmp_path / "new" / "art", [], MARK, overwrite=False)
    assert listing(tmp_path) == []


def test_write_file_failure_leaves_no_temp_file(tmp_path, monkeypatch):
    (tmp_path / "m.onnx").write_bytes(b"old")

    def boom(*a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safeio.os, "replace", boom)
    with pytest.raises(OSError, match="No space"):
        write_file(tmp_path / "m.onnx", b"new", "export")
    assert listing(tmp_path) == ["m.onnx"] and (tmp_path / "m.onnx").read_bytes() == b"old"


def test_write_file_refuses_a_directory_and_existing_files_without_overwrite(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(ArtifactError, match="is a directory"):
        write_file(tmp_path / "d", b"x", "--out")
    (tmp_path / "s.json").write_text("mine")
    with pytest.raises(ArtifactError, match="(?s)already exists.*--overwrite"):
        write_file(tmp_path / "s.json", b"x", "--out", overwrite=False)
    assert (tmp_path / "s.json").read_text() == "mine"
    write_file(tmp_path / "s.json", b"x", "--out", overwrite=True)
    assert (tmp_path / "s.json").read_bytes() == b"x" and listing(tmp_path) == ["d", "s.json"]


def test_empty_directory_is_replaced_by_one_rename(tmp_path):
    (tmp_path / "art").mkdir()
    write_dir(tmp_path / "art", {MARK: OURS, "a": "1"}, MARK)
    assert listing(tmp_path) == ["art", "art/a", f"art/{MARK}"]


def test_foreign_directory_with_a_fake_marker_is_never_touched(tmp_path):
    # The data-loss report: a directory holding `{}` as its manifest and the user's files.
    out = tmp_path / "work"
    (out / "src").mkdir(parents=True)
    (out / MARK).write_text("{}")
    (out / "src" / "main.py").write_text("print(1)")
    before = listing(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(ArtifactError, match="not an nnsqueeze artifact"):
            write_dir(out, {MARK: OURS, "a": "1"}, MARK, overwrite=overwrite)
    assert listing(tmp_path) == before and (out / MARK).read_text() == "{}"


def test_overwrite_replaces_only_owned_names(tmp_path):
    out = tmp_path / "art"
    write_dir(out, {MARK: OURS, "a": "1", "b": "1"}, MARK)
    (out / "notes").mkdir()
    (out / "notes" / "n.txt").write_text("mine")
    (out / "readme.txt").write_text("mine")
    write_dir(out, {MARK: OURS, "a": "2"}, MARK, overwrite=True, owned=["a", "b"])
    assert listing(out) == ["a", MARK, "notes", "notes/n.txt", "readme.txt"]  # stale b removed
    assert (out / "a").read_text() == "2" and (out / "readme.txt").read_text() == "mine"
    assert listing(tmp_path) == ["art"] + [f"art/{p}" for p in listing(out)]  # no temp or lock left


def test_owned_name_held_by_a_directory_is_refused(tmp_path):
    out = tmp_path / "art"
    write_dir(out, {MARK: OURS, "a": "1"}, MARK)
    (out / "b").mkdir()
    with pytest.raises(ArtifactError, match="b as a directory"):
        write_dir(out, {MARK: OURS, "b": "2"}, MARK, overwrite=True)
    assert (out / MARK).read_text() == OURS and (out / "b").is_dir()


def test_current_directory_only_when_empty_and_never_removed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "thesis.tex").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(ArtifactError, match="current directory and it is not empty"):
            write_dir(".", {MARK: OURS}, MARK, overwrite=overwrite)
    (tmp_path / "thesis.tex").unlink()
    write_dir(".", {MARK: OURS, "a": "1"}, MARK)  # empty: written in place, the folder itself stays
    assert tmp_path.is_dir() and listing(tmp_path) == ["a", MARK]


def test_racing_writers_one_wins_whole(tmp_path, monkeypatch):
    # Both writers pass the checks and fill their temp directories, then rename at the same moment.
    gate = threading.Barrier(2, timeout=10)
    fill = safeio._fill

    def fill_then_wait(d, files):
        fill(d, files)
        gate.wait()

    monkeypatch.setattr(safeio, "_fill", fill_then_wait)
    out, results = tmp_path / "art", {}

    def writer(tag):
        try:
            write_dir(out, {MARK: OURS, "who": tag, tag: tag}, MARK)
            results[tag] = "ok"
        except ArtifactError as e:
            results[tag] = str(e)

    threads = [threading.Thread(target=writer, args=(t,)) for t in ("x", "y")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winner = [t for t, r in results.items() if r == "ok"]
    assert len(winner) == 1, results
    loser = "y" if winner == ["x"] else "x"
    assert "another process" in results[loser]
    assert listing(tmp_path) == sorted(["art", f"art/{MARK}", f"art/{winner[0]}", "art/who"])  # whole, no temp
    assert (out / "who").read_text() == winner[0]


def test_second_writer_in_place_is_refused_while_one_holds_the_lock(tmp_path):
    out = tmp_path / "art"
    write_dir(out, {MARK: OURS, "a": "1"}, MARK)
    (out / LOCK).write_text("12345")  # another process is replacing the files
    with pytest.raises(ArtifactError, match="another nnsqueeze process is writing"):
        write_dir(out, {MARK: OURS, "a": "2"}, MARK, overwrite=True)
    assert (out / "a").read_text() == "1" and (out / MARK).read_text() == OURS
