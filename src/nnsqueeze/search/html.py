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
from pathlib import Path
from typing import Any, Iterable

from ..errors import ArtifactError

STYLE = ("body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}"
         "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}th{background:#f3f3f3}"
         "td:first-child,th:first-child{text-align:left}img{max-width:100%}.front{background:#eef6ff}")


def _table(head: Iterable[str], rows: Iterable[Iterable[Any]], cls: str = "", row_cls=None) -> str:
    out = [f'<table class="{cls}"><tr>' + "".join(f"<th>{html.escape(str(h))}</th>" for h in head) + "</tr>"]
    for i, r in enumerate(rows):
        c = f' class="{row_cls(i)}"' if row_cls and row_cls(i) else ""
        out.append(f"<tr{c}>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in r) + "</tr>")
    return "\n".join(out) + "</table>"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _page(title: str, body: list[str]) -> str:
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n" + "\n".join(body) + "</body></html>\n")


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
    body = [f"<p>study <code>{html.escape(s.get('study_name', ''))}</code>: {s.get('trials')} trials "
            f"({s.get('complete')} complete, {s.get('pruned')} pruned), {s.get('cache_hits')} cache hits; "
            f"constraints: {html.escape(json.dumps(s.get('constraints', {})))}; chosen trial: {s.get('best')}</p>",
            "<h2>Pareto front</h2>", _table(HEAD, [_row(r) for r in s.get("front", [])], "front")]
    if s.get("closest"):
        body.append(f"<p>No trial meets every constraint: {html.escape(json.dumps(s['closest']))}</p>")
    if (path / "front.png").is_file():
        body.append(_img((path / "front.png").read_bytes(), "metric drop vs speed-up, bubble area ~ bytes"))
    front = {r["trial"] for r in s.get("front", [])}
    rows = sorted(s.get("rows", []), key=lambda r: r["trial"])
    body += ["<h2>All complete trials</h2>",
             _table(HEAD, [_row(r) for r in rows], row_cls=lambda i: "front" if rows[i]["trial"] in front else "")]
    if s.get("pruned_trials"):
        body += ["<h2>Pruned trials</h2>", _table(("trial", "reason"), [(p["trial"], p["reason"])
                                                                        for p in s["pruned_trials"]])]
    body.append("<h2>Recipes</h2>" + "".join(f"<h3>trial {r['trial']}</h3><pre>{html.escape(json.dumps(r.get('recipe'), indent=1))}</pre>"
                                              for r in rows))
    return _page("nnsqueeze search", body)


def artifact_html(path: Path) -> str:
    from ..artifact import plot_names, read_manifest
    from ..report import Report, _fmt

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
            (i, s["name"], f"{s.get('seconds', 0):.2f}", ", ".join(f"{k}={_fmt(k, v)}" for k, v in
                                                                    s.get("figures", {}).items()))
            for i, s in enumerate(r["steps"])])]
    layers = r.get("layers", {})
    if layers:
        cols = sorted({k for v in layers.values() for k in v})
        body += ["<h2>Layers</h2>", _table(("layer", *cols), [(n, *(_fmt(c, v.get(c)) for c in cols))
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
