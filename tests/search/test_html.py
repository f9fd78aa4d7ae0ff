"""The self-contained HTML reports, by their text (in a real headless browser: test_html_browser.py)."""

from __future__ import annotations

import base64

import pytest
from search_helpers import datasets, model

import nnsqueeze as nsq
from nnsqueeze.errors import ArtifactError
from nnsqueeze.search.html import report_html
from test_study import _search


def test_search_html_has_front_table_and_image(tmp_path):
    res = _search(tmp_path / "s", trials=3, max_drop=1.0)
    text = report_html(tmp_path / "s")
    assert '<table class="front">' in text and "Pareto front" in text
    assert f"<td>{res.best['trial']}</td>" in text
    src = text.split('<img alt="metric drop vs speed-up', 1)[1].split('src="data:image/png;base64,', 1)[1]
    assert base64.b64decode(src.split('"', 1)[0])[:4] == b"\x89PNG"
    assert "http://" not in text and "https://" not in text  # nothing loaded from elsewhere


def test_artifact_html(tmp_path):
    d = datasets()
    r = nsq.compress(model(), [{"quantize": {"calibration": {"samples": 64}}}], calib_data=d["calib"],
                     eval_data=d["eval"], progress=False)
    r.save(tmp_path / "a")
    text = report_html(tmp_path / "a")
    assert "Baseline vs compressed" in text and "<h2>Layers</h2>" in text and "size_bytes" in text


def test_html_of_something_else(tmp_path):
    with pytest.raises(ArtifactError):
        report_html(tmp_path)
