"""Self-contained HTML reports (``nnsqueeze report DIR --html``): no external files or scripts.

* a search directory: the Pareto front table, the front plot embedded as a base64 PNG, and
  every trial's figures (pruned ones with their reason);
* an artifact directory: the baseline-vs-compressed table, steps, per-layer figures, and the
  PNGs of ``DIR/plots/`` (``nnsqueeze plot DIR``) when present.
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path
from typing import Any, Iterable

from ..errors import ArtifactError

STYLE = ("body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:80em}"
         ".wide{overflow-x:auto;margin:1em 0}table{border-collapse:collapse;font-size:.9em}"
         "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right;vertical-align:top}th{background:#f3f3f3}"
         "td:first-child,th:first-child,.t{text-align:left}.front{background:#eef6ff}.best td{font-weight:600}"
         "figure{margin:1em 0}figcaption{font-size:.9em;color:#555}img{max-width:100%;height:auto}"
         "summary{cursor:pointer}pre{background:#f8f8f8;padding:.5em;overflow-x:auto}")

# A cell that reads as a number ("2,352", "+0.03125", "0.88x", "91.41%", "2.9 KiB", "1e-05") is
# right-aligned; a column with any other text ("prune > quantize", "1.28x smaller") is left-aligned,
# so that long wrapped text is not ragged on the left.
_NUM = re.compile(r"[+-]?[\d,]*\.?\d+(e[+-]?\d+)?\s?(%|x|pt|ms|s|[KMG]?i?B)?")


def _table(head: Iterable[str], rows: Iterable[Iterable[Any]], cls: str = "", row_cls=None) -> str:
    head = list(head)
    rows = [[str(x) for x in r] for r in rows]
    text = [any(r[j] and not _NUM.fullmatch(r[j]) for r in rows if j < len(r)) for j in range(len(head))]

    def cell(tag: str, j: int, x: str) -> str:
        c = ' class="t"' if 0 < j < len(text) and text[j] else ""  # the first column is always left (CSS)
        return f"<{tag}{c}>{html.escape(x)}</{tag}>"

    out = [f'<div class="wide"><table class="{cls}"><tr>' + "".join(cell("th", j, h) for j, h in enumerate(head))
           + "</tr>"]
    for i, r in enumerate(rows):
        c = f' class="{row_cls(i)}"' if row_cls and row_cls(i) else ""
        out.append(f"<tr{c}>" + "".join(cell("td", j, x) for j, x in enumerate(r)) + "</tr>")
    return "\n".join(out) + "</table></div>"


def _img(png: bytes, alt: str) -> str:
    # a <figure> per image, captioned, so several plots do not run together on one line
    return (f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
            f"<figcaption>{html.escape(alt)}</figcaption></figure>")


def _page(title: str, body: list[str]) -> str:
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n"
            + "\n".join(body) + "</body></html>\n")


def _row(r: dict[str, Any]) -> list[Any]:
    return [r["trial"], f"{r['metric']:.4g}", f"{r['drop']:+.4g}", f"{r['size_bytes']:,}", f"{r['latency_ms']:.4g}",
            f"{r['speedup']:.2f}x", " > ".join(r.get("steps", [])), r.get("cache_reused_steps", 0)]


HEAD = ("trial", "metric", "drop", "ONNX bytes", "ORT latency ms", "speed-up", "steps", "cached steps")


def search_html(path: Path) -> str:
    fj = path / "front.json"
    if not fj.is_file():
        raise ArtifactError(str(path), "this search has no front.json yet", fix="run (or resume) the search first")
    try:
        s = json.loads(fj.read_text())
    except ValueError as e:
        raise ArtifactError(str(fj), f"corrupt front.json: {e}", fix="resume the search to rewrite it") from None
    front = s.get("front", [])
    body = [f"<p>study <code>{html.escape(s.get('study_name', ''))}</code>: {s.get('trials')} trials "
            f"({s.get('complete')} complete, {s.get('pruned')} pruned), {s.get('cache_hits')} cache hits; "
            f"constraints: {html.escape(json.dumps(s.get('constraints', {})))}; "
            f"chosen trial: {s.get('best')} (bold in the front)</p>",
            "<h2>Pareto front</h2>",
            _table(HEAD, [_row(r) for r in front], "front",
                   lambda i: "best" if front[i]["trial"] == s.get("best") else "")]
    if s.get("closest"):
        body.append(f"<p>No trial meets every constraint: {html.escape(json.dumps(s['closest']))}</p>")
    if (path / "front.png").is_file():
        body.append(_img((path / "front.png").read_bytes(), "metric drop vs speed-up, bubble area ~ bytes"))
    on_front = {r["trial"] for r in front}
    rows = sorted(s.get("rows", []), key=lambda r: r["trial"])
    body += ["<h2>All complete trials</h2>",
             _table(HEAD, [_row(r) for r in rows], row_cls=lambda i: "front" if rows[i]["trial"] in on_front else "")]
    if s.get("pruned_trials"):
        body += ["<h2>Pruned trials</h2>", _table(("trial", "reason"), [(p["trial"], p["reason"])
                                                                        for p in s["pruned_trials"]])]
    # collapsed: a few dozen lines each, they would push everything else far down the page
    body.append("<h2>Recipes</h2>" + "".join(
        f"<details><summary>trial {r['trial']}: {html.escape(' > '.join(r.get('steps', [])))}</summary>"
        f"<pre>{html.escape(json.dumps(r.get('recipe'), indent=2))}</pre></details>" for r in rows))
    return _page("nnsqueeze search", body)


def artifact_html(path: Path) -> str:
    from ..artifact import plot_names, read_manifest
    from ..report import Report, fmt_value

    read_manifest(path)
    rp = path / "report.json"
    if not rp.is_file():
        raise ArtifactError(str(path), "missing report.json", fix="re-create the artifact")
    try:
        r = Report.from_json(rp.read_text())
    except ValueError as e:
        raise ArtifactError(str(rp), f"corrupt report: {e}", fix="re-create the artifact") from None
    body = ["<h2>Baseline vs compressed</h2>", _table(("figure", "baseline", "compressed", "change"), r.summary_rows())]
    if r.get("steps"):
        body += ["<h2>Steps</h2>", _table(("#", "step", "seconds", "figures"), [
            (i, s["name"], f"{s.get('seconds', 0):.2f}", ", ".join(f"{k}={fmt_value(k, v)}" for k, v in
                                                                    s.get("figures", {}).items()))
            for i, s in enumerate(r["steps"])])]
    layers = r.get("layers", {})
    if layers:
        cols = sorted({k for v in layers.values() for k in v})
        body += ["<h2>Layers</h2>", _table(("layer", *cols), [(n, *(fmt_value(c, v.get(c)) for c in cols))
                                                              for n, v in layers.items()])]
    for n in r.get("notes", []):
        body.append(f"<p>note {html.escape(n['step'])}: {html.escape(n['note'])}</p>")
    names = plot_names(path / "plots") or []
    if names:
        body.append("<h2>Plots</h2>" + "".join(_img((path / "plots" / n).read_bytes(), n) for n in names
                                               if (path / "plots" / n).is_file()))
    return _page(f"nnsqueeze report: {path.name}", body)


def report_html(path: str | Path) -> str:
    """The HTML report of a search directory or an artifact directory."""
    path = Path(path)
    from .study import MARKER

    return search_html(path) if (path / MARKER).is_file() else artifact_html(path)
