"""The workers of a search: processes that ask the shared study for trials and run them.

A worker (:func:`run_worker`) counts and asks under a lock, runs the trial with a heartbeat, and
tells the study the result. Each running trial writes a heartbeat, and a trial whose process died
(no heartbeat for ``grace`` seconds) is marked failed and re-queued with the same parameters, so an
interrupted search resumes where it stopped. :func:`run_workers` runs several on this machine.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import threading
import time
from pathlib import Path

import torch
from torch import nn

from .. import cpu
from ..errors import DataError, ModelError, NnsqueezeError
from ..safeio import file_lock
from . import front as fr
from .cache import PrefixCache, data_key
from .space import Space, load_space
from .study import CACHE, DONE, PEERS, TIMING_LOCK, Job, _constrain, _Objective, _Pruned, _sampler, open_storage

log = logging.getLogger("nnsqueeze")


class _Rebuilt:
    """The model as a spawned worker rebuilds it: the factory, then the parent's exact weights."""

    def __init__(self, spec: str, model: nn.Module):
        self.spec, self.state = spec, {k: v.detach().clone() for k, v in model.state_dict().items()}

    def build(self) -> nn.Module:
        from ..inputs import call_factory

        m = call_factory(self.spec, "--model", ModelError)
        m.load_state_dict(self.state)
        return m


def _lock_path(job: Job) -> Path:
    """Beside an SQLite study (every process on this machine that uses it takes the same lock), else
    in DIR: processes on other machines may then start up to one trial each past the budget."""
    if job.storage.startswith("sqlite:///"):
        return Path(job.storage[len("sqlite:///"):] + ".lock")
    return Path(job.out) / ".search.lock"


class _Heartbeat:
    def __init__(self, storage, trial_id: int, interval: int):
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._beat, args=(storage, trial_id, interval), daemon=True)
        self._t.start()

    def _beat(self, storage, trial_id: int, interval: int) -> None:
        while True:
            storage.record_heartbeat(trial_id)
            if self._stop.wait(interval):
                return

    def stop(self) -> None:
        self._stop.set()
        self._t.join()


# ---------------------------------------------------------------------------- workers

def _counts(study) -> tuple[int, int]:
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    return sum(s in DONE for s in states), states.count("RUNNING")


def run_worker(job: Job, index: int = 0) -> None:
    """Run trials until the study holds ``job.trials`` finished ones (several workers share it)."""
    _Worker(job, index).run()


class _Worker:
    """One worker's study, sampler and objective; :meth:`run` asks for and runs trials."""

    def __init__(self, job: Job, index: int):
        import optuna

        if job.threads:  # one of several workers on this machine: share its cores (nnsqueeze.cpu)
            torch.set_num_threads(job.threads)
            cpu.share(job.threads, Path(job.out) / TIMING_LOCK, Path(job.out) / PEERS)
        if isinstance(job.model, _Rebuilt):
            job.model = job.model.build()
        self.job = job
        self.storage = open_storage(job.storage, job.heartbeat, job.grace)
        self.lims = fr.limits(job.max_drop, job.target_latency, job.target_size)
        self.study = optuna.load_study(study_name=job.study_name, storage=self.storage,
                                       sampler=_sampler(job.sampler, job.seed + 1000 * index, job.trials, self.lims))
        key = data_key(job.train, job.calib, job.evald)
        self.objective = _Objective(job, load_space(_space_from(job)),
                                    PrefixCache(Path(job.out) / CACHE, job.model, key, job.cache))

    def close(self) -> None:
        """Close the database connections (before a fork: a child must never use its parent's)."""
        engine = getattr(self.storage, "engine", None)
        if engine is not None:
            engine.dispose()

    def run(self, limit: int | None = None) -> None:
        """Trials until the study holds ``job.trials`` finished ones, or ``limit`` run by this call."""
        from optuna.storages import fail_stale_trials
        from optuna.trial import TrialState

        job, storage, study, lims = self.job, self.storage, self.study, self.lims
        ran = 0
        while limit is None or ran < limit:
            with file_lock(_lock_path(job)):  # one worker at a time counts and asks for a trial
                for tid in _orphans(storage, study, job.grace):
                    # a process killed between ask and its first heartbeat left a RUNNING trial that
                    # no heartbeat names, which optuna never calls stale: give it one beat, so the
                    # grace period ends it like any dead trial (failed, then re-queued)
                    storage.record_heartbeat(tid)
                fail_stale_trials(study)  # trials of dead processes: failed, then re-queued as waiting
                done, running = _counts(study)
                trial = study.ask() if done + running < job.trials else None
                if trial is not None:  # beat now, inside the lock: the window above stays as small as it can be
                    storage.record_heartbeat(trial._trial_id)
            if trial is None:
                if done >= job.trials or limit is not None:
                    return
                time.sleep(min(1.0, job.heartbeat))  # the last trials run elsewhere, or await their grace period
                continue
            ran += 1
            beat = _Heartbeat(storage, trial._trial_id, job.heartbeat)
            try:
                values = self.objective(trial)
            except _Pruned as p:
                beat.stop()

                def pruned(trial=trial, p=p) -> None:
                    trial.set_user_attr("pruned", p.reason)
                    if p.drop is not None:
                        trial.set_user_attr("pruned_drop", p.drop)
                    drop = p.drop if p.drop is not None else math.inf
                    _constrain(trial, list(lims), [drop - job.max_drop] + [0.0] * (len(lims) - 1))
                    study.tell(trial, state=TrialState.PRUNED)

                if _tell(storage, trial, pruned, job.grace):
                    log.info("trial %d pruned: %s", trial.number, p.reason)
                continue
            except BaseException as e:
                beat.stop()
                if isinstance(e, Exception) and _taken(storage, trial):  # the objective's writes found it failed
                    _dropped(trial, job.grace)
                    continue
                study.tell(trial, state=TrialState.FAIL)
                raise
            beat.stop()
            if _tell(storage, trial, lambda trial=trial, values=values: study.tell(trial, values), job.grace):
                log.info("trial %d: drop %.4g, %d bytes, %.4g ms", trial.number, *values)


def _taken(storage, trial) -> bool:
    """Whether another worker finished ``trial`` while this one ran it: with no heartbeat recorded for
    ``grace`` seconds (a starved heartbeat thread on an overloaded machine) it was failed as stale and
    re-queued, so a copy with the same parameters runs again."""
    return storage.get_trial(trial._trial_id).state.is_finished()


def _dropped(trial, grace: int) -> None:
    log.warning("trial %d was failed by another worker while this one ran it (no heartbeat recorded for %d s: "
                "an overloaded machine?); its result is dropped and the re-queued copy runs it again (a longer "
                "grace avoids this)", trial.number, grace)


def _tell(storage, trial, tell, grace: int) -> bool:
    """Run ``tell`` (which records the trial's result); False, with a warning, when the trial was already
    failed by another worker (:func:`_taken`); any other error propagates."""
    try:
        tell()
    except Exception:
        if not _taken(storage, trial):
            raise
        _dropped(trial, grace)
        return False
    return True


def _orphans(storage, study, grace: int) -> list[int]:
    """RUNNING trials of ``study`` started over ``grace`` seconds ago with no heartbeat recorded."""
    import datetime

    import sqlalchemy

    engine = getattr(storage, "engine", None)
    if engine is None:
        return []
    cutoff = datetime.datetime.now() - datetime.timedelta(seconds=grace)
    with engine.connect() as c:
        rows = c.execute(sqlalchemy.text(
            "SELECT t.trial_id, t.datetime_start FROM trials t "
            "LEFT JOIN trial_heartbeats h ON t.trial_id = h.trial_id "
            "WHERE t.study_id = :sid AND t.state = 'RUNNING' AND h.trial_id IS NULL"),
            {"sid": study._study_id}).fetchall()
    return [tid for tid, start in rows if start is not None and _as_datetime(start) < cutoff]


def _as_datetime(v):
    import datetime

    return v if isinstance(v, datetime.datetime) else datetime.datetime.fromisoformat(str(v))


def _space_from(job: Job) -> Space:
    return Space(job.space, job.space_source)


def _spawned(job: Job, index: int) -> None:
    logging.basicConfig(level=logging.WARNING)
    try:
        run_worker(job, index)
    except NnsqueezeError as e:
        print(f"worker {index}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        cpu.unshare()


def run_workers(job: Job, workers: int) -> None:
    """``workers`` processes on this machine (this one included), each with cpu_count // workers threads.

    This process first runs one trial alone on every core: it measures the fp32 baseline once,
    with nothing beside it, and warms up (imports, first export, first ONNX Runtime session). Then
    it starts the others: forked on Linux, so they begin with all of that done and the model and
    data in memory, instead of importing everything again (seconds per worker); spawned elsewhere.
    """
    if workers <= 1:
        run_worker(job, 0)
        return
    import multiprocessing as mp

    main = _Worker(job, 0)
    main.run(limit=1)
    main.close()
    job.threads = max(1, (os.cpu_count() or 1) // workers)
    fork = "fork" in mp.get_all_start_methods() and sys.platform.startswith("linux")
    ctx = mp.get_context("fork" if fork else "spawn")
    sent = job if fork or not job.spec else dataclasses.replace(job, model=_Rebuilt(job.spec, job.model))
    procs = [ctx.Process(target=_spawned, args=(sent, i), daemon=False) for i in range(1, workers)]
    old_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(job.threads)
        cpu.share(job.threads, Path(job.out) / TIMING_LOCK, Path(job.out) / PEERS)
        for p in procs:
            p.start()
            # registered now, not when it has started up: a timing in this process meanwhile pauses it too
            cpu.register(p.pid, Path(job.out) / PEERS)
        main.run()
    finally:
        for p in procs:
            if p.pid is not None:
                p.join()
        cpu.unshare()  # this process goes on alone (the chosen recipe's artifact): all the cores again
        torch.set_num_threads(old_threads)
        main.close()
    bad = [(i + 1, p.exitcode) for i, p in enumerate(procs) if p.exitcode]
    if bad:
        raise DataError("--workers", f"worker(s) {', '.join(f'{i} (exit {c})' for i, c in bad)} failed",
                        fix="see the workers' messages above; rerun the same command to resume")
