"""``nsq.search``: check the inputs, open (or resume) the study in DIR, run the workers, and write
the front (``front.json``, ``front.png``), the chosen recipe (``best.yaml``) and its artifact
(``best/``). See docs/search.md.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable

from torch import nn

from ..errors import ArtifactError, DataError, RecipeError
from ..safeio import marker_ok, probe_writable, write_file
from . import front as fr
from .cache import PrefixCache, data_key
from .space import Space, load_space
from .study import (BASELINES, CACHE, DB, MARKER, PEERS, SEARCH_FORMAT, TIMING_LOCK, Job, SearchResult,
                    open_storage, redact, study_name)
from .workers import run_workers

OWNED = (MARKER, DB, DB + ".lock", CACHE, "front.json", "front.png", "best.yaml", "best", "report.html", ".search.lock",
         TIMING_LOCK, PEERS, BASELINES)


def check_args(max_drop, target_latency, target_size, trials, workers, sampler, pick) -> None:
    def bad(where, problem, fix):
        raise RecipeError(where, problem, fix=fix)

    if not isinstance(max_drop, (int, float)) or not math.isfinite(max_drop) or max_drop < 0:
        bad("--max-drop", f"must be a finite number >= 0, got {max_drop!r}", "e.g. 0.01 (one accuracy point)")
    for name, v in (("--target-latency", target_latency), ("--target-size", target_size)):
        if v is not None and (not math.isfinite(v) or v <= 0):
            bad(name, f"must be a positive number, got {v!r}", "latency in ms, size in bytes")
    if trials < 1:
        bad("--trials", f"must be at least 1, got {trials}", "e.g. --trials 40")
    if workers < 1:
        bad("--workers", f"must be at least 1, got {workers}", "e.g. --workers 2")
    if sampler not in ("nsga2", "tpe"):
        bad("--sampler", f"unknown sampler {sampler!r}", "use nsga2 or tpe")
    if pick is not None and pick < 0:
        bad("--pick", f"a trial number is >= 0, got {pick}", "see the trial column of the front table")


def _prepare_out(out: Path, overwrite: bool, marker: dict[str, Any]) -> bool:
    """Check DIR before anything runs; True when it holds this search already (resume)."""
    if os.path.lexists(out) and not out.is_dir():
        raise ArtifactError(f"--out {out}", "exists and is not a directory", fix="choose another --out path")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    ours = out.is_dir() and marker_ok(out / MARKER) and \
        json.loads((out / MARKER).read_text()).get("kind") == "nnsqueeze-search"
    if ours and not overwrite:
        old = json.loads((out / MARKER).read_text())
        if old.get("study_name") != marker["study_name"] or old.get("storage") != marker["storage"]:
            raise ArtifactError(f"--out {out}", "holds a search of another model, data, space, settings or "
                                f"storage (study {old.get('study_name')} in {old.get('storage')}); resuming it with "
                                "these would mix two searches", fix="rerun with the same arguments to resume it, use "
                                "a new --out, or pass --overwrite to start over")
        return True
    if entries and not overwrite:
        raise ArtifactError(f"--out {out}", "is a non-empty directory that is not an nnsqueeze search",
                            fix="choose a new or empty directory (an existing search directory resumes), or pass "
                            "--overwrite to write beside the files there")
    if entries and not ours:
        clash = sorted(set(entries) & set(OWNED))
        if clash:
            raise ArtifactError(f"--out {out}", f"is not an nnsqueeze search but holds {', '.join(clash)}, which "
                                "nnsqueeze did not write; not replacing them", fix="choose a new or empty directory")
    probe_writable(out, f"--out {out}")
    return False


def _wipe(out: Path) -> None:
    """--overwrite on a search directory of ours: remove only our names, keep everything else."""
    for name in OWNED:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif os.path.lexists(p):
            p.unlink()


def search(model: nn.Module, space: Space | str | Path | dict, *, train_data: Iterable | None = None,
           calib_data: Iterable | None = None, eval_data: Iterable | None = None,
           metric: str | Callable = "accuracy", max_drop: float, target_latency: float | None = None,
           target_size: float | None = None, trials: int = 40, out: str | Path, workers: int = 1,
           sampler: str = "nsga2", seed: int = 0, storage: str | None = None, pick: int | None = None,
           overwrite: bool = False, cache: bool = True, higher_is_better: bool = True,
           heartbeat: int = 5, grace: int = 15, model_spec: str | None = None,
           enqueue: Iterable[dict] | None = None) -> SearchResult:
    """Search ``space`` for recipes on the Pareto front of metric drop, ONNX bytes and ONNX Runtime
    latency, within ``max_drop`` (and ``target_latency`` ms / ``target_size`` bytes when given).

    ``out`` holds the study (``study.db`` unless ``storage``), the prefix cache, the front and the
    chosen recipe; an existing search ``out`` of the same arguments resumes (raise ``trials`` to
    extend it). ``pick``: choose that trial instead of the fastest feasible one. ``heartbeat`` /
    ``grace`` (seconds): how often a running trial proves its worker alive, and how long after its
    last sign of life a trial counts as dead and is re-queued. ``model_spec`` (``MODULE:FACTORY``):
    how spawned workers rebuild the model (then given ``model``'s weights) when its class cannot be
    imported by name in a new process (the CLI passes its ``--model``). ``enqueue``: param values
    (``{"prune.sparsity": 0.5, ...}``; params left out are sampled) for the first trials, before the
    sampler's own, e.g. recipes known to work; each is enqueued once per study, also on resume."""
    from ..data import as_batches
    from ..metrics import get_metric
    from ..pipeline import check_model

    check_args(max_drop, target_latency, target_size, trials, workers, sampler, pick)
    space = load_space(space)
    if space.export is not None and space.export.get("onnx", {}) is None:
        raise RecipeError(f"{space.source}: export.onnx", "a search measures the ONNX model; export is off",
                          fix="remove 'export: {onnx: null}' from the space")
    queued = [space.check_values(v, f"enqueue[{i}]") for i, v in enumerate(enqueue or [])]
    check_model(model)
    train, calib = as_batches(train_data, "train_data"), as_batches(calib_data, "calib_data")
    evald = as_batches(eval_data, "eval_data", required=True)
    metric_name = get_metric(metric)[1]
    if workers > 1:  # spawned workers get their own copy of everything
        train, calib, evald = (list(d) if d is not None else None for d in (train, calib, evald))
        try:
            pickle.dumps((model if model_spec is None else None, metric))
        except Exception as e:  # noqa: BLE001 - a lambda metric, a model class defined in __main__...
            raise DataError("--workers", f"the model or metric cannot be sent to worker processes: {e}",
                            fix="define them in an importable module (not a lambda or __main__), or use workers=1"
                            ) from e
    out = Path(out).resolve()
    key = data_key(train, calib, evald)
    settings = {"metric": metric_name, "max_drop": max_drop, "target_latency": target_latency,
                "target_size": target_size, "sampler": sampler, "seed": seed, "higher_is_better": higher_is_better}
    name = study_name(space, model, key, settings)
    url = storage or f"sqlite:///{out / DB}"
    marker = {"format_version": SEARCH_FORMAT, "kind": "nnsqueeze-search", "study_name": name,
              "storage": "study.db" if storage is None else redact(storage), "settings": settings,
              "space": space.raw}
    resume = _prepare_out(out, overwrite, marker)
    if storage is not None:  # an unreachable server fails here, before anything is written
        open_storage(url, heartbeat, grace)
    if overwrite and not resume:
        _wipe(out)
    out.mkdir(parents=True, exist_ok=True)
    import optuna

    study = optuna.create_study(study_name=name, storage=open_storage(url, heartbeat, grace),
                                directions=["minimize"] * 3, load_if_exists=True)
    for values in queued:  # once: a resumed search, or a second machine, finds them queued or run
        study.enqueue_trial(values, skip_if_exists=True)
    if not resume:
        write_file(out / MARKER, json.dumps(marker, indent=2, default=str).encode(), "--out")
    job = Job(model, space.raw, space.source, train, calib, evald, metric, float(max_drop), target_latency,
               target_size, trials, str(out), url, name, sampler, seed, heartbeat, grace, cache, higher_is_better,
               spec=model_spec)
    run_workers(job, workers)
    return finish(job, space, pick)


def _rows(study, lims: dict) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state.name != "COMPLETE" or "figures" not in t.user_attrs or "duplicate_of" in t.user_attrs:
            continue  # a duplicate's figures are its twin's row
        r = {"trial": t.number, **t.user_attrs["figures"], "steps": t.user_attrs.get("steps", []),
             "recipe": t.user_attrs.get("recipe"), "cache_reused_steps": t.user_attrs.get("cache_reused_steps", 0),
             "seconds": t.user_attrs.get("seconds")}
        r["feasible"] = all(v <= 0 for v in fr.violations(r, lims))
        rows.append(r)
    # One reference for every speed-up: the median of the fp32 baselines all trials measured. Each
    # trial's own baseline is one noisy timing, and a per-trial ratio could order trials against
    # their latencies (a faster trial shown with a smaller speed-up).
    base = sorted(r["baseline_latency_ms"] for r in rows if r.get("baseline_latency_ms"))
    if base:
        ref = base[len(base) // 2] if len(base) % 2 else 0.5 * (base[len(base) // 2 - 1] + base[len(base) // 2])
        for r in rows:
            r["speedup"] = ref / r["latency_ms"] if r["latency_ms"] else math.inf
            r["reference_latency_ms"] = ref
    return rows


def finish(job: Job, space: Space, pick: int | None = None) -> SearchResult:
    """Read the study, write front.json / front.png / best.yaml / best/, and return the result."""
    import optuna

    from ..pipeline import compress
    from ..recipe import Recipe

    out = Path(job.out)
    study = optuna.load_study(study_name=job.study_name, storage=open_storage(job.storage, job.heartbeat, job.grace))
    lims = fr.limits(job.max_drop, job.target_latency, job.target_size)
    trials = study.get_trials(deepcopy=False)
    rows = _rows(study, lims)
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    front = fr.pareto([r for r in rows if r["feasible"]])
    hits = sum(1 for t in trials if t.user_attrs.get("cache_reused_steps"))
    dups = sum(1 for t in trials if t.state.name == "COMPLETE" and "duplicate_of" in t.user_attrs)
    res = SearchResult(out, rows, front, None, len(rows) + dups + len(pruned), len(pruned), hits, job.study_name,
                       redact(job.storage), duplicates=dups)
    summary = {"format_version": SEARCH_FORMAT, "study_name": job.study_name, "trials": res.trials,
               "complete": len(rows), "pruned": len(pruned), "cache_hits": hits,
               "duplicates": dups,
               "constraints": {k: v[1] for k, v in lims.items()}, "metric": job.metric if isinstance(job.metric, str)
               else getattr(job.metric, "__name__", "metric"), "best": None, "front": front, "rows": rows,
               "pruned_trials": [{"trial": t.number, "reason": t.user_attrs.get("pruned", "")} for t in pruned]}
    if rows:
        write_file(out / "front.png", fr.plot_png(rows, front, job.max_drop), "--out")
    if not front and pick is None:
        summary["closest"] = res.closest = fr.closest(rows, lims) if rows else None
        write_file(out / "front.json", json.dumps(summary, indent=2, default=str).encode(), "--out")
        if not rows:
            reasons = sorted({t.user_attrs.get("pruned", "")[:160] for t in pruned})[:3]
            raise RecipeError("search", f"no trial completed ({len(pruned)} pruned: {'; '.join(reasons)})",
                              fix="loosen --max-drop, widen the space, or add a fine-tuning step")
        c = res.closest
        near = c["constraints"][c["closest"]]
        detail = "; ".join(f"{n} {v['limit']:g}: best {v['best']:.4g} (trial {v['trial']}, "
                           f"{'over' if v['over'] > 0 else 'within'} by {abs(v['over']):.4g})"
                           for n, v in c["constraints"].items())
        raise RecipeError(f"--{c['closest'].replace('_', '-')}", f"no trial meets every constraint; closest: "
                          f"{c['closest']} missed by {near['over']:.4g} (trial {near['trial']}); {detail}",
                          fix=f"loosen the constraints or widen the space; trial {c['closest_trial']} comes closest "
                          "to all (see front.json, or --pick it)")
    best = fr.choose(front, pick, rows)
    if best is None:
        raise RecipeError("--pick", f"trial {pick} is not a complete trial of this search",
                          fix=f"complete trials: {', '.join(str(r['trial']) for r in rows) or 'none'}")
    res.best, summary["best"] = best, best["trial"]
    recipe = Recipe.from_dict(best["recipe"], f"trial {best['trial']}")
    old = json.loads((out / "front.json").read_text()) if (out / "front.json").is_file() else {}
    if old.get("best") != best["trial"] or not (out / "best" / "nnsqueeze.json").is_file():
        # the chosen trial's model again (its prefix from the cache): the artifact, via the usual save
        pc = PrefixCache(out / CACHE, job.model, data_key(job.train, job.calib, job.evald), job.cache)
        result = compress(job.model, recipe, train_data=job.train, calib_data=job.calib, eval_data=job.evald,
                          metric=job.metric, progress=False, start=pc.lookup(recipe))
        result.save(out / "best", overwrite=True)
    write_file(out / "best.yaml", (f"# trial {best['trial']} of study {job.study_name}\n" + recipe.to_yaml()).encode(),
               "--out")
    write_file(out / "front.json", json.dumps(summary, indent=2, default=str).encode(), "--out")
    res.summary = summary
    return res
