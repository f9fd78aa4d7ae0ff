"""Sharing one machine's cores between worker processes (``nnsqueeze search --workers K``).

A process that shares the machine calls :func:`share` once: from then on every ONNX Runtime session
it makes for computing (metrics, export verification) uses at most ``threads`` intra-op threads and
does not spin (ORT's idle threads spin by default and steal the cores the other workers compute
on), while every latency measurement (:func:`timing`) keeps the threads the recipe asks for and
holds an exclusive lock on a file shared by the workers, so that no two workers time at once. A
process that never calls :func:`share` (the default) is unaffected.

    >>> from nnsqueeze import cpu
    >>> cpu.compute_threads(4) == 4 and cpu.spinning(None) is None    # not shared: unchanged
    True
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from .safeio import file_lock

_THREADS: int | None = None
_LOCK: str | None = None


def share(threads: int, lock: str | os.PathLike) -> None:
    """This process shares the machine: compute with at most ``threads`` ORT threads, time under ``lock``."""
    global _THREADS, _LOCK
    _THREADS, _LOCK = max(1, int(threads)), os.fspath(lock)


def unshare() -> None:
    """This process has the machine to itself again."""
    global _THREADS, _LOCK
    _THREADS = _LOCK = None


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


@contextlib.contextmanager
def timing() -> Iterator[None]:
    """Hold the workers' timing lock (exclusive) while measuring latency; a no-op when not shared."""
    if _LOCK is None:
        yield
        return
    with file_lock(_LOCK):
        yield
