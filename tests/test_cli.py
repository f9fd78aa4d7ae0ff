"""The CLI through a real subprocess: exit codes, messages, no traceback, nothing half-written."""

import json
import subprocess
import sys
import textwrap

import pytest

FACTORY = textwrap.dedent('''
    import torch
    from torch import nn

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv1d(1, 6, 3, padding=1), nn.BatchNorm1d(6), nn.ReLU(),
                             nn.Flatten(), nn.Linear(6 * 16, 4))

    def data():
        g = torch.Generator().manual_seed(0)
        b = [(torch.randn(16, 1, 16, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(3)]
        return {"train": b, "calib": b[:1], "eval": b[1:]}
''')


def nsq(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "nnsqueeze", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_help_on_each_command():
    for cmd in ([], ["demo"], ["compress"], ["report"], ["recipes"]):
        p = nsq(*cmd, "--help")
        assert p.returncode == 0 and "Usage" in p.stdout


def test_recipes_lists_presets_and_shows_one():
    p = nsq("recipes")
    assert p.returncode == 0 and "int8" in p.stdout and "prune-int8" in p.stdout
    p = nsq("recipes", "int8")
    assert p.returncode == 0 and "quantize:" in p.stdout


@pytest.fixture
def project(tmp_path):
    (tmp_path / "toy.py").write_text(FACTORY)
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nsteps:\n  - quantise: {}\n")
    return tmp_path


def test_compress_then_report(project):
    recipe = project / "r.yaml"
    recipe.write_text("version: 1\nsteps:\n  - quantize: {}\nevaluate: {runs: 3, warmup: 1}\n")
    p = nsq("compress", "--model", "toy.py:build", "--recipe", str(recipe), "--data", "toy.py:data",
            "--out", "art", cwd=project)
    assert p.returncode == 0, p.stderr
    manifest = json.loads((project / "art" / "nnsqueeze.json").read_text())
    assert manifest["format_version"] == 1 and manifest["steps"][0]["name"] == "quantize"
    p = nsq("report", "art", cwd=project)
    assert p.returncode == 0 and "size_bytes" in p.stdout
    p = nsq("report", "art", "--markdown", cwd=project)
    assert p.stdout.startswith("# nnsqueeze report")


@pytest.mark.parametrize("args, words", [
    (["--recipe", "bad.yaml"], "unknown step 'quantise'"),
    (["--recipe", "nope"], "neither a recipe file nor a preset"),
    (["--recipe", "int8", "--model", "toy.py:missing"], "has no attribute 'missing'"),
    (["--recipe", "int8", "--model", "nosuchmod:build"], "cannot import"),
    (["--recipe", "int8", "--weights", "w.safetensors"], "not found"),
    (["--recipe", "int8", "--data", "toy"], "MODULE:NAME"),
])
def test_user_errors_exit_2_without_traceback_and_write_nothing(project, args, words):
    base = {"--model": "toy.py:build", "--data": "toy.py:data", "--out": "art"}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    p = nsq("compress", *[x for kv in base.items() for x in kv], cwd=project)
    assert p.returncode == 2, p.stderr
    assert words in p.stderr and "Traceback" not in p.stderr
    assert not (project / "art").exists()
    assert not any(x.name.startswith(".art") for x in project.iterdir())


def test_report_on_missing_dir_exits_2(tmp_path):
    p = nsq("report", str(tmp_path / "nope"))
    assert p.returncode == 2 and "artifact directory not found" in p.stderr
