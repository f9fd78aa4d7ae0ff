"""Crafted hostile files through the real CLI, one subprocess each: each must end in exit code 2
with a message naming the problem, no traceback, its inputs unchanged, nothing new written, and
bounded memory (an address-space limit on the child, its own peak RSS checked) and time.

The children run two at a time (each spends ~1.5 s importing torch); the cases are in crafted.py."""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .crafted import CASES

SRC = str(Path(__file__).resolve().parents[2] / "src")
ADDRESS_SPACE = 8 << 30   # hard limit on each child: a reader that allocates what a header claims dies
PEAK_RSS = 1 << 30        # what a case may really use (the CLI with torch imported is ~250 MB)
SECONDS = 60              # per case, torch import included


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def _snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` with its kind, size and mtime (and the bytes of small regular files)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            small = p.is_file() and not p.is_symlink() and st.st_size < 1 << 20
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, p.read_bytes() if small else None)
    return out


def _run(argv: list[str], cwd: Path, logs: Path) -> dict:
    """One CLI child; its exit code, stderr, own peak RSS (wait4) and seconds."""
    env = {**os.environ, "PYTHONPATH": SRC, "PYTHONDONTWRITEBYTECODE": "1", "COLUMNS": "200"}
    start = time.monotonic()
    with open(logs / "out", "wb") as out, open(logs / "err", "wb") as err:
        p = subprocess.Popen([sys.executable, "-m", "nnsqueeze", *argv], stdout=out, stderr=err, cwd=cwd,
                             env=env, preexec_fn=_limit)
        timer = threading.Timer(SECONDS, lambda: os.kill(p.pid, signal.SIGKILL))
        timer.start()
        _, status, usage = os.wait4(p.pid, 0)
        timer.cancel()
        p.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
    return {"rc": p.returncode, "stderr": (logs / "err").read_text(errors="replace"), "rss": usage.ru_maxrss * 1024,
            "seconds": time.monotonic() - start}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Build every case in its own directory, snapshot it, run all children (two at a time)."""
    cases = {}
    for name in sorted(CASES):
        root = tmp_path_factory.mktemp(f"case-{name}")
        logs = tmp_path_factory.mktemp(f"logs-{name}")
        argv, pattern = CASES[name](root)
        cases[name] = (root, logs, argv, pattern, _snapshot(root))
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {n: pool.submit(_run, argv, root, logs) for n, (root, logs, argv, _, _) in cases.items()}
        return {n: (cases[n], f.result()) for n, f in futures.items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_crafted_file_is_refused(case, results):
    (root, _, _, pattern, before), r = results[case]
    err = " ".join(r["stderr"].split())  # rich wraps long lines
    assert r["rc"] == 2, f"{case}: exit {r['rc']}\n{r['stderr'][-3000:]}"
    assert "Traceback" not in r["stderr"]
    assert re.search(pattern, err), f"{case}: {pattern!r} not in {err[:1000]!r}"
    assert len(r["stderr"]) < 6000, f"{case}: a message of {len(r['stderr'])} chars echoes the input"
    assert _snapshot(root) == before, f"{case}: files changed or written"
    assert r["rss"] < PEAK_RSS, f"{case}: peak RSS {r['rss'] / 2**20:.0f} MiB"
    assert r["seconds"] < SECONDS
