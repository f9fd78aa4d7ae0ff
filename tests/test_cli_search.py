"""`nnsqueeze search` and `nnsqueeze report --html`: exit codes and messages for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from nnsqueeze.cli import app

HELPERS = str(Path(__file__).resolve().parent / "search" / "search_helpers.py")
BASE = ["search", "--model", f"{HELPERS}:model", "--data", f"{HELPERS}:datasets", "--max-drop", "0.05"]


def _space(tmp_path, text: str):
    p = tmp_path / "space.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, match", [
    ("version: 1\nbase: [{prune: {sparsity: 0.5}}]\nparams: {}\n", "searches nothing"),
    ("base: [{prune: {sparsity: 0.5}}]\nparams: {prune.sparsity: [0.8, 0.2]}\n", "low bound"),
    ("base: [{prune: {sparsity: 0.5}}]\nparams: {prune: {optional: true}}\n", "every step in base is optional"),
    ("base: [\n", "malformed YAML"),
])
def test_bad_space_exits_2(tmp_path, text, match):
    out = tmp_path / "out"
    r = CliRunner().invoke(app, BASE + ["--space", str(_space(tmp_path, text)), "--out", str(out)])
    assert r.exit_code == 2, r.output
    assert match in " ".join(r.output.split()) and "Traceback" not in r.output
    assert not out.exists()


def test_unknown_space_and_bad_numbers_exit_2(tmp_path):
    r = CliRunner().invoke(app, BASE + ["--space", "nope", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "shipped spaces" in r.output
    r = CliRunner().invoke(app, BASE + ["--space", "cnn", "--trials", "0", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "--trials" in r.output
    assert not (tmp_path / "o").exists()


def test_search_cli_then_html(tmp_path):
    sp = _space(tmp_path, "base: [{quantize: {calibration: {samples: 64}}}]\n"
                          "params: {quantize.weights.bits: {choices: [4, 8]}}\n"
                          "evaluate: {runs: 2, warmup: 1, threads: 1}\n")
    out = tmp_path / "out"
    r = CliRunner().invoke(app, BASE[:-1] + ["1.0", "--space", str(sp), "--trials", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "best.yaml").is_file() and (out / "best" / "nnsqueeze.json").is_file()
    r = CliRunner().invoke(app, ["report", str(out), "--html"])
    assert r.exit_code == 0 and (out / "report.html").is_file()
    assert "<img" in (out / "report.html").read_text()
    r = CliRunner().invoke(app, ["report", str(out)])
    assert r.exit_code == 0 and "Pareto front" in r.output


def test_unreachable_storage_exits_2(tmp_path):
    sp = _space(tmp_path, "base: [{quantize: {}}]\nparams: {quantize.weights.bits: {choices: [4, 8]}}\n")
    r = CliRunner().invoke(app, BASE + ["--space", str(sp), "--out", str(tmp_path / "o"),
                                        "--storage", "sqlite:////nonexistent-dir/x/db.sqlite"])
    assert r.exit_code == 2 and "cannot open the study storage" in " ".join(r.output.split())
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("text, match", [
    ("- {quantize.weights.bits: 6}\n", "not one of [4, 8]"),
    ("- {quantize.weights.bitz: 8}\n", "not a param of the space"),
    ("{quantize.weights.bits: 8}\n", "non-empty list"),
    (None, "file not found"),
])
def test_bad_enqueue_file_exits_2(tmp_path, text, match):
    sp = _space(tmp_path, "base: [{quantize: {calibration: {samples: 64}}}]\n"
                          "params: {quantize.weights.bits: {choices: [4, 8]}}\n")
    q = tmp_path / "queue.yaml"
    if text is not None:
        q.write_text(text)
    out = tmp_path / "out"
    r = CliRunner().invoke(app, BASE + ["--space", str(sp), "--enqueue", str(q), "--out", str(out)])
    assert r.exit_code == 2, r.output
    assert match in " ".join(r.output.split()) and "--enqueue" in r.output and "Traceback" not in r.output
    assert not out.exists()
