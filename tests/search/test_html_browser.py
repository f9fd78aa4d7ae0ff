"""The HTML reports in a real headless browser: Debian's Chromium driven by Playwright.

The browser is a prerequisite, not an option: without /usr/bin/chromium (or `chromium` on PATH)
these tests FAIL, so CI cannot pass them by skipping. `.ci/run` installs it; a developer who cannot
install it opts out knowingly with NNSQUEEZE_NO_BROWSER=1 (then they are skipped with that reason).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from search_helpers import datasets, model
from typer.testing import CliRunner

import nnsqueeze as nsq
from nnsqueeze.cli import app
from test_study import _search

pytestmark = pytest.mark.browser

OPT_OUT = "NNSQUEEZE_NO_BROWSER"
# Offline and quiet: no sync, updates or background requests that would show up as network traffic.
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1280, "height": 800}  # a laptop screen


def chromium_path() -> str:
    """Debian's Chromium; fails (skips only with NNSQUEEZE_NO_BROWSER=1) when it or Playwright is missing."""
    missing = []
    path = shutil.which("chromium")
    if path is None:
        missing.append("the Chromium browser (as root: apt-get install -y chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("playwright (pip install -e '.[dev]')")
    if not missing:
        return path
    why = "missing: " + " and ".join(missing)
    if os.environ.get(OPT_OUT) == "1":
        pytest.skip(f"{OPT_OUT}=1: browser tests skipped; {why}")
    pytest.fail(f"{why}; install it, or set {OPT_OUT}=1 to skip the browser tests knowingly", pytrace=False)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    exe = chromium_path()
    from playwright.sync_api import sync_playwright

    # Chromium writes crash-report settings and dconf files under HOME: keep them in a temporary one
    home = tmp_path_factory.mktemp("chromium-home")
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
           "XDG_CACHE_HOME": str(home / ".cache")}
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=ARGS, env=env)
        yield b
        b.close()


def _render(browser, page_file, shot):
    """Open page_file, wait for it to load; the page and what it logged and requested."""
    page = browser.new_page(viewport=VIEWPORT)
    log = {"console": [], "failed": [], "requests": []}
    page.on("console", lambda m: log["console"].append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: log["console"].append(f"pageerror: {e}"))
    page.on("requestfailed", lambda r: log["failed"].append(f"{r.url[:100]} {r.failure}"))
    page.on("request", lambda r: log["requests"].append(r.url[:100]))
    page.goto(page_file.as_uri(), wait_until="load")
    page.screenshot(path=str(shot), full_page=True)
    return page, log


def _check_page(page, log, shot, images: int) -> None:
    """What every report page must pass: clean log, only itself loaded, images drawn, no overflow, not blank."""
    assert not [m for m in log["console"] if m.split(":")[0] in ("error", "warning", "pageerror")], log["console"]
    assert log["failed"] == []
    # the page itself is the only request: nothing from the network (data: images are inline)
    assert [u for u in log["requests"] if not u.startswith("data:")] == [page.url[:100]]
    imgs = page.evaluate("[...document.images].map(i => [i.alt, i.complete, i.naturalWidth, "
                         "i.getBoundingClientRect().width])")
    assert len(imgs) == images and all(ok and nw > 0 and w > 0 for _, ok, nw, w in imgs), imgs
    # nothing wider than the window: wide tables scroll inside their own box
    assert page.evaluate("document.documentElement.scrollWidth") <= VIEWPORT["width"]
    from PIL import Image

    with Image.open(shot) as im:
        assert im.width == VIEWPORT["width"] and im.height >= VIEWPORT["height"]
        lo, hi = im.convert("L").getextrema()
        assert hi - lo > 150  # dark text on a light page, not a blank (one colour) screenshot
        assert len(im.convert("RGB").getcolors(1 << 20)) > 50  # the plots add many colours


@pytest.mark.slow  # a 3-trial search (~6 s on an idle 2-core machine) and a browser start
def test_search_report_in_browser(tmp_path, browser):
    out = tmp_path / "s"
    res = _search(out, trials=3, max_drop=1.0)
    r = CliRunner().invoke(app, ["report", str(out), "--html"])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == str(out / "report.html")
    page, log = _render(browser, out / "report.html", tmp_path / "search.png")
    _check_page(page, log, tmp_path / "search.png", images=1)
    front = json.loads((out / "front.json").read_text())["front"]
    assert len(front) == len(res.front) >= 1
    table = page.locator("table.front")
    assert table.is_visible()
    rows = table.locator("tr")
    assert rows.count() == len(front) + 1  # the header row, then one per front trial
    assert all(rows.nth(i).is_visible() for i in range(rows.count()))
    # the front is what the page is for: it shows without scrolling
    box = table.bounding_box()
    assert box["y"] + box["height"] <= VIEWPORT["height"]
    cells = [rows.nth(i + 1).locator("td").first.inner_text() for i in range(len(front))]
    assert cells == [str(f["trial"]) for f in front]
    best = table.locator("tr.best")
    assert best.count() == 1 and best.locator("td").first.inner_text() == str(res.best["trial"])
    assert int(best.locator("td").first.evaluate("c => getComputedStyle(c).fontWeight")) >= 600
    # text columns read left to right, numbers line up on the right
    align = page.evaluate("[...document.querySelectorAll('table.front tr:nth-child(2) td')]"
                          ".map(c => getComputedStyle(c).textAlign)")
    head = [t.strip() for t in table.locator("th").all_inner_texts()]
    assert align[head.index("steps")] == "left" and align[head.index("ONNX bytes")] == "right"
    assert page.locator("img[alt^='metric drop vs speed-up']").is_visible()


@pytest.mark.slow  # a compression, `nnsqueeze plot` and a browser start (~8 s)
def test_artifact_report_in_browser(tmp_path, browser):
    d = datasets()
    res = nsq.compress(model(), [{"quantize": {"calibration": {"samples": 64}}}], calib_data=d["calib"],
                       eval_data=d["eval"], progress=False)
    art = tmp_path / "a"
    res.save(art)
    r = CliRunner().invoke(app, ["plot", str(art)])
    assert r.exit_code == 0, r.output
    plots = sorted(p.name for p in (art / "plots").glob("*.png"))
    assert plots
    r = CliRunner().invoke(app, ["report", str(art), "--html"])
    assert r.exit_code == 0, r.output
    page, log = _render(browser, art / "report.html", tmp_path / "artifact.png")
    _check_page(page, log, tmp_path / "artifact.png", images=len(plots))
    assert sorted(page.evaluate("[...document.images].map(i => i.alt)")) == plots
    for h in ("Baseline vs compressed", "Layers", "Plots"):
        assert page.get_by_role("heading", name=h).is_visible()
    assert page.locator("table").first.locator("tr").count() == len(res.report.summary_rows()) + 1


def test_missing_browser_fails_unless_opted_out(monkeypatch):
    monkeypatch.setenv("PATH", "")  # no chromium on PATH
    monkeypatch.delenv(OPT_OUT, raising=False)
    with pytest.raises(pytest.fail.Exception, match=f"apt-get install -y chromium.*{OPT_OUT}=1"):
        chromium_path()
    monkeypatch.setenv(OPT_OUT, "1")
    with pytest.raises(pytest.skip.Exception, match=f"{OPT_OUT}=1"):
        chromium_path()
