"""The search itself: an optuna study whose trials are recipes run by ``nsq.compress``.

Each trial samples a recipe from the space, runs it (from the longest cached prefix), and
records the metric drop, the ONNX bytes and the ONNX Runtime latency as its three objectives
(all minimized) with the full figures as user attrs. A trial whose drop exceeds ``max_drop``
after a step that no later training step can repair is pruned there.

The study lives in ``DIR/study.db`` (SQLite) or ``storage`` (any optuna RDB URL). Workers
(processes here or on other machines) share it; each running trial writes a heartbeat, and a
trial whose process died (no heartbeat for ``grace`` seconds) is marked failed and re-queued
with the same parameters, so an interrupted search resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import cpu
from ..errors import DataError, MetricError, ModelError, NnsqueezeError, RecipeError
from ..registry import STEPS
from ..safeio import file_lock
from . import front as fr
from .baselines import SharedBaselines
from .cache import PrefixCache, data_key, model_key
from .space import Space, load_space

log = logging.getLogger("nnsqueeze")
MARKER, DB, CACHE = "search.json", "study.db", "cache"
TIMING_LOCK = ".timing.lock"  # workers on one machine time latency one at a time
PEERS = ".workers"  # a file per worker process on this machine: whoever times pauses the others
BASELINES = "baselines"  # the fp32 figures, measured once per search (nnsqueeze.search.baselines)
SEARCH_FORMAT = 1
DONE = ("COMPLETE", "PRUNED")


@dataclass
class SearchResult:
    out: Path
    rows: list[dict[str, Any]]  # every complete trial
    front: list[dict[str, Any]]  # the feasible, non-dominated ones
    best: dict[str, Any] | None
    trials: int  # finished trials (complete + pruned)
    pruned: int
    cache_hits: int
    study_name: str
    storage: str
    closest: dict[str, Any] | None = None
    duplicates: int = 0  # complete trials whose recipe an earlier trial ran (its figures reused, not in rows)
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class Job:
    """Everything a worker process needs (pickled to spawned workers)."""

    model: nn.Module
    space: dict[str, Any]
    space_source: str
    train: Any
    calib: Any
    evald: Any
    metric: Any
    max_drop: float
    target_latency: float | None
    target_size: float | None
    trials: int
    out: str
    storage: str
    study_name: str
    sampler: str
    seed: int
    heartbeat: int
    grace: int
    cache: bool
    higher_is_better: bool
    threads: int | None = None
    spec: str | None = None  # MODULE:FACTORY that rebuilds the model in spawned workers (the CLI's --model)


class _Rebuilt:
    """The model as a spawned worker rebuilds it: the factory, then the parent's exact weights."""

    def __init__(self, spec: str, model: nn.Module):
        self.spec, self.state = spec, {k: v.detach().clone() for k, v in model.state_dict().items()}

    def build(self) -> nn.Module:
        from ..inputs import call_factory

        m = call_factory(self.spec, "--model", ModelError)
        m.load_state_dict(self.state)
        return m


# ---------------------------------------------------------------------------- storage

def open_storage(url: str, heartbeat: int, grace: int):
    """An optuna RDB storage with heartbeats and retry of dead trials; DataError when unreachable."""
    import optuna
    from optuna.storages import RDBStorage

    _quiet()
    try:  # optuna >= 4.9 renamed the retry callback; older ones have only the first name
        from optuna.storages import RetryHeartbeatStaleTrialCallback as Retry
        retry = {"heartbeat_stale_trial_callback": Retry(max_retry=3)}
    except ImportError:
        from optuna.storages import RetryFailedTrialCallback as Retry
        retry = {"failed_trial_callback": Retry(max_retry=3)}
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        for attempt in range(5):
            try:
                return RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=heartbeat, grace_period=grace,
                                  **retry)
            except Exception as e:  # noqa: BLE001
                # Workers that start together on a new database race to create optuna's schema: the
                # loser's insert of the schema version fails on a UNIQUE constraint while the winner's
                # tables are complete, so opening again succeeds. Anything else is a real failure.
                if not any(w in type(e).__name__ + str(e) for w in ("IntegrityError", "already exists")) \
                        or attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))
    except Exception as e:  # noqa: BLE001 - a bad URL, a missing driver, a server that does not answer
        raise DataError("--storage", f"cannot open the study storage {redact(url)}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''}",
                        fix="give a reachable optuna storage URL, e.g. sqlite:///DIR/study.db or "
                        "postgresql://user:pass@host/db (its driver installed: psycopg2, pymysql)") from None
    finally:
        optuna.logging.set_verbosity(optuna.logging.WARNING)


def _quiet() -> None:
    """optuna flags heartbeats, stale-trial checks and retries as experimental, and heartbeats outside
    Study.optimize: this module runs them on purpose (ask/tell with its own heartbeat thread)."""
    import warnings

    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        return f"{scheme}://{cred.split(':')[0]}:***@{host}"
    return url


def _sampler(kind: str, seed: int, trials: int, lims: dict):
    import optuna

    def constraints(t) -> list[float]:
        return t.user_attrs.get("constraints") or [1.0] * len(lims)

    # optuna >= 5 takes constraints per trial (_constrain); older versions through the sampler
    kw = {} if hasattr(optuna.trial.Trial, "set_constraint") else {"constraints_func": constraints}
    if kind == "nsga2":  # a population ~ a quarter of the budget: several generations, not one random one
        return optuna.samplers.NSGAIISampler(population_size=max(4, min(50, trials // 4)), seed=seed, **kw)
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=max(4, min(10, trials // 4)),
                                          **kw)
    raise RecipeError("sampler", f"unknown sampler {kind!r}", fix="use nsga2 or tpe")


def _constrain(trial, names: list[str], values: list[float]) -> None:
    """Constraint values (<= 0: met) for the samplers, and as a user attr for older optuna and us."""
    trial.set_user_attr("constraints", values)
    if hasattr(trial, "set_constraint"):
        for n, v in zip(names, values):
            trial.set_constraint(n, v)




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


# ---------------------------------------------------------------------------- one trial

class _Pruned(Exception):
    def __init__(self, reason: str, drop: float | None = None):
        super().__init__(reason)
        self.reason, self.drop = reason, drop


class _Objective:
    def __init__(self, job: Job, space: Space, cache: PrefixCache):
        from ..metrics import get_metric

        self.job, self.space, self.cache = job, space, cache
        self.sign = 1.0 if job.higher_is_better else -1.0
        self.lims = fr.limits(job.max_drop, job.target_latency, job.target_size)
        self.metric_name = get_metric(job.metric)[1]
        # the fp32 model's export and figures: measured once per search, by whichever worker is first
        self.baselines = SharedBaselines(Path(job.out) / BASELINES)

    def drop(self, base: float, value: float) -> float:
        return self.sign * (base - value)

    def _on_step(self, recipe):
        trains_after = [any(getattr(STEPS.get(e.name), "trains", False) for e in recipe.steps[i:])
                        for i in range(len(recipe.steps) + 1)]

        def hook(cp, ctx) -> None:
            self.cache.store(recipe, cp)
            acc, base = cp.report["steps"][-1].get("accuracy"), cp.baseline.get("accuracy")
            if acc is None or base is None or trains_after[cp.done]:
                return
            d = self.drop(base, acc)
            if d > self.job.max_drop:  # no later step trains: the drop cannot be repaired
                raise _Pruned(f"metric drop {d:.4g} > max_drop {self.job.max_drop:g} after step {cp.done} "
                              f"({recipe.steps[cp.done - 1].name}) and no training step follows", d)
        return hook

    def _finished_twin(self, trial):
        """A finished trial of this study whose recipe equals ``trial``'s (samplers repeat themselves,
        NSGA-II often: every duplicate would re-run the same steps and re-measure the same model)."""
        from optuna.trial import TrialState

        recipe = trial.user_attrs["recipe"]
        for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
            if t.number != trial.number and t.user_attrs.get("recipe") == recipe and \
                    (t.state == TrialState.PRUNED or "figures" in t.user_attrs):
                return t
        return None

    def _copy(self, trial, twin) -> tuple[float, float, float]:
        trial.set_user_attr("duplicate_of", twin.number)
        trial.set_user_attr("seconds", 0.0)
        if twin.state.name == "PRUNED":
            raise _Pruned(f"same recipe as trial {twin.number}: {twin.user_attrs.get('pruned', 'pruned')}",
                          twin.user_attrs.get("pruned_drop"))
        row = twin.user_attrs["figures"]
        for key in ("figures", "notes", "cache_reused_steps", "cache_hit"):
            if key in twin.user_attrs:
                trial.set_user_attr(key, twin.user_attrs[key])
        _constrain(trial, list(self.lims), fr.violations(row, self.lims))
        log.info("trial %d: the recipe of trial %d, figures reused", trial.number, twin.number)
        return row["drop"], float(row["size_bytes"]), float(row["latency_ms"])

    def __call__(self, trial) -> tuple[float, float, float]:
        from ..pipeline import compress

        values = self.space.suggest(trial)
        try:
            recipe = self.space.recipe(values)
        except RecipeError as e:
            raise _Pruned(f"invalid recipe: {e}") from None
        if "torch_latency" not in self.space.evaluate:
            # the objective is ONNX Runtime's latency: timing the torch model (the fake-quant simulation,
            # about half a trial's time on the demo CNN) would only hold the workers' timing lock longer
            recipe.evaluate = recipe.evaluate.model_copy(update={"torch_latency": False})
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        trial.set_user_attr("recipe", self.space.recipe_dict(values))
        trial.set_user_attr("steps", [e.name for e in recipe.steps])
        same = self._finished_twin(trial)
        if same is not None:  # the sampler drew a recipe already run: its figures, not a second run
            return self._copy(trial, same)
        hits = self.cache.hits
        start = self.cache.lookup(recipe)
        trial.set_user_attr("cache_reused_steps", start.done if start is not None else 0)
        t0 = time.perf_counter()
        try:
            res = compress(self.job.model, recipe, train_data=self.job.train, calib_data=self.job.calib,
                           eval_data=self.job.evald, metric=self.job.metric, progress=False, start=start,
                           on_step=self._on_step(recipe), baselines=self.baselines)
        except NnsqueezeError as e:
            if isinstance(e, DataError) and not isinstance(e, MetricError) or \
                    isinstance(e, ModelError) and e.where == "model":
                raise  # the user's data or model is broken: every trial would fail the same way
            # this recipe does not fit the model (a step selects nothing, a metric fails on it...)
            raise _Pruned(f"{type(e).__name__}: {e}") from None
        trial.set_user_attr("seconds", time.perf_counter() - t0)
        # where the trial's time went, step by step (steps reused from the cache are not listed)
        trial.set_user_attr("step_seconds", [[s.get("name"), round(float(s.get("seconds", 0.0)), 3)]
                                             for s in res.report.get("steps", [])[start.done if start else 0:]])
        trial.set_user_attr("cache_hit", self.cache.hits > hits)
        b, c = res.report["baseline"], res.report["compressed"]
        bl, cl = b["latency_ms"].get("onnxruntime"), c["latency_ms"].get("onnxruntime")
        if c.get("accuracy") is None or cl is None or c.get("size_bytes") is None:
            raise DataError("search", "a trial needs the metric, the ONNX size and the ONNX Runtime latency",
                            fix="pass eval_data and a metric, and keep export.onnx on in the space")
        row = {"metric": c["accuracy"], "baseline_metric": b["accuracy"],
               "drop": self.drop(b["accuracy"], c["accuracy"]),
               "size_bytes": c["size_bytes"], "baseline_size_bytes": b["size_bytes"], "latency_ms": cl,
               "baseline_latency_ms": bl, "speedup": bl / cl if cl else math.inf,
               "params": c.get("params"), "nonzero_params": c.get("nonzero_params"), "metric_name": self.metric_name}
        trial.set_user_attr("figures", row)
        trial.set_user_attr("notes", res.report.get("notes", [])[:20])
        _constrain(trial, list(self.lims), fr.violations(row, self.lims))
        return row["drop"], float(row["size_bytes"]), float(row["latency_ms"])


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
                trial.set_user_attr("pruned", p.reason)
                if p.drop is not None:
                    trial.set_user_attr("pruned_drop", p.drop)
                drop = p.drop if p.drop is not None else math.inf
                _constrain(trial, list(lims), [drop - job.max_drop] + [0.0] * (len(lims) - 1))
                study.tell(trial, state=TrialState.PRUNED)
                log.info("trial %d pruned: %s", trial.number, p.reason)
                continue
            except BaseException:
                beat.stop()
                study.tell(trial, state=TrialState.FAIL)
                raise
            beat.stop()
            study.tell(trial, values)
            log.info("trial %d: drop %.4g, %d bytes, %.4g ms", trial.number, *values)


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


def study_name(space: Space, model: nn.Module, data: str, settings: dict[str, Any]) -> str:
    """The same model, data, space and settings name the same study (so other machines join it)."""
    text = json.dumps({"space": space.raw, "model": model_key(model), "data": data, **settings},
                      sort_keys=True, default=str)
    return f"nnsqueeze-{space.name or 'search'}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


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
