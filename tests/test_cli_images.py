"""`nnsqueeze compress|sensitivity --data images:DIR` and `--model torchvision:NAME`: end to end,
and every bad folder or option exits 2 with a message, no traceback and nothing written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import image_folders  # noqa: E402  (tests/ is on sys.path: pytest's rootdir conftest)
from nnsqueeze.cli import app

RECIPE = "version: 1\nsteps:\n  - quantize: {}\nevaluate: {runs: 2, warmup: 1}\nexport: {onnx: null}\n"


def cli(*args):
    r = CliRunner().invoke(app, list(args))
    return r.exit_code, r.output + (r.stderr if r.stderr_bytes is not None else "")


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "net.py").write_text(image_folders.NET)
    (tmp_path / "r.yaml").write_text(RECIPE)
    image_folders.image_folder(tmp_path / "photos")
    image_folders.flat_folder(tmp_path / "flat")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")
    return tmp_path


@pytest.mark.slow  # ~15 s: the int8 preset measures latency in torch and ONNX Runtime
def test_compress_images_end_to_end_in_a_subprocess(project):
    p = subprocess.run([sys.executable, "-m", "nnsqueeze", "compress", "--model", "net.py:build", "--data",
                        "images:photos", "--image-size", "32", "--recipe", "int8", "--out", "d"],
                       capture_output=True, text=True, cwd=project, timeout=300, env={
                           **__import__("os").environ, "COLUMNS": "200"})
    assert p.returncode == 0, p.stderr
    assert "4 calibration + 4 evaluation" in p.stderr and "2 non-image files skipped" in p.stderr
    assert p.stderr.count("to RGB") == 1
    report = json.loads((project / "d" / "report.json").read_text())
    assert "accuracy" in json.dumps(report)
    assert (project / "d" / "nnsqueeze.json").is_file()


def test_compress_unlabelled_folder_measures_agreement(project):
    code, text = cli("compress", "--model", "net.py:build", "--data", "images:flat", "--image-size", "24",
                     "--recipe", "r.yaml", "--out", "d")
    assert code == 0, text
    assert "agreement" in text and "unlabelled" in text
    report = json.loads((project / "d" / "report.json").read_text())
    assert "agreement" in json.dumps(report)


def test_sensitivity_on_images(project):
    code, text = cli("sensitivity", "--model", "net.py:build", "--data", "images:flat", "--image-size", "16",
                     "--out", "s.json")
    assert code == 0, text
    rows = json.loads((project / "s.json").read_text())["rows"]
    assert rows and all("metric_drop" in r for r in rows)


def _corrupt(root):
    (root / "photos" / "b" / "fake.jpg").write_text("a text file named .jpg")


def _empty_class(root):
    (root / "photos" / "c").mkdir()


@pytest.mark.parametrize("args, make, words", [
    (["--data", "images:nowhere"], None, "images:nowhere does not exist"),
    (["--data", "images:photos"], _corrupt, "fake.jpg"),
    (["--data", "images:photos"], _empty_class, "class folder 'c' holds no images"),
    (["--data", "images:photos", "--mean", "1,2"], None, "--mean"),
    (["--data", "images:photos", "--std", "0,1,1"], None, "has a value <= 0"),
    (["--data", "images:photos", "--image-size", "0"], None, "--image-size"),
    (["--data", "net.py:build", "--image-size", "32"], None, "applies to --data images:DIR only"),
    (["--data", "images:photos", "--model", "torchvision:resnet18"], None, "path/file.py:factory"),
    (["--data", "images:photos", "--model", "timm:resnet18"], None, "path/file.py:factory"),
])
def test_bad_images_exit_2_and_write_nothing(project, monkeypatch, args, make, words):
    for lib in ("torchvision", "torchvision.models", "timm"):  # absent here; absent in CI; forced absent
        monkeypatch.setitem(sys.modules, lib, None)
    if make:
        make(project)
    opts = {"--model": "net.py:build", "--recipe": "r.yaml", "--out": "d"}
    opts.update(dict(zip(args[::2], args[1::2])))
    code, text = cli("compress", *[x for kv in opts.items() for x in kv])
    assert code == 2, text
    assert words in text and "Traceback" not in text
    assert not (project / "d").exists()


def test_sensitivity_bad_folder_exits_2_and_writes_nothing(project):
    (project / "empty").mkdir()
    code, text = cli("sensitivity", "--model", "net.py:build", "--data", "images:empty", "--out", "s.json")
    assert code == 2 and "holds 0 image(s)" in text
    assert not (project / "s.json").exists()


@pytest.mark.slow  # ~20 s on idle cores: the int8 preset times torch and ONNX Runtime; resnet18 exports twice
def test_compress_real_torchvision_resnet18_from_the_cli(tmp_path):
    """Issue 14's acceptance command, as written, on a random-init resnet18 state dict and scikit-image's
    photos (unlabelled: agreement with fp32); the artifact reloads and matches its ONNX model in ORT."""
    import numpy as np
    import onnxruntime as ort
    import torch

    import nnsqueeze as nsq
    from nnsqueeze.zoo.tvision import import_torchvision

    models = import_torchvision().models
    torch.manual_seed(0)
    torch.save(models.resnet18().state_dict(), tmp_path / "w.pth")
    image_folders.skimage_folder(tmp_path / "photos")
    p = subprocess.run([sys.executable, "-m", "nnsqueeze", "compress", "--model", "torchvision:resnet18", "--weights",
                        "w.pth", "--data", "images:photos/", "--recipe", "int8", "--out", "d", "--image-size", "32"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600,
                       env={**__import__("os").environ, "COLUMNS": "200"})
    assert p.returncode == 0, p.stderr
    assert "4 calibration + 4 evaluation" in p.stderr and "agreement" in p.stderr
    report = json.loads((tmp_path / "d" / "report.json").read_text())
    assert report["compressed"]["measured"]["metric"] == "agreement" and "accuracy_onnxruntime" in report["compressed"]
    loaded = nsq.load(tmp_path / "d", models.resnet18())   # the quantized structure replayed, weights loaded
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = loaded(x).numpy()
    sess = ort.InferenceSession(str(tmp_path / "d" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    step = (ref.max() - ref.min()) / 255   # the export's own check: 4 steps of an 8-bit grid over the output range
    assert np.abs(got - ref).max() <= 4 * step
