"""The prefix cache: a trial resumed from a stored prefix gives the same model and report."""

from __future__ import annotations

import torch

import nnsqueeze as nsq
from nnsqueeze.recipe import load_recipe
from nnsqueeze.search.cache import PrefixCache, data_key

from search_helpers import EVALUATE, datasets, model

RECIPE = {"seed": 3, "evaluate": EVALUATE, "steps": [
    {"prune": {"sparsity": 0.5}}, {"finetune": {"epochs": 1, "lr": 1e-3}},
    {"quantize": {"calibration": {"samples": 64}}}]}


def _run(m, d, recipe, cache: PrefixCache | None):
    start = cache.lookup(recipe) if cache else None
    return nsq.compress(m, recipe, train_data=d["train"], calib_data=d["calib"], eval_data=d["eval"], progress=False,
                        start=start, on_step=(lambda cp, ctx: cache.store(recipe, cp)) if cache else None)


def test_cached_prefix_gives_the_same_result(tmp_path):
    m, d = model(), datasets()
    recipe = load_recipe(RECIPE)
    plain = _run(m, d, recipe, None)
    cache = PrefixCache(tmp_path / "cache", m, data_key(d["train"], d["calib"], d["eval"]))
    first = _run(m, d, recipe, cache)
    assert (cache.hits, cache.stores) == (0, 2)  # after prune, after finetune (not the whole recipe)
    again = _run(m, d, recipe, cache)
    assert cache.hits == 1  # the longest prefix: prune + finetune
    for r in (first, again):
        sd, ref = r.model.state_dict(), plain.model.state_dict()
        assert sd.keys() == ref.keys()
        assert all(torch.equal(sd[k], ref[k]) for k in ref)
        assert r.report["compressed"]["accuracy"] == plain.report["compressed"]["accuracy"]
        assert [s["name"] for s in r.report["steps"]] == ["prune", "finetune", "quantize"]
        assert [s.get("accuracy") for s in r.report["steps"]] == [s.get("accuracy") for s in plain.report["steps"]]
        assert r.records[0]["record"] == plain.records[0]["record"]
    # the artifact of a resumed run loads like any other
    out = again.save(tmp_path / "art")
    loaded = nsq.load(out, model())
    x = d["eval"][0][0]
    assert torch.allclose(loaded(x), again.model(x))


def test_key_depends_on_prefix_seed_and_data(tmp_path):
    m, d = model(), datasets()
    c = PrefixCache(tmp_path, m, data_key(d["train"]))
    r = load_recipe(RECIPE)
    other = load_recipe({**RECIPE, "steps": [{"prune": {"sparsity": 0.6}}] + RECIPE["steps"][1:]})
    reseeded = load_recipe({**RECIPE, "seed": 4})
    assert c.key(r, 1) != c.key(other, 1)
    assert c.key(r, 2) != c.key(reseeded, 2)
    assert c.key(r, 1) == c.key(load_recipe({**RECIPE, "steps": RECIPE["steps"][:1] + [{"finetune": {}}]}), 1)
    assert PrefixCache(tmp_path, m, data_key(d["eval"])).key(r, 1) != c.key(r, 1)


def test_gradual_pruning_point_is_not_stored(tmp_path):
    m, d = model(), datasets()
    recipe = load_recipe({"evaluate": EVALUATE, "steps": [{"prune": {"sparsity": 0.5, "schedule": "gradual"}},
                                                          {"finetune": {"epochs": 1}}, {"quantize": {}}]})
    cache = PrefixCache(tmp_path, m, "d")
    _run(m, d, recipe, cache)
    # the pruning callbacks live inside the run (and stay for any later training step): no point is stored
    assert cache.stores == 0
