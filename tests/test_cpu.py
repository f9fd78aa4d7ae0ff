"""nnsqueeze.cpu: worker processes sharing the machine compute with capped ORT threads and take turns timing."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest

from nnsqueeze import cpu


@pytest.fixture(autouse=True)
def _unshared():
    yield
    cpu.unshare()


def test_not_shared_changes_nothing():
    assert cpu.compute_threads(None) is None and cpu.compute_threads(3) == 3
    assert cpu.spinning(None) is None and cpu.spinning(True) is True
    with cpu.timing():
        pass


def test_shared_caps_compute_sessions(tmp_path):
    cpu.share(1, tmp_path / "t.lock")
    assert cpu.compute_threads(None) == 1 and cpu.compute_threads(2) == 1
    assert cpu.spinning(None) is False and cpu.spinning(True) is True  # an explicit request wins
    cpu.unshare()
    assert cpu.compute_threads(2) == 2


def _hold(lock: str, seconds: float, q) -> None:
    cpu.share(1, lock)
    with cpu.timing():
        q.put(("in", time.monotonic()))
        time.sleep(seconds)
        q.put(("out", time.monotonic()))


def test_two_processes_never_time_at_once(tmp_path):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_hold, args=(str(tmp_path / "t.lock"), 0.4, q)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    events = sorted((q.get(timeout=5) for _ in range(4)), key=lambda e: e[1])
    assert [e[0] for e in events] == ["in", "out", "in", "out"]  # the intervals do not overlap
