"""The low-bit presets end to end through compress(): export verified in ORT, save, load, same outputs."""

from __future__ import annotations

import pytest
import torch

import nnsqueeze as nsq
from tiny_cnn import TinyCNN, make_data


@pytest.mark.parametrize("preset,overrides", [
    ("w4a8-adaround",
     {"steps": [{"quantize": {"weights": {"bits": 4, "clip": "mse", "adaround": {"iters": 20, "samples": 32}}}}]}),
    ("int4-qat",
     {"steps": [{"qat": {"weights": {"bits": 4}, "freeze_bn_after": 2}}, {"finetune": {"steps": 4, "lr": 1.0e-3}}]}),
    ("mixed-int4", None),
])
def test_low_bit_preset_end_to_end(preset, overrides, tmp_path):
    torch.manual_seed(0)
    model = TinyCNN().eval()
    train, calib, ev = make_data(4, seed=1), make_data(2, seed=2), make_data(2, seed=3)
    import yaml

    from nnsqueeze.recipe import PRESETS_DIR, load_recipe
    raw = yaml.safe_load((PRESETS_DIR / f"{preset}.yaml").read_text())
    fast = {"evaluate": {"warmup": 0, "runs": 1, "threads": 1, "per_step": False}}
    recipe = load_recipe({**raw, **fast, **(overrides or {})})  # same steps, shorter where slow (fast test)
    res = nsq.compress(model, recipe, train_data=train, calib_data=calib, eval_data=ev, progress=False)
    exp = res.report["export"]["compressed"]
    assert exp["ort_int8_ops"] and exp["max_abs_diff"] <= exp["tolerance"]
    res.save(tmp_path / "out")
    torch.manual_seed(1)
    loaded = nsq.load(tmp_path / "out", TinyCNN())
    x = ev[0][0]
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), res.model.eval()(x))
