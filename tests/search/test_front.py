"""Pareto front, choice, the closest constraint, and the plot."""

from __future__ import annotations

import random

import pytest

from nnsqueeze.search import front as fr


def _rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"trial": i, "drop": rng.choice([0.0, 0.01, 0.02, 0.05]), "size_bytes": rng.randint(1, 6) * 100,
             "latency_ms": rng.choice([1.0, 2.0, 3.0]), "metric": 0.9, "speedup": 1.0} for i in range(n)]


@pytest.mark.parametrize("seed", range(5))
def test_front_matches_brute_force(seed):
    rows = _rows(40, seed)  # few distinct values: ties and duplicates on purpose
    got = {r["trial"] for r in fr.pareto(rows)}
    keys = ("drop", "size_bytes", "latency_ms")
    expect = set()
    for r in rows:
        beaten = False
        for o in rows:
            a, b = [o[k] for k in keys], [r[k] for k in keys]
            if all(x <= y for x, y in zip(a, b)) and a != b:
                beaten = True
        if not beaten:
            expect.add(r["trial"])
    assert got == expect and got


def test_choose_fastest_then_smaller_and_pick():
    rows = [{"trial": 0, "drop": 0.0, "size_bytes": 300, "latency_ms": 2.0},
            {"trial": 1, "drop": 0.01, "size_bytes": 200, "latency_ms": 1.0},
            {"trial": 2, "drop": 0.02, "size_bytes": 100, "latency_ms": 1.0}]
    assert fr.choose(rows)["trial"] == 2
    assert fr.choose(rows, pick=0)["trial"] == 0
    assert fr.choose(rows, pick=9) is None
    assert fr.choose([]) is None


def test_closest_constraint():
    lims = fr.limits(0.01, 1.0, None)
    rows = [{"trial": 0, "drop": 0.05, "size_bytes": 1, "latency_ms": 1.2},
            {"trial": 1, "drop": 0.02, "size_bytes": 1, "latency_ms": 3.0}]
    c = fr.closest(rows, lims)
    assert c["constraints"]["max_drop"]["best"] == 0.02 and c["constraints"]["max_drop"]["trial"] == 1
    assert c["constraints"]["target_latency"]["over"] == pytest.approx(0.2)
    assert c["closest"] == "target_latency"  # 20% over beats 100% over
    assert fr.violations(rows[0], lims) == pytest.approx([0.04, 0.2])


def test_plot_png():
    rows = _rows(6, 0)
    png = fr.plot_png(rows, fr.pareto(rows), max_drop=0.02)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
