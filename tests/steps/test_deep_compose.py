"""lowrank + prune + distill + cluster in one recipe: save -> nsq.load is exact, ONNX matches torch."""

from __future__ import annotations

import torch
from torch import nn

import nnsqueeze as nsq
from nnsqueeze.steps.cluster import clustered_layers


def test_all_techniques_in_one_recipe(tiny_cnn, toy_data, tmp_path):
    recipe = {"steps": [
        {"lowrank": {"targets": ["classifier.1"], "rank": 4}},
        {"prune": {"targets": ["Conv1d"], "sparsity": 0.5, "schedule": "gradual"}},
        {"distill": {"steps": 6, "lr": 1e-3, "alpha": 0.5, "temperature": 2.0}},
        {"cluster": {"bits": 3}},
        {"distill": {"steps": 4, "lr": 1e-3}},
    ], "evaluate": {"runs": 1, "warmup": 0}}
    res = nsq.compress(tiny_cnn, recipe, train_data=toy_data["train"], calib_data=toy_data["calib"],
                       eval_data=toy_data["eval"], progress=False)
    names = [n for n, _ in clustered_layers(res.model)]
    assert "classifier.1.0" in names and "classifier.1.1" in names and "features.0" in names
    assert isinstance(res.model.classifier[1], nn.Sequential)
    exp = res.report["export"]["compressed"]
    assert exp["max_abs_diff"] <= exp["tolerance"]
    res.save(tmp_path / "out")
    loaded = nsq.load(tmp_path / "out", model=type(tiny_cnn)())
    x = torch.cat([b[0] for b in toy_data["eval"]])
    with torch.no_grad():
        assert torch.equal(loaded(x), res.model.eval()(x))
