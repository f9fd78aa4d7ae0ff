"""Several processes on one study: a killed search resumes; two processes share one SQLite file."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from test_study import _finished, _search

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[1] / "src"
SCRIPT = """
import sys
from search_helpers import datasets, model, space
import nnsqueeze as nsq
d = datasets()
nsq.search(model(), space(), train_data=d["train"], calib_data=d["calib"], eval_data=d["eval"], max_drop=0.05,
           trials=int(sys.argv[2]), out=sys.argv[1], seed=0, heartbeat=1, grace=2,
           storage=sys.argv[3] if len(sys.argv) > 3 else None)
"""


def _start(tmp_path, *args) -> subprocess.Popen:
    script = tmp_path / "run_search.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(HERE)])}
    return subprocess.Popen([sys.executable, str(script), *map(str, args)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _count(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=5) as c:
            return c.execute("SELECT count(*) FROM trials WHERE state IN ('COMPLETE', 'PRUNED')").fetchone()[0]
    except sqlite3.Error:
        return 0


@pytest.mark.slow
def test_killed_search_resumes_without_recomputing(tmp_path):
    out = tmp_path / "s"
    p = _start(tmp_path, out, 8)
    deadline = time.time() + 120
    while _count(out / "study.db") < 3 and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    before = _finished(out)
    assert 3 <= len(before) < 8, "the search must be killed half-way"
    res = _search(out, trials=8)  # the same arguments: resumes
    after = _finished(out)
    assert res.trials == 8 and len(after) == 8
    assert {k: after[k] for k in before} == before  # finished trials kept, not run again


def test_a_trial_killed_before_its_first_heartbeat_is_rerun(tmp_path):
    # a process killed between ask and its first heartbeat leaves a RUNNING trial no heartbeat
    # names; optuna never calls it stale, so a resumed search used to wait for it forever
    out = tmp_path / "s"
    _search(out, trials=3)
    s = json.loads((out / "search.json").read_text())
    study = optuna.load_study(study_name=s["study_name"], storage=f"sqlite:///{out / 'study.db'}")
    orphan = study.ask()  # RUNNING, never beaten
    res = _search(out, trials=4)
    states = {t.number: t.state.name for t in study.get_trials()}
    assert res.trials == 4 and states[orphan.number] == "FAIL"
    assert sum(st in ("COMPLETE", "PRUNED") for st in states.values()) == 4


@pytest.mark.slow
def test_two_processes_share_one_sqlite_study(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    procs = [_start(tmp_path, tmp_path / f"out{i}", 12, url) for i in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-2000:]
    assert _count(tmp_path / "shared.db") == 12  # the budget is shared, not doubled
    with sqlite3.connect(tmp_path / "shared.db") as c:
        workers = {v for (v,) in c.execute("SELECT value_json FROM trial_user_attributes WHERE key = 'worker'")}
    assert len(workers) == 2, "both processes ran trials"


@pytest.mark.slow
def test_workers_option(tmp_path):
    res = _search(tmp_path / "s", workers=2, trials=6)
    assert res.trials == 6


OPEN = """
import sys, time
from nnsqueeze.search.study import open_storage
start = float(sys.argv[2])
while time.time() < start:  # every process opens the new database at the same instant
    pass
open_storage(sys.argv[1], 60, 120)
"""


@pytest.mark.slow
def test_workers_opening_a_new_database_together_all_succeed(tmp_path):
    # Raw optuna loses this race about half the time (UNIQUE constraint on alembic_version).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(HERE)])}
    for round_ in range(3):
        url, start = f"sqlite:///{tmp_path / f'new{round_}.db'}", time.time() + 4
        procs = [subprocess.Popen([sys.executable, "-c", OPEN, url, str(start)], env=env, stderr=subprocess.PIPE)
                 for _ in range(3)]
        for p in procs:
            assert p.wait(timeout=120) == 0, p.stderr.read().decode()[-1500:]


@pytest.mark.parametrize("when", ["during", "after"])
def test_a_trial_failed_elsewhere_while_it_runs_is_dropped_not_fatal(tmp_path, monkeypatch, caplog, when):
    # On an overloaded machine a worker's heartbeat thread can starve past `grace`: another worker then fails
    # its trial as stale (and re-queues it). The worker still running it used to crash on its next write to
    # the trial ("Trial#N has already finished", then "Cannot tell a FAIL trial"); it now drops the result.
    from optuna.trial import TrialState

    from nnsqueeze.search import workers

    hit: list[int] = []

    class FailedElsewhere(workers._Objective):
        def __call__(self, trial):
            def fail():  # what fail_stale_trials in another process does
                hit.append(trial.number)
                trial.study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)

            if not hit and when == "during":
                fail()
            out = super().__call__(trial)
            if not hit and when == "after":
                fail()
            return out

    monkeypatch.setattr(workers, "_Objective", FailedElsewhere)
    with caplog.at_level("WARNING", logger="nnsqueeze"):
        res = _search(tmp_path / "s", trials=3)
    assert res.trials == 3 and len(_finished(tmp_path / "s")) == 3
    s = json.loads((tmp_path / "s" / "search.json").read_text())
    study = optuna.load_study(study_name=s["study_name"], storage=f"sqlite:///{tmp_path / 's' / 'study.db'}")
    assert hit == [0] and study.trials[0].state.name == "FAIL"
    assert "trial 0 was failed by another worker while this one ran it" in caplog.text
