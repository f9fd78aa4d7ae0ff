"""Benchmark: ``nnsqueeze search`` resumed after a kill, and one worker against two (issue #15).

Three runs of a search on the MNIST-1D demo CNN (the CLI as a user types it), each in its own new
directory:

1. **one worker**: ``--workers 1`` (2 threads); wall time.
2. **two workers**: ``--workers 2`` (1 thread each, two processes on one SQLite study); wall time.
   Two samplers asking in parallel draw other recipes than one does (and a sampler that repeats a
   recipe gets that trial for free), so runs 1 and 2 run the *same* recipes: ``--enqueue`` gives
   both the same ``--trials`` param sets (seeded uniform draws from :data:`UNIFORM`, whose trials
   all run the same steps; only ratios and bit widths vary), and no trial is left to a sampler.
   ``--repeat N`` runs N (one, two) pairs back to back and reports the median of each.
3. **killed and resumed** (the shipped ``cnn`` space): ``--workers 1``; when half the trials are
   finished the whole process group gets SIGKILL (no clean-up), then the same command runs again.
   It must end with exactly ``--trials`` finished trials, and every trial finished before the kill
   must be untouched (same number, values and completion time): nothing recomputed. The trial that was running when the
   process died is marked failed after the heartbeat grace period and re-queued.

The prefix cache is off (``--no-cache``) so that wall times measure parallelism, not cache luck.

    python bench/search_workers.py --trials 24
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import optuna

from nnsqueeze.env import cpu_model
from nnsqueeze.isa import describe


# Every trial runs the same four steps; only the ratios and the weight bits are searched.
UNIFORM = """version: 1
name: uniform-cost
base:
  - structured-prune: {ratio: 0.25, importance: l2}
  - prune: {sparsity: 0.5, scope: global}
  - distill: {epochs: EPOCHS, lr: 5.0e-4, optimizer: adamw, schedule: cosine, alpha: 0.5, temperature: 2.0}
  - quantize:
      weights: {bits: 8, granularity: per-channel, symmetric: true}
      activations: {bits: 8, granularity: per-tensor, symmetric: false}
      calibration: {method: minmax, samples: 256}
params:
  structured-prune.ratio: [0.1, 0.5]
  prune.sparsity: [0.3, 0.9]
  quantize.weights.bits: {choices: [4, 8]}
evaluate: {latency_batch: 256, threads: 2, runs: 10, warmup: 3}
"""


def cli(out: Path, trials: int, workers: int, space: str = "cnn", enqueue: Path | None = None) -> list[str]:
    return [sys.executable, "-m", "nnsqueeze", "-q", "search", "--model", "nnsqueeze.zoo.mnist1d:pretrained",
            "--data", "mnist1d", "--space", space, "--max-drop", "0.02", "--trials", str(trials),
            "--workers", str(workers), "--no-cache", "--out", str(out),
            *(["--enqueue", str(enqueue)] if enqueue is not None else [])]


def fixed_trials(n: int, seed: int = 0) -> list[dict]:
    """``n`` param sets drawn uniformly from :data:`UNIFORM`'s params (the same for every run)."""
    rng = random.Random(seed)
    return [{"structured-prune.ratio": round(rng.uniform(0.1, 0.5), 4),
             "prune.sparsity": round(rng.uniform(0.3, 0.9), 4),
             "quantize.weights.bits": rng.choice([4, 8])} for _ in range(n)]


def study_of(out: Path) -> optuna.Study:
    marker = json.loads((out / "search.json").read_text())
    url = f"sqlite:///{out / 'study.db'}" if marker["storage"] == "study.db" else marker["storage"]
    return optuna.load_study(study_name=marker["study_name"], storage=url)


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False) if t.state.name in ("COMPLETE", "PRUNED")]


def trial_seconds(study: optuna.Study) -> float:
    return sum((t.datetime_complete - t.datetime_start).total_seconds() for t in finished(study))


def run(out: Path, trials: int, workers: int, space: str, enqueue: Path | None = None,
        env: dict | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(cli(out, trials, workers, space, enqueue), check=True, stdout=subprocess.DEVNULL,
                   env=None if env is None else {**os.environ, **env})
    return time.perf_counter() - t0


def killed_and_resumed(out: Path, trials: int) -> dict:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t0 = time.perf_counter()
    p = subprocess.Popen(cli(out, trials, 1), stdout=subprocess.DEVNULL, start_new_session=True)
    half = trials // 2
    while True:
        time.sleep(1.0)
        if (out / "search.json").is_file() and (out / "study.db").is_file():
            try:
                if len(finished(study_of(out))) >= half:
                    break
            except Exception:  # noqa: BLE001 - the study is still being created
                pass
        if p.poll() is not None:
            raise SystemExit(f"the search ended (exit {p.returncode}) before it could be killed")
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    first = time.perf_counter() - t0
    before = {t.number: (t.state.name, t.values, t.datetime_complete) for t in finished(study_of(out))}
    running = [t.number for t in study_of(out).get_trials(deepcopy=False) if t.state.name == "RUNNING"]
    t1 = time.perf_counter()
    subprocess.run(cli(out, trials, 1), check=True, stdout=subprocess.DEVNULL)
    second = time.perf_counter() - t1
    study = study_of(out)
    after = {t.number: (t.state.name, t.values, t.datetime_complete) for t in finished(study)}
    states = {}
    for t in study.get_trials(deepcopy=False):
        states[t.state.name] = states.get(t.state.name, 0) + 1
    return {"finished_at_kill": len(before), "running_at_kill": running, "finished_after": len(after),
            "recomputed": sum(1 for n, v in before.items() if after.get(n) != v),
            "new_trials": len(set(after) - set(before)), "states": states, "first_s": first, "resume_s": second}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--epochs", type=int, default=4, help="distillation epochs per trial in the workers runs "
                    "(more: longer trials, so process start-up weighs less)")
    ap.add_argument("--one-thread", action="store_true", help="also run one worker on 1 thread in each pair")
    ap.add_argument("--repeat", type=int, default=3, help="(one worker, two workers) pairs in the workers part")
    ap.add_argument("--keep", help="keep the three search directories here instead of a temporary one")
    ap.add_argument("--only", choices=["workers", "resume"], help="run one part")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    root_ctx = tempfile.TemporaryDirectory() if args.keep is None else None
    root = Path(args.keep or root_ctx.name)
    root.mkdir(parents=True, exist_ok=True)
    print(f"# search workers and resume, {date.today()}, CPU {cpu_model()} ({describe()['isa']}), "
          f"{os.cpu_count()} cores; demo CNN, {args.trials} trials, --no-cache; workers: space UNIFORM "
          f"(distill {args.epochs} epochs), "
          "resume: space cnn")
    if args.only in (None, "workers"):
        space = root / "uniform.yaml"
        space.write_text(UNIFORM.replace("EPOCHS", str(args.epochs)))
        queue = root / "enqueue.json"
        queue.write_text(json.dumps(fixed_trials(args.trials)))
        print("\n| pair | workers | threads each | finished trials | wall s | sum of trial s |")
        print("|---|---|---|---|---|---|")
        walls: dict[str, list[float]] = {"1": [], "2": [], "1x1": []}
        # "1x1": one worker on 1 thread (OMP_NUM_THREADS=1): what a trial gains from its second thread
        runs = [("1", 1, None), ("2", 2, None)] + ([("1x1", 1, {"OMP_NUM_THREADS": "1"})] if args.one_thread else [])
        for rep in range(args.repeat):
            for tag, workers, env in runs:
                out = root / f"w{tag}-{rep}"
                wall = run(out, args.trials, workers, str(space), queue, env)
                study = study_of(out)
                done = finished(study)
                assert sorted(json.dumps(t.params, sort_keys=True) for t in done) == \
                    sorted(json.dumps(v, sort_keys=True) for v in fixed_trials(args.trials)), "not the queued trials"
                walls[tag].append(wall)
                threads = 1 if env else max(1, (os.cpu_count() or 1) // workers)
                print(f"| {rep + 1} | {workers} | {threads} | {len(done)} | {wall:.1f} | {trial_seconds(study):.1f} |",
                      flush=True)
        ratios = [b / a for a, b in zip(walls["1"], walls["2"])]
        print(f"\nmedian wall: one worker {statistics.median(walls['1']):.1f} s, two workers "
              f"{statistics.median(walls['2']):.1f} s; two / one: median of the pairs' ratios "
              f"{statistics.median(ratios):.2f}x (pairs: {', '.join(f'{r:.2f}' for r in ratios)}; target <= 0.6x)")
        if walls["1x1"]:
            gain = statistics.median(b / a for a, b in zip(walls["1"], walls["1x1"]))
            print(f"one worker on 1 thread / on 2 threads: {gain:.2f}x (the second thread's gain); with perfect "
                  f"sharing two 1-thread workers take {gain / 2:.2f}x the wall time of one 2-thread worker")
    if args.only in (None, "resume"):
        r = killed_and_resumed(root / "resume", args.trials)
        print(f"\nkilled (SIGKILL to the process group) after {r['finished_at_kill']} finished trials "
              f"({r['first_s']:.0f} s; running then: {r['running_at_kill']}); the same command again ran "
              f"{r['new_trials']} more in {r['resume_s']:.0f} s and ended with {r['finished_after']} finished "
              f"(target {args.trials}); trials finished before the kill and changed or recomputed: "
              f"{r['recomputed']}; trial states: {r['states']}")
    if root_ctx is not None:
        root_ctx.cleanup()


if __name__ == "__main__":
    main()
