"""Per-layer quantization sensitivity and the `nnsqueeze sensitivity` command."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import torch

from nnsqueeze.sensitivity import output_sqnr, quantize_copy, sensitivity

import sensitive_net  # noqa: E402  (tests/ is on sys.path: pytest's rootdir conftest)

FACTORY = Path(sensitive_net.__file__).read_text()



def _factory():
    return sensitive_net.build, sensitive_net.data


def test_sensitive_layer_ranks_first_by_sqnr():
    build, data = _factory()
    model, d = build(), data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = sensitivity(model, d["calib"])
    assert [r["layer"] for r in rows][0] == "fc2"
    assert {r["layer"] for r in rows} == {"conv1", "conv2", "fc1", "fc2"}
    assert all("metric_drop" not in r for r in rows)
    assert rows[0]["sqnr_db"] < min(r["sqnr_db"] for r in rows[1:]) - 6
    # writes nothing and leaves the model untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_sensitive_layer_ranks_first_by_metric_drop():
    build, data = _factory()
    d = data()
    rows = sensitivity(build(), d["calib"], eval_data=d["eval"], metric="accuracy", formats=("int8", "int7"))
    assert len(rows) == 8 and rows[0]["layer"] == "fc2"
    assert rows[0]["metric_drop"] > 0 and rows[0]["metric_drop"] >= max(r["metric_drop"] for r in rows[1:])
    print("ranking:", [(r["layer"], r["format"], round(r["metric_drop"], 4), round(r["sqnr_db"], 1)) for r in rows])


def test_sqnr_nothing_is_inf_all_is_finite():
    build, data = _factory()
    model, d = build(), data()
    assert output_sqnr(model, build(), d["calib"]) == math.inf
    q = quantize_copy(model, d["calib"], weights={"reduce_range": False})
    s = output_sqnr(model, q, d["calib"])
    assert math.isfinite(s) and s > 0


def nsq(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "nnsqueeze", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_cli_sensitivity(tmp_path):
    (tmp_path / "fac.py").write_text(FACTORY)
    out, png = tmp_path / "res" / "sens.json", tmp_path / "sens.png"
    p = nsq("sensitivity", "--model", "fac.py:build", "--data", "fac.py:data", "--out", str(out),
            "--plot", str(png), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["layer"] == "fc2" and "metric_drop" in rows[0]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "fc2" in p.stdout


def test_cli_sensitivity_bad_model_exits_2(tmp_path):
    (tmp_path / "fac.py").write_text(FACTORY)
    out = tmp_path / "sens.json"
    p = nsq("sensitivity", "--model", "fac.py:nope", "--data", "fac.py:data", "--out", str(out), cwd=tmp_path)
    assert p.returncode == 2 and "error" in p.stderr and "Traceback" not in p.stderr
    assert not out.exists()
    p = nsq("sensitivity", "--model", "no_colon", "--data", "mnist1d", "--out", str(out), cwd=tmp_path)
    assert p.returncode == 2 and not out.exists()
    p = nsq("sensitivity", "--model", "fac.py:build", "--data", "fac.py:data", "--out", str(out),
            "--formats", "int8,int9", cwd=tmp_path)
    assert p.returncode == 2 and "int9" in p.stderr and "Traceback" not in p.stderr and not out.exists()


def test_cli_sensitivity_several_formats(tmp_path):
    (tmp_path / "fac.py").write_text(FACTORY)
    out = tmp_path / "sens.json"
    p = nsq("sensitivity", "--model", "fac.py:build", "--data", "fac.py:data", "--out", str(out),
            "--formats", "int8, int4", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    rows = json.loads(out.read_text())["rows"]
    layers = {r["layer"] for r in rows}
    assert {(r["layer"], r["format"]) for r in rows} == {(n, f) for n in layers for f in ("int8", "int4")}


def test_low_bit_formats_are_measured_and_lose_more():
    build, data = _factory()
    model, d = build(), data()
    rows = sensitivity(model, d["calib"], formats=("int8", "int4", "int2"))
    by = {(r["layer"], r["format"]): r["sqnr_db"] for r in rows}
    assert len(rows) == 12
    for layer in ("conv1", "conv2", "fc1", "fc2"):  # fewer bits, more output noise
        assert by[(layer, "int8")] > by[(layer, "int4")] > by[(layer, "int2")]
