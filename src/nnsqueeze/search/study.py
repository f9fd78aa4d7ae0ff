"""The search itself: an optuna study whose trials are recipes run by ``nsq.compress``.

Each trial samples a recipe from the space, runs it (from the longest cached prefix), and
records the metric drop, the ONNX bytes and the ONNX Runtime latency as its three objectives
(all minimized) with the full figures as user attrs. A trial whose drop exceeds ``max_drop``
after a step that no later training step can repair is pruned there.

The study lives in ``DIR/study.db`` (SQLite) or ``storage`` (any optuna RDB URL). Workers
(processes here or on other machines) share it; :mod:`nnsqueeze.search.workers` runs them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import DataError, MetricError, ModelError, NnsqueezeError, RecipeError
from ..registry import STEPS
from . import front as fr
from .baselines import SharedBaselines
from .cache import PrefixCache, model_key
from .space import Space

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


def study_name(space: Space, model: nn.Module, data: str, settings: dict[str, Any]) -> str:
    """The same model, data, space and settings name the same study (so other machines join it)."""
    text = json.dumps({"space": space.raw, "model": model_key(model), "data": data, **settings},
                      sort_keys=True, default=str)
    return f"nnsqueeze-{space.name or 'search'}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"
