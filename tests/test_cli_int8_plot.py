"""The `int8` preset end to end through the CLI on a small conv net, then `nnsqueeze plot DIR`.

(The other quantization presets run end to end in tests/steps/test_quant_presets.py,
test_low_bit_presets.py and test_mixed.py; `int8` otherwise only on a BERT model in a slow test.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import nnsqueeze as nsq
from nnsqueeze.export.ort import OrtModule

FACTORY = textwrap.dedent('''
    import torch
    from torch import nn

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv1d(2, 5, 3, padding=1), nn.BatchNorm1d(5), nn.ReLU(),
                             nn.Conv1d(5, 7, 3, groups=1), nn.ReLU(), nn.Flatten(), nn.Linear(7 * 15, 3))

    def data():
        g = torch.Generator().manual_seed(0)
        b = [(torch.randn(12, 2, 17, generator=g), torch.randint(0, 3, (12,), generator=g)) for _ in range(3)]
        return {"train": b, "calib": b[:2], "eval": b[2:]}
''')


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "nnsqueeze", "-q", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.mark.slow  # two CLI subprocesses (~6 s on an idle 2-core machine)
def test_int8_preset_by_name_through_the_cli_then_plot(tmp_path):
    (tmp_path / "toy.py").write_text(FACTORY)
    p = _cli("compress", "--model", "toy.py:build", "--recipe", "int8", "--data", "toy.py:data", "--out", "art",
             cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    art = tmp_path / "art"
    manifest = json.loads((art / "nnsqueeze.json").read_text())
    assert manifest["recipe"]["name"] == "int8" and [s["name"] for s in manifest["steps"]] == ["quantize"]
    report = json.loads((art / "report.json").read_text())
    exp = report["export"]["compressed"]
    assert exp["ort_int8_ops"] == {"QLinearConv": 2, "QGemm": 1} and exp["max_abs_diff"] <= exp["tolerance"]
    assert all(isinstance(v.get("weight_sqnr_db"), float) for v in report["layers"].values())

    # The artifact reloads onto a fresh model and its ONNX file agrees with it in ONNX Runtime within
    # one 8-bit step of the output range (independently of the figures the pipeline reported).
    sys.path.insert(0, str(tmp_path))
    try:
        import toy
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("toy", None)
    model = nsq.load(art, toy.build())
    ort = OrtModule(str(art / "model.onnx"))
    x = toy.data()["eval"][0][0]
    with torch.no_grad():
        y = model(x)
    assert float((ort(x) - y).abs().max()) <= float(y.max() - y.min()) / 255

    p = _cli("plot", "art", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    pngs = sorted(q.name for q in (art / "plots").glob("*.png"))
    assert pngs == ["activations.png", "layers.png", "weights.png"]
    assert all((art / "plots" / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in pngs)
