"""Sharing one machine's cores between worker processes (``nnsqueeze search --workers K``).

A process that shares the machine calls :func:`share` once: from then on every ONNX Runtime session
it makes for computing (metrics, export verification) uses at most ``threads`` intra-op threads and
does not spin (ORT's idle threads spin by default and steal the cores the other workers compute
on), while every latency measurement (:func:`timing`) keeps the threads the recipe asks for, holds
an exclusive lock on a file shared by the workers (no two workers time at once) and pauses the
other workers of this machine (SIGSTOP, then SIGCONT) for the few milliseconds it lasts: a timing
taken while a neighbour computes on the same cores measured the neighbour too (an fp32 baseline read
9.6 ms beside a computing worker and 5.8 ms alone). Workers find each other through
:func:`register`, a file per process in a directory they share. A process that never calls
:func:`share` (the default) is unaffected.

    >>> from nnsqueeze import cpu
    >>> cpu.compute_threads(4) == 4 and cpu.spinning(None) is None    # not shared: unchanged
    True
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from .safeio import file_lock

log = logging.getLogger("nnsqueeze")
_THREADS: int | None = None
_LOCK: str | None = None
_PEERS: Path | None = None  # one file per worker process of this machine: name = pid, text = start time


def share(threads: int, lock: str | os.PathLike, peers: str | os.PathLike | None = None) -> None:
    """This process shares the machine: compute with at most ``threads`` ORT threads, time under
    ``lock``, pausing the processes registered in ``peers`` (see :func:`register`) while it times."""
    global _THREADS, _LOCK, _PEERS
    _THREADS, _LOCK = max(1, int(threads)), os.fspath(lock)
    _PEERS = None if peers is None else Path(peers)
    if _PEERS is not None:
        register(os.getpid(), _PEERS)


def unshare() -> None:
    """This process has the machine to itself again."""
    global _THREADS, _LOCK, _PEERS
    if _PEERS is not None:
        with contextlib.suppress(OSError):
            (_PEERS / str(os.getpid())).unlink()
    _THREADS = _LOCK = _PEERS = None


def shared() -> bool:
    return _THREADS is not None


def compute_threads(threads: int | None) -> int | None:
    """Intra-op threads for a computing (not timing) session: capped at the shared count."""
    if _THREADS is None:
        return threads
    return _THREADS if threads is None else min(int(threads), _THREADS)


def spinning(requested: bool | None) -> bool | None:
    """Spinning for a computing session: off when shared, unless the caller asked explicitly."""
    return False if _THREADS is not None and requested is None else requested


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22): with the pid
    it names one process, never a later one that reuses the pid. None where there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def register(pid: int, peers: str | os.PathLike) -> None:
    """Record worker ``pid`` in the ``peers`` directory (a parent may register a child it started)."""
    start = _start_time(pid)
    if start is None:
        return
    d = Path(peers)
    d.mkdir(parents=True, exist_ok=True)
    (d / str(pid)).write_text(start)


def _peers() -> list[int]:
    """The other live registered workers (stale files, of processes gone or pids reused, removed)."""
    if _PEERS is None or not hasattr(signal, "SIGSTOP"):
        return []
    pids = []
    for f in _PEERS.glob("*"):
        if not f.name.isdigit() or int(f.name) == os.getpid():
            continue
        try:
            alive = _start_time(int(f.name)) == f.read_text().strip()
        except OSError:
            continue
        if alive:
            pids.append(int(f.name))
        else:
            with contextlib.suppress(OSError):
                f.unlink()
    return pids


@contextlib.contextmanager
def timing() -> Iterator[None]:
    """Hold the workers' timing lock (exclusive) and pause the other workers while measuring latency;
    a no-op when not shared."""
    if _LOCK is None:
        yield
        return
    with file_lock(_LOCK):
        stopped = []
        try:
            for pid in _peers():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGSTOP)
                    stopped.append(pid)
            yield
        finally:
            for pid in stopped:  # also when the timing fails: a worker left stopped would never finish
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGCONT)


MIN_RUNS = 3  # timed calls a latency budget never goes below


def timed_median(fn: Callable[[], Any], warmup: int, runs: int, budget_s: float | None = None) -> tuple[float, int]:
    """``(median ms, timed calls)`` of ``fn`` after ``warmup`` calls. With ``budget_s``, the first call's time
    caps the rest: when ``warmup + runs`` calls would take longer than the budget, one warm-up and
    ``max(3, budget / call)`` timed calls run instead."""
    if warmup > 0 and budget_s is not None:
        t = time.perf_counter()
        fn()
        first = time.perf_counter() - t
        if first * (warmup + runs) > budget_s:
            warmup, runs = 1, max(MIN_RUNS, min(runs, int(budget_s / max(first, 1e-9))))
        warmup -= 1
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), runs
