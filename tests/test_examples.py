"""The README's runnable example works as a user would run it."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_example(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300, env={"COLUMNS": "160", **__import__("os").environ})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "reloaded model reproduces the compressed outputs exactly" in p.stdout
    assert (tmp_path / "out" / "model.onnx").is_file() and (tmp_path / "out" / "report.json").is_file()
