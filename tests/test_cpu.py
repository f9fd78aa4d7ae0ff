"""nnsqueeze.cpu: worker processes sharing the machine compute with capped ORT threads and take turns timing."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
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


def _state(pid: int) -> str:
    """The process's state letter from /proc (R running, S sleeping, T stopped)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _wait_state(pid: int, want: set[str], timeout: float = 5.0) -> str:
    end = time.monotonic() + timeout
    while (s := _state(pid)) not in want and time.monotonic() < end:
        time.sleep(0.01)
    return s


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP") or not os.path.isdir("/proc/self"),
                    reason="pausing peers needs POSIX signals and /proc (Linux)")
def test_timing_pauses_registered_peers_and_resumes_them(tmp_path):
    peer = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # a busy neighbour
    try:
        cpu.share(1, tmp_path / "t.lock", tmp_path / "peers")
        cpu.register(peer.pid, tmp_path / "peers")
        assert sorted(p.name for p in (tmp_path / "peers").iterdir()) == sorted([str(os.getpid()), str(peer.pid)])
        with cpu.timing():
            assert _wait_state(peer.pid, {"T"}) == "T"  # stopped while this process times
        assert _wait_state(peer.pid, {"R", "S"}) in ("R", "S")  # and running again after
        with pytest.raises(RuntimeError), cpu.timing():  # a failing timing resumes the peer too
            raise RuntimeError("boom")
        assert _wait_state(peer.pid, {"R", "S"}) in ("R", "S")
    finally:
        peer.kill()
        peer.wait()
    cpu.unshare()
    assert not (tmp_path / "peers" / str(os.getpid())).exists()  # unshare removes this process's entry


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="start times come from /proc (Linux)")
def test_stale_peer_files_are_ignored_and_removed(tmp_path):
    peers = tmp_path / "peers"
    cpu.share(1, tmp_path / "t.lock", peers)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (peers / str(gone.pid)).write_text("1")  # a process that has exited
    (peers / str(os.getppid())).write_text("0")  # a live pid whose start time does not match: a reused pid
    with cpu.timing():
        pass
    assert sorted(p.name for p in peers.iterdir()) == [str(os.getpid())]


def test_timed_median_keeps_warmup_and_runs_without_a_budget():
    calls = []
    ms, n = cpu.timed_median(lambda: calls.append(1), warmup=2, runs=5)
    assert (len(calls), n) == (7, 5) and ms >= 0


@pytest.mark.parametrize("budget,expect_runs", [(0.25, 5), (0.01, cpu.MIN_RUNS), (100.0, 20)])
def test_timed_median_fits_slow_calls_into_the_budget(budget, expect_runs, monkeypatch):
    """Calls of 50 ms (a fake clock): a budget of 0.25 s allows 5 runs; never fewer than 3; a large budget
    changes nothing."""
    clock = [0.0]
    monkeypatch.setattr(cpu.time, "perf_counter", lambda: clock[0])
    calls = []

    def slow():
        calls.append(1)
        clock[0] += 0.05

    ms, n = cpu.timed_median(slow, warmup=5, runs=20, budget_s=budget)
    warm = 5 if expect_runs == 20 else 1
    assert n == expect_runs and len(calls) == warm + n
    assert ms == pytest.approx(50.0)
