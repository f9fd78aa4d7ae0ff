"""The CLI's filesystem and import safety: refused outputs, factories that fail, no code from the cwd."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from nnsqueeze.cli import app

TOY = textwrap.dedent('''
    import torch
    from torch import nn

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(8, 3))

    def data():
        g = torch.Generator().manual_seed(0)
        b = [(torch.randn(8, 1, 8, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(2)]
        return {"train": b, "calib": b[:1], "eval": b[1:]}

    def needs_args(width):
        return nn.Linear(width, 2)

    def raises():
        raise RuntimeError("checkpoint shard 3 is missing")
''')
RECIPE = "version: 1\nsteps:\n  - quantize: {}\nevaluate: {runs: 2, warmup: 1}\nexport: {onnx: null}\n"


def cli(*args):
    r = CliRunner().invoke(app, list(args))
    text = r.output + (getattr(r, "stderr", "") if r.stderr_bytes is not None else "")
    return r.exit_code, text


def tree(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "toy.py").write_text(TOY)
    (tmp_path / "r.yaml").write_text(RECIPE)
    (tmp_path / "broken.py").write_text("def build(:\n    pass\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")
    return tmp_path


def compress(*extra, out="art"):
    return cli("compress", "--model", "toy.py:build", "--recipe", "r.yaml", "--data", "toy.py:data", "--out", out,
               *extra)


def test_existing_artifact_needs_overwrite_and_keeps_the_users_files(project):
    code, text = compress()
    assert code == 0, text
    art = project / "art"
    (art / "notes.md").write_text("mine")
    (art / "runs").mkdir()
    (art / "runs" / "log.txt").write_text("keep")
    before = tree(project)
    code, text = compress()
    assert code == 2 and "--overwrite" in text and "Traceback" not in text
    assert tree(project) == before
    code, text = compress("--overwrite")
    assert code == 0, text
    assert (art / "notes.md").read_text() == "mine" and (art / "runs" / "log.txt").read_text() == "keep"
    assert json.loads((art / "nnsqueeze.json").read_text())["format_version"] == 1
    assert sorted(p.name for p in project.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("setup, out, words", [
    (lambda p: (p / "mine").mkdir() or (p / "mine" / "nnsqueeze.json").write_text("{}"), "mine",
     "not an nnsqueeze artifact"),
    (lambda p: None, ".", "current directory and it is not empty"),
    (lambda p: (p / "plain").write_text("x"), "plain/art", "is a file, not a directory"),
    (lambda p: (p / "plain").write_text("x"), "plain", "exists and is not a directory"),
])
def test_refused_out_exits_2_before_the_run_and_writes_nothing(project, setup, out, words):
    setup(project)
    before = tree(project)
    for extra in ((), ("--overwrite",)):
        code, text = compress(*extra, out=out)
        assert code == 2 and words in text and "Traceback" not in text, text
        assert tree(project) == before


def test_read_only_out_is_found_before_the_model_is_built(project, monkeypatch):
    # Root ignores permission bits, so a read-only mount is simulated where the probe creates its file.
    import nnsqueeze.safeio as safeio

    def read_only(*a, **k):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(safeio.tempfile, "mkstemp", read_only)
    before = tree(project)
    code, text = cli("compress", "--model", "toy.py:raises", "--recipe", "r.yaml", "--data", "toy.py:data",
                     "--out", "art")
    assert code == 2 and "Traceback" not in text, text
    assert "--out" in text and "cannot write in" in text and "Read-only file system" in text
    assert "checkpoint shard" not in text  # refused before the model factory ran
    assert tree(project) == before and not (project / "art").exists()


@pytest.mark.parametrize("spec, words", [
    ("toy.py:needs_args", ["toy.py:needs_args needs arguments", "width"]),
    ("toy.py:raises", ["toy.py:raises() raised RuntimeError", "checkpoint shard 3 is missing"]),
    ("broken.py:build", ["broken.py:build", "SyntaxError", "line 1"]),
    ("toy:build", ["cannot import 'toy'", "path/to/toy.py:build", "PYTHONPATH"]),
])
def test_bad_factories_are_model_errors_naming_the_spec(project, spec, words):
    code, text = cli("compress", "--model", spec, "--recipe", "r.yaml", "--data", "toy.py:data", "--out", "art")
    assert code == 2 and "Traceback" not in text, text
    assert "--model" in text and all(w in text for w in words), text
    assert not (project / "art").exists()


def test_bad_data_factory_is_a_data_error(project):
    code, text = cli("compress", "--model", "toy.py:build", "--recipe", "r.yaml", "--data", "toy.py:raises",
                     "--out", "art")
    assert code == 2 and "--data" in text and "checkpoint shard 3 is missing" in text
    assert not (project / "art").exists()


def test_sensitivity_refuses_existing_files_before_the_run(project):
    (project / "s.json").write_text("mine")
    code, text = cli("sensitivity", "--model", "toy.py:raises", "--data", "toy.py:data", "--out", "s.json")
    assert code == 2 and "already exists" in text and "--overwrite" in text  # refused before the factory ran
    assert (project / "s.json").read_text() == "mine"


@pytest.mark.parametrize("content", ["[1, 2, 3]", "not json at all"])
def test_report_of_a_corrupt_report_json(project, content):
    compress()
    (project / "art" / "report.json").write_text(content)
    code, text = cli("report", "art")
    assert code == 2 and "corrupt report" in text and "Traceback" not in text


def test_plot_of_a_truncated_artifact(project):
    compress()
    w = project / "art" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:50])
    code, text = cli("plot", "art")
    assert code == 2 and "corrupt weights" in text and "Traceback" not in text
    assert not (project / "art" / "plots").exists()


def test_demo_replaces_only_its_own_previous_artifact(project, monkeypatch):
    # The real demo takes minutes (tests/test_demo.py); here its training and compression are stubbed
    # so that what is under test is how the second and later runs treat --out.
    import nnsqueeze
    from nnsqueeze.pipeline import CompressionResult
    from nnsqueeze.recipe import load_recipe
    from nnsqueeze.report import Report
    from nnsqueeze.zoo import mnist1d
    from torch import nn

    side = {"accuracy": 0.99, "size_bytes": 100, "latency_ms": {"onnxruntime": 2.0}}
    fake = CompressionResult(model=nn.Linear(2, 2), recipe=load_recipe("prune-int8"), report=Report(
        {"baseline": side, "compressed": dict(side, size_bytes=20, latency_ms={"onnxruntime": 1.0})}))
    calls = []
    monkeypatch.setattr(mnist1d, "load_data", lambda: {"train": [], "calib": [], "test": []})
    monkeypatch.setattr(mnist1d, "pretrained", lambda force=False: calls.append(1) or nn.Linear(2, 2))
    monkeypatch.setattr(nnsqueeze, "compress", lambda *a, **k: fake)
    for _ in range(2):  # a second plain `nnsqueeze demo` replaces the first one's artifact
        code, text = cli("demo")
        assert code == 0, text
    demo = project / "nnsqueeze-demo"
    (demo / "notes.md").write_text("mine")
    code, text = cli("demo")
    assert code == 2 and "--overwrite" in text and len(calls) == 2  # refused before training
    code, text = cli("demo", "--overwrite")
    assert code == 0 and (demo / "notes.md").read_text() == "mine"


EVIL = 'open({marker!r}, "w").write("imported")\n'


def test_python_m_never_imports_from_the_current_directory(tmp_path):
    # Files named like dependencies in the cwd; with the cwd on sys.path they would run.
    marker = tmp_path / "PWNED"
    for name in ("numpy.py", "onnxruntime.py", "safetensors.py", "typer.py", "yaml.py"):
        (tmp_path / name).write_text(EVIL.format(marker=str(marker)))
    (tmp_path / "toy.py").write_text(TOY)
    env = {**os.environ, "COLUMNS": "200"}
    p = subprocess.run([sys.executable, "-m", "nnsqueeze", "compress", "--model", "onnxruntime:get_device",
                        "--recipe", "int8", "--data", "toy.py:data", "--out", "art"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    # The real onnxruntime was imported: its get_device() returns a string, which is not a model.
    assert p.returncode == 2 and "expected a torch.nn.Module, got str" in p.stderr, p.stderr[-2000:]
    assert not marker.exists() and not (tmp_path / "art").exists()
