"""Per-layer quantization sensitivity and the `nnsqueeze sensitivity` command."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
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


# --- half precision formats (fp16 / bf16) -------------------------------------------------------

import half_sensitive_net  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from nnsqueeze.metrics import get_metric  # noqa: E402


class _HandHalf(nn.Module):
    """Independent reference: a Linear computed by hand in ``dtype`` (inputs, weights, bias cast)."""

    def __init__(self, lin, dtype):
        super().__init__()
        self.lin, self.dtype = lin, dtype

    def forward(self, x):
        w, b = self.lin.weight.to(self.dtype), self.lin.bias.to(self.dtype)
        return F.linear(x.to(self.dtype), w, b).to(x.dtype)


@pytest.mark.parametrize("fmt,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_format_equals_the_layer_cast_by_hand(fmt, dtype):
    d = half_sensitive_net.data()
    model = half_sensitive_net.build()
    rows = sensitivity(model, d["calib"], eval_data=d["eval"], metric="accuracy", formats=[fmt])
    assert rows[0]["layer"] == "fc1" and rows[0]["format"] == fmt  # the layer built to break in half
    acc = get_metric("accuracy")[0]
    for r in rows:
        hand = copy.deepcopy(model)
        setattr(hand, r["layer"], _HandHalf(getattr(hand, r["layer"]), dtype))
        assert r["metric"] == float(acc(hand, d["eval"]))
        assert r["metric_drop"] == float(acc(model, d["eval"])) - r["metric"]
        # SQNR by hand in float64 over the calibration batches
        with torch.no_grad():
            ref = torch.cat([model(x) for x, _ in d["calib"]]).double()
            out = torch.cat([hand(x) for x, _ in d["calib"]]).double()
        err = float(((out - ref) ** 2).sum())
        want = -math.inf if not math.isfinite(err) else 10 * math.log10(float((ref ** 2).sum()) / err)
        assert r["sqnr_db"] == pytest.approx(want, rel=1e-9)
    if fmt == "fp16":
        assert rows[0]["sqnr_db"] == -math.inf  # fp16 overflow (inf/NaN outputs) is the worst SQNR
    others = [r for r in rows if r["layer"] != "fc1"]
    assert rows[0]["metric_drop"] > 0.1 and all(r["metric_drop"] <= 0.02 for r in others)


def test_half_formats_cover_embeddings_and_mix_with_int():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(11, 6), nn.Flatten(), nn.Linear(18, 3)).eval()
    calib = [(torch.randint(0, 11, (8, 3)), torch.zeros(8, dtype=torch.long)) for _ in range(2)]
    rows = sensitivity(model, calib, formats=["int8", "fp16", "bf16"])
    pairs = {(r["layer"], r["format"]) for r in rows}
    assert pairs == {("0", "fp16"), ("0", "bf16"), ("2", "int8"), ("2", "fp16"), ("2", "bf16")}
    by = {(r["layer"], r["format"]): r["sqnr_db"] for r in rows}
    for layer in ("0", "2"):  # fp16 (11-bit significand) is more precise than bf16 (8-bit) here
        assert by[(layer, "fp16")] > by[(layer, "bf16")] > 20


def test_cli_sensitivity_half_formats(tmp_path):
    (tmp_path / "fac.py").write_text(Path(half_sensitive_net.__file__).read_text())
    out, png = tmp_path / "sens.json", tmp_path / "sens.png"
    p = nsq("sensitivity", "--model", "fac.py:build", "--data", "fac.py:data", "--out", str(out),
            "--plot", str(png), "--formats", "fp16,bf16,int8", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    rows = json.loads(out.read_text())["rows"]
    assert {(r["layer"], r["format"]) for r in rows} == {(n, f) for n in ("fc0", "fc1", "fc2")
                                                         for f in ("fp16", "bf16", "int8")}
    assert (rows[0]["layer"], rows[0]["format"], rows[0]["sqnr_db"]) == ("fc1", "fp16", "-inf")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "bf16" in p.stdout and "-inf" in p.stdout
