"""The demo path end to end: train (cold cache), prune-int8, ONNX Runtime, targets met."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_meets_its_targets(tmp_path):
    env_cache = tmp_path / "cache"
    p = subprocess.run([sys.executable, "-m", "nnsqueeze", "demo", "--out", str(tmp_path / "demo")],
                       capture_output=True, text=True, timeout=600,
                       env={**__import__("os").environ, "NNSQUEEZE_CACHE": str(env_cache), "COLUMNS": "200"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    b, c = report["baseline"], report["compressed"]
    assert b["accuracy"] >= 0.95
    assert b["accuracy"] - c["accuracy"] <= 0.003 + 1e-9
    assert c["size_bytes"] <= 0.30 * b["size_bytes"]
    assert c["latency_ms"]["onnxruntime"] < b["latency_ms"]["onnxruntime"]
    assert report["baseline"]["measured"]["latency_batch"] == 256
    assert report["export"]["compressed"]["top1_agreement"] >= 0.99
    assert "demo targets" in p.stdout
