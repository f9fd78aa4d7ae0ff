"""The compression report: baseline vs compressed figures, per step and per layer.

``ReportBuilder`` is filled during a run (steps call ``ctx.report.layer(...)`` etc.);
``Report`` is the finished, JSON-able result with Markdown and rich-table renderings::

    report = Report.from_json(open("out/report.json").read())
    print(report.to_markdown())
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUMMARY_KEYS = ("accuracy", "params", "nonzero_params", "size_bytes", "archive_bytes", "latency_ms")


@dataclass
class ReportBuilder:
    baseline: dict[str, Any] = field(default_factory=dict)
    compressed: dict[str, Any] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    notes: list[dict[str, str]] = field(default_factory=list)
    export: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    _current: dict[str, Any] | None = None

    def begin_step(self, name: str, config: dict[str, Any]) -> None:
        self._current = {"name": name, "config": config, "figures": {}}
        self.steps.append(self._current)

    def step(self, **figures: Any) -> None:
        """Figures of the running step (e.g. ``sparsity=0.6``, ``calibration_samples=512``)."""
        if self._current is None:
            raise RuntimeError("report.step() called outside a step")
        self._current["figures"].update(figures)

    def end_step(self, **fields: Any) -> None:
        if self._current is not None:
            self._current.update(fields)
        self._current = None

    def layer(self, name: str, **fields: Any) -> None:
        """Per-layer figures (sparsity, bits, scheme, error...), merged across steps."""
        self.layers.setdefault(name, {}).update(fields)

    def skip(self, step: str, layer: str, reason: str) -> None:
        self.skipped.append({"step": step, "layer": layer, "reason": reason})

    def note(self, step: str, text: str) -> None:
        self.notes.append({"step": step, "note": text})

    def build(self) -> "Report":
        return Report(dict(baseline=self.baseline, compressed=self.compressed, steps=self.steps,
                           layers=self.layers, skipped=self.skipped, notes=self.notes,
                           export=self.export, environment=self.environment))


# The keys a report has and the type each must be, so rendering a crafted report cannot fail.
_SHAPE = {"baseline": dict, "compressed": dict, "steps": list, "layers": dict, "skipped": list, "notes": list,
          "export": dict, "environment": dict}
_ROWS = {"steps": ("name",), "skipped": ("step", "layer", "reason"), "notes": ("step", "note")}


def _check_report(data: Any) -> None:
    from .limits import quote

    if not isinstance(data, dict):
        raise ValueError(f"a report is a mapping, got {type(data).__name__}")
    for key, typ in _SHAPE.items():
        if key in data and not isinstance(data[key], typ):
            raise ValueError(f"{key!r} must be a {typ.__name__}, got {quote(data[key])}")
    for key in ("baseline", "compressed"):
        if not isinstance(data.get(key, {}).get("measured", {}), dict):
            raise ValueError(f"{key}.measured must be a mapping")
    for key, needed in _ROWS.items():
        for i, row in enumerate(data.get(key, [])):
            if not isinstance(row, dict) or not all(k in row for k in needed):
                raise ValueError(f"{key}[{i}] must be a mapping with {', '.join(needed)}, got {quote(row)}")
    for i, row in enumerate(data.get("steps", [])):
        if not isinstance(row.get("seconds", 0), (int, float)) or not isinstance(row.get("figures", {}), dict):
            raise ValueError(f"steps[{i}]: seconds must be a number and figures a mapping")
    for name, row in data.get("layers", {}).items():
        if not isinstance(row, dict):
            raise ValueError(f"layers[{quote(name)}] must be a mapping, got {quote(row)}")
    stack = [data]
    while stack:  # ints beyond float range would overflow the ratio column
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, int) and abs(v) > 2**63:
            raise ValueError(f"number {quote(v, 40)} is out of range")


def fmt_value(key: str, v: Any) -> str:
    if v is None:
        return "-"
    if key == "accuracy" and isinstance(v, float):
        return f"{100 * v:.2f}%" if v <= 1 else f"{v:.4g}"
    if key in ("size_bytes", "archive_bytes") and isinstance(v, (int, float)):
        return f"{v / 1024:.1f} KiB"
    if isinstance(v, dict):
        return ", ".join(f"{k} {fmt_value(key, x)}" for k, x in v.items())
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _ratio(key: str, b: Any, c: Any) -> str:
    if isinstance(b, dict) and isinstance(c, dict):
        parts = [f"{k} {_ratio(key, b[k], c[k])}" for k in b if k in c]
        return ", ".join(parts) or "-"
    if not isinstance(b, (int, float)) or not isinstance(c, (int, float)) or isinstance(b, bool):
        return "-"
    if key == "accuracy":
        d = (c - b) * (100 if max(abs(b), abs(c)) <= 1 else 1)
        return f"{d:+.2f} pt"
    if c == 0 or b == 0:
        return "-"
    if b == c:
        return "same"
    better, worse = ("faster", "slower") if key == "latency_ms" else ("smaller", "larger")
    return f"{b / c:.2f}x {better}" if b >= c else f"{c / b:.2f}x {worse}"


def _lower_change(b: Any, c: Any) -> str:
    """Change of a metric where lower is better (perplexity): relative, with its direction named."""
    if not isinstance(b, (int, float)) or not isinstance(c, (int, float)) or isinstance(b, bool) or b == 0:
        return "-"
    if b == c:
        return "same"
    return f"{100 * (c - b) / abs(b):+.2f}% ({'worse' if c > b else 'better'})"


class Report(dict):
    """A finished report; a plain dict with renderers."""

    def to_json(self) -> str:
        return json.dumps(self, indent=2, sort_keys=False, default=str)

    @classmethod
    def from_json(cls, text: str) -> "Report":
        """Parse and check a report; a malformed one raises ``ValueError`` naming the bad part."""
        from .errors import ArtifactError
        from .limits import loads_json

        try:
            data = loads_json(text, "report", "report", ArtifactError)
        except ArtifactError as e:
            raise ValueError(e.problem) from None
        _check_report(data)
        return cls(data)

    @classmethod
    def read(cls, path: str | Path) -> "Report":
        """A ``report.json`` read within the size and depth limits; any problem is an ``ArtifactError``."""
        from .errors import ArtifactError
        from .limits import MAX_JSON_BYTES, read_text

        text = read_text(path, MAX_JSON_BYTES, "report.json", ArtifactError)
        try:
            return cls.from_json(text)
        except ValueError as e:
            raise ArtifactError(str(path), f"corrupt report: {e}", fix="re-create the artifact") from None

    def summary_rows(self) -> list[tuple[str, str, str, str]]:
        b, c = self.get("baseline", {}), self.get("compressed", {})
        measured = b.get("measured") or c.get("measured") or {}
        rows = []
        for k in SUMMARY_KEYS:
            if k in b or k in c:
                if k == "accuracy" and measured.get("lower_is_better"):
                    # The metric slot holds e.g. perplexity: name it, and call a rise worse.
                    rows.append((measured.get("metric") or "metric", fmt_value("", b.get(k)), fmt_value("", c.get(k)),
                                 _lower_change(b.get(k), c.get(k))))
                    continue
                rows.append((k, fmt_value(k, b.get(k)), fmt_value(k, c.get(k)), _ratio(k, b.get(k), c.get(k))))
        return rows

    def to_markdown(self) -> str:
        out = ["# nnsqueeze report", "", "| figure | baseline | compressed | change |", "|---|---|---|---|"]
        out += [f"| {k} | {b} | {c} | {r} |" for k, b, c, r in self.summary_rows()]
        meas = self.get("compressed", {}).get("measured", {}) or self.get("baseline", {}).get("measured", {})
        if meas:
            out += ["", "Measured: " + ", ".join(f"{k}={v}" for k, v in meas.items())]
        if self.get("export"):
            out += ["", "## Export", ""] + [f"- {k}: {v}" for k, v in self["export"].items()]
        if self.get("steps"):
            out += ["", "## Steps", "", "| # | step | seconds | figures |", "|---|---|---|---|"]
            for i, s in enumerate(self["steps"]):
                figs = ", ".join(f"{k}={fmt_value(k, v)}" for k, v in s.get("figures", {}).items())
                out.append(f"| {i} | {s['name']} | {s.get('seconds', 0):.2f} | {figs} |")
        layers = self.get("layers", {})
        if layers:
            cols = sorted({k for v in layers.values() for k in v})
            out += ["", "## Layers", "", "| layer | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
            for name, v in layers.items():
                out.append(f"| {name} | " + " | ".join(fmt_value(c, v.get(c)) for c in cols) + " |")
        if self.get("skipped"):
            out += ["", "## Skipped layers", ""] + [f"- {s['step']}: `{s['layer']}`: {s['reason']}"
                                                    for s in self["skipped"]]
        if self.get("notes"):
            out += ["", "## Notes", ""] + [f"- {n['step']}: {n['note']}" for n in self["notes"]]
        env = self.get("environment", {})
        if env:
            out += ["", "## Environment", ""] + [
                f"- {k}: " + (", ".join(f"{a}={b}" for a, b in v.items()) if isinstance(v, dict) else f"{v}")
                for k, v in env.items()]
        return "\n".join(out) + "\n"

    def print(self, console=None) -> None:
        from rich.console import Console
        from rich.table import Table

        console = console or Console()
        t = Table(title="nnsqueeze: baseline vs compressed")
        for col in ("figure", "baseline", "compressed", "change"):
            t.add_column(col)
        for row in self.summary_rows():
            t.add_row(*row)
        console.print(t)
        for s in self.get("skipped", []):
            console.print(f"[yellow]skipped[/] {s['step']}: {s['layer']} ({s['reason']})")
        for n in self.get("notes", []):
            console.print(f"[yellow]note[/] {n['step']}: {n['note']}")
