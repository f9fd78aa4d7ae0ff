"""The Pareto front of a search: rows per trial, dominance, the chosen trial, table and plot.

Every objective is minimized: the metric drop (baseline minus compressed, for a metric where
higher is better), the ONNX file's bytes and the ONNX Runtime latency. A trial is feasible when it
meets every constraint (``max_drop``, and ``target_latency`` / ``target_size`` when given).
"""

from __future__ import annotations

import io
import math
from typing import Any

OBJECTIVES = ("drop", "size_bytes", "latency_ms")


def dominates(a: dict[str, Any], b: dict[str, Any], keys: tuple[str, ...] = OBJECTIVES) -> bool:
    """``a`` is no worse than ``b`` in every objective and better in one."""
    return all(a[k] <= b[k] for k in keys) and any(a[k] < b[k] for k in keys)


def pareto(rows: list[dict[str, Any]], keys: tuple[str, ...] = OBJECTIVES) -> list[dict[str, Any]]:
    """The rows no other row dominates, in input order (equal rows all stay)."""
    return [r for r in rows if not any(dominates(o, r, keys) for o in rows if o is not r)]


def limits(max_drop: float, target_latency: float | None, target_size: float | None) -> dict[str, float]:
    """Constraint name -> (objective, limit)."""
    out = {"max_drop": ("drop", max_drop)}
    if target_latency is not None:
        out["target_latency"] = ("latency_ms", target_latency)
    if target_size is not None:
        out["target_size"] = ("size_bytes", target_size)
    return out


def violations(row: dict[str, Any], lims: dict) -> list[float]:
    """Per constraint, how far over its limit the row is (<= 0: met); the optuna constraints."""
    return [float(row[key] - limit) for key, limit in lims.values()]


def choose(front: list[dict[str, Any]], pick: int | None = None, rows: list[dict[str, Any]] | None = None):
    """The trial ``pick`` (any complete trial in ``rows``), else the fastest feasible front row
    (ties: smaller, then lower drop); None when the front is empty."""
    if pick is not None:
        return next((r for r in rows or front if r["trial"] == pick), None)
    return min(front, key=lambda r: (r["latency_ms"], r["size_bytes"], r["drop"]), default=None)


def closest(rows: list[dict[str, Any]], lims: dict) -> dict[str, Any]:
    """When no trial meets the constraints: per constraint the best value reached and by how much
    it misses its limit, and the constraint that came closest (smallest relative miss)."""
    per = {}
    for name, (key, limit) in lims.items():
        best = min(rows, key=lambda r: r[key])
        per[name] = {"limit": limit, "best": best[key], "trial": best["trial"], "over": best[key] - limit,
                     "relative": (best[key] - limit) / abs(limit) if limit else math.inf}
    missed = {n: v for n, v in per.items() if v["over"] > 0}
    near = min(missed or per, key=lambda n: per[n]["relative"])
    both = min(rows, key=lambda r: sum(max(0.0, v) / max(abs(lims[n][1]), 1e-12)
                                       for n, v in zip(lims, violations(r, lims))))
    return {"constraints": per, "closest": near, "closest_trial": both["trial"]}


def _fmt_drop(d: float, higher_is_better: bool = True) -> str:
    return f"{100 * d:+.2f} pt" if abs(d) <= 1 else f"{d:+.4g}"


def table(rows: list[dict[str, Any]], title: str = "Pareto front"):
    from rich.table import Table

    t = Table(title=title)
    for col in ("trial", "metric", "drop", "size", "latency ms", "speed-up", "steps"):
        t.add_column(col)
    for r in rows:
        t.add_row(str(r["trial"]), f"{r['metric']:.4g}", _fmt_drop(r["drop"]), f"{r['size_bytes'] / 1024:.1f} KiB",
                  f"{r['latency_ms']:.4g}", f"{r['speedup']:.2f}x", " > ".join(r.get("steps", [])))
    return t


def plot_png(rows: list[dict[str, Any]], front: list[dict[str, Any]], max_drop: float | None = None) -> bytes:
    """Metric drop vs latency speed-up; bubble area ~ ONNX bytes; the front in colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    on = {r["trial"] for r in front}
    big = max((r["size_bytes"] for r in rows), default=1) or 1
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for group, colour, label in ((False, "lightgray", "other trials"), (True, "tab:blue", "Pareto front")):
        sel = [r for r in rows if (r["trial"] in on) == group]
        if sel:
            ax.scatter([r["speedup"] for r in sel], [r["drop"] for r in sel], s=[20 + 400 * r["size_bytes"] / big
                                                                                   for r in sel],
                       c=colour, alpha=0.7, edgecolors="k", linewidths=0.5, label=label)
    for r in front:
        ax.annotate(str(r["trial"]), (r["speedup"], r["drop"]), fontsize=8, ha="center", va="center")
    if max_drop is not None:
        ax.axhline(max_drop, color="tab:red", linestyle="--", linewidth=1, label=f"max drop {max_drop:g}")
    ax.set_xlabel("latency speed-up vs baseline (ONNX Runtime)")
    ax.set_ylabel("metric drop (lower is better)")
    ax.set_title("search trials (bubble area ~ ONNX bytes)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
