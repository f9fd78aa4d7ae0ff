"""nsq.search end to end on a tiny MLP: outputs, pruning, constraints, resuming, storage errors."""

from __future__ import annotations

import json

import optuna
import pytest
from search_helpers import EVALUATE, datasets, model, space

import nnsqueeze as nsq
from nnsqueeze.errors import ArtifactError, DataError, RecipeError


def _search(out, **kw):
    d = datasets()
    args = dict(train_data=d["train"], calib_data=d["calib"], eval_data=d["eval"], max_drop=0.05, trials=6,
                out=out, seed=0, heartbeat=1, grace=2)
    args.update(kw)
    return nsq.search(kw.pop("model", None) or model(), args.pop("space", None) or space(), **args)


def _finished(out) -> dict:
    s = json.loads((out / "search.json").read_text())
    study = optuna.load_study(study_name=s["study_name"], storage=f"sqlite:///{out / 'study.db'}")
    return {t.number: (t.state.name, t.datetime_complete) for t in study.get_trials()
            if t.state.name in ("COMPLETE", "PRUNED")}


def test_search_outputs_and_resume(tmp_path):
    out = tmp_path / "s"
    res = _search(out)
    assert res.trials == 6 and len(res.rows) + res.duplicates + res.pruned == 6
    assert res.cache_hits > 0  # the prune prefix is shared by the quantization variants
    assert res.front and res.best["trial"] in {r["trial"] for r in res.front}
    assert all(r["drop"] <= 0.05 for r in res.front)
    summary = json.loads((out / "front.json").read_text())
    assert summary["best"] == res.best["trial"] and summary["cache_hits"] == res.cache_hits
    assert (out / "front.png").read_bytes()[:4] == b"\x89PNG"
    best = nsq.load_recipe(out / "best.yaml")
    assert [e.name for e in best.steps] == res.best["steps"]
    loaded = nsq.load(out / "best", model())
    x = datasets()["eval"][0][0]
    assert loaded(x).shape == (64, 3)
    before = _finished(out)
    # the same call again: a finished search, nothing recomputed
    again = _search(out)
    assert _finished(out) == before and again.best["trial"] == res.best["trial"]
    # raise --trials: the search is extended, the first trials kept as they were
    more = _search(out, trials=8)
    after = _finished(out)
    assert more.trials == 8 and len(after) == 8 and {k: after[k] for k in before} == before
    # --pick: any complete trial
    other = next(r["trial"] for r in more.rows if r["trial"] != more.best["trial"])
    assert _search(out, trials=8, pick=other).best["trial"] == other
    assert f"# trial {other} " in (out / "best.yaml").read_text()


def test_a_repeated_recipe_reuses_its_twins_figures(tmp_path):
    # one possible recipe: the first trial runs it, every later one is its duplicate (nothing re-run)
    sp = space()
    sp["params"] = {"prune.sparsity": {"choices": [0.5]}}
    res = _search(tmp_path / "s", space=sp, trials=4)
    assert res.trials == 4 and len(res.rows) == 1 and res.duplicates == 3 and res.pruned == 0
    s = json.loads((tmp_path / "s" / "search.json").read_text())
    study = optuna.load_study(study_name=s["study_name"], storage=f"sqlite:///{tmp_path / 's' / 'study.db'}")
    first, *rest = sorted(study.get_trials(), key=lambda t: t.number)
    assert "duplicate_of" not in first.user_attrs
    for t in rest:
        assert t.user_attrs["duplicate_of"] == first.number and t.values == first.values
        assert t.user_attrs["seconds"] == 0.0
    assert json.loads((tmp_path / "s" / "front.json").read_text())["duplicates"] == 3


def test_other_settings_refuse_to_resume(tmp_path):
    out = tmp_path / "s"
    _search(out, trials=2, max_drop=1.0)
    with pytest.raises(ArtifactError, match="another model, data, space, settings"):
        _search(out, trials=2, max_drop=0.5)
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="not an nnsqueeze search"):
        _search(user, trials=2)
    assert [p.name for p in user.iterdir()] == ["notes.txt"]


def test_constraint_breaking_trials_are_pruned(tmp_path):
    # no fine-tuning after pruning: a drop over max_drop after the prune step cannot be repaired
    sp = {"base": [{"prune": {"sparsity": 0.9}}, {"quantize": {}}],
          "params": {"prune.sparsity": {"choices": [0.9, 0.95]}}, "evaluate": EVALUATE}
    with pytest.raises(RecipeError, match="no trial completed .*after step 1 \\(prune\\)"):
        _search(tmp_path / "s", space=sp, max_drop=0.0, trials=2)
    summary = json.loads((tmp_path / "s" / "front.json").read_text())
    assert summary["pruned"] == 2 and summary["front"] == []


def test_constraint_nothing_meets_names_the_closest(tmp_path):
    with pytest.raises(RecipeError, match="closest: target_latency missed by") as e:
        _search(tmp_path / "s", max_drop=1.0, target_latency=1e-9, trials=2)
    assert e.value.where == "--target-latency"
    summary = json.loads((tmp_path / "s" / "front.json").read_text())
    assert summary["closest"]["closest"] == "target_latency"


@pytest.mark.parametrize("url", ["sqlite:////nonexistent-dir/x/study.db", "nosuchdb://host/db"])
def test_unreachable_storage(tmp_path, url):
    with pytest.raises(DataError, match="cannot open the study storage"):
        _search(tmp_path / "s", storage=url, trials=1)
    assert not (tmp_path / "s").exists()


def test_bad_arguments_before_anything_is_written(tmp_path):
    for kw, match in (({"max_drop": -1}, "--max-drop"), ({"trials": 0}, "--trials"),
                      ({"sampler": "grid"}, "--sampler"), ({"workers": 0}, "--workers")):
        with pytest.raises(RecipeError, match=match):
            _search(tmp_path / "s", **kw)
    with pytest.raises(DataError, match="eval_data"):
        _search(tmp_path / "s", eval_data=None)
    assert not (tmp_path / "s").exists()


def test_tpe_sampler(tmp_path):
    res = _search(tmp_path / "s", sampler="tpe", trials=3, max_drop=1.0)
    assert res.trials == 3 and res.best is not None


def test_trials_time_only_onnx_runtime_the_chosen_artifact_both(tmp_path, monkeypatch):
    """A trial's objective is ONNX Runtime's latency: trials leave the torch model (the fake-quant
    simulation) untimed, so workers do not hold the timing lock for it; the chosen artifact's report
    still has both."""
    import nnsqueeze.evaluate as ev

    calls = []
    real = ev.torch_latency_ms
    monkeypatch.setattr(ev, "torch_latency_ms", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = tmp_path / "s"
    res = _search(out, trials=3)
    assert res.trials == 3
    assert len(calls) == 2  # the chosen recipe's run only: baseline and compressed
    report = json.loads((out / "best" / "report.json").read_text())
    assert set(report["baseline"]["latency_ms"]) == set(report["compressed"]["latency_ms"]) == {"torch",
                                                                                                 "onnxruntime"}


def test_measure_skips_torch_latency_only_when_onnx_is_timed(tmp_path):
    import torch

    from nnsqueeze.evaluate import measure
    from nnsqueeze.export.onnx import export_onnx

    model = torch.nn.Sequential(torch.nn.Linear(5, 3)).eval()
    x = torch.randn(7, 5)
    path = str(tmp_path / "m.onnx")
    export_onnx(model, path, x)
    kw = dict(eval_data=None, metric=None, latency_inputs=x, threads=1, warmup=0, runs=2, torch_latency=False)
    assert sorted(measure(model, onnx_path=path, **kw)["latency_ms"]) == ["onnxruntime"]
    assert sorted(measure(model, **kw)["latency_ms"]) == ["torch"]  # the only latency there is


def test_enqueued_values_run_first_and_once(tmp_path):
    out = tmp_path / "s"
    first = [{"prune.sparsity": 0.6, "quantize.weights.bits": 8, "finetune": False},
             {"prune.sparsity": 0.3, "quantize.weights.bits": 4, "finetune": True}]
    _search(out, trials=3, enqueue=first)
    s = json.loads((out / "search.json").read_text())
    study = optuna.load_study(study_name=s["study_name"], storage=f"sqlite:///{out / 'study.db'}")
    trials = sorted(study.get_trials(), key=lambda t: t.number)
    assert [trials[0].params, trials[1].params] == first
    _search(out, trials=4, enqueue=first)  # resumed with the same list: not queued again
    params = [t.params for t in study.get_trials()]
    assert len(params) == 4 and params.count(first[0]) == 1 and params.count(first[1]) == 1
    with pytest.raises(RecipeError, match="not a param"):
        _search(tmp_path / "bad", enqueue=[{"prune.spars": 0.5}])
    assert not (tmp_path / "bad").exists()  # refused before anything is written


def test_the_baseline_is_measured_once_per_search(tmp_path):
    out = tmp_path / "s"
    _search(out, trials=3)
    entries = sorted(p.suffix for p in (out / "baselines").iterdir())
    assert entries == [".json", ".onnx"]  # one key: every trial had the same evaluation settings
    stored = json.loads(next((out / "baselines").glob("*.json")).read_text())
    s = json.loads((out / "search.json").read_text())
    study = optuna.load_study(study_name=s["study_name"], storage=f"sqlite:///{out / 'study.db'}")
    lat = {t.user_attrs["figures"]["baseline_latency_ms"] for t in study.get_trials() if "figures" in t.user_attrs}
    assert lat == {stored["figures"]["latency_ms"]["onnxruntime"]}  # every trial compares with that one timing
