"""The new quantization presets end to end on a small model: compress, export, verify, save, load."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nnsqueeze as nsq
from nnsqueeze.errors import RecipeError


class TextNet(nn.Module):
    """Embedding + MLP over tokens, odd widths (exercises Linear and Embedding paths)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(97, 40)
        self.body = nn.Sequential(nn.Linear(40, 150), nn.GELU(), nn.Linear(150, 40))
        self.head = nn.Linear(40, 5)

    def forward(self, ids):
        return self.head(self.body(self.emb(ids)).mean(1))


def _data(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 97, (16, 7), generator=g), torch.randint(0, 5, (16,), generator=g)) for _ in range(n)]


EXPECT = {"int8-dynamic": {"DynamicQuantizeMatMul"}, "w8-weight-only": {"MatMulNBits"},
          "w4-g128": {"MatMulNBits"}, "fp16": set(), "bf16": set()}


@pytest.mark.parametrize("preset", list(EXPECT))
def test_preset_end_to_end(preset, tmp_path):
    torch.manual_seed(0)
    model = TextNet().eval()
    res = nsq.compress(model, preset, calib_data=_data(1), eval_data=_data(2, 1), progress=False)
    exp = res.report["export"]["compressed"]
    assert set(exp["ort_int8_ops"]) == EXPECT[preset]
    assert exp["size_bytes"] < 0.62 * res.report["export"]["baseline"]["size_bytes"]
    res.save(tmp_path / "out")
    again = nsq.load(tmp_path / "out", model=TextNet())
    x = _data(1, 5)[0][0]
    with torch.no_grad():
        assert torch.equal(again.eval()(x), res.model.eval()(x))
    assert res.report["layers"]


def test_weight_only_config_errors():
    with pytest.raises(RecipeError):
        nsq.load_recipe([{"weight-only": {"bits": 3}}])
    with pytest.raises(RecipeError):
        nsq.load_recipe([{"weight-only": {"group_size": 100}}])
    with pytest.raises(RecipeError):
        nsq.load_recipe([{"half": {"dtype": "float8"}}])
    with pytest.raises(RecipeError):
        nsq.load_recipe([{"quantize-dynamic": {"weights": {"bits": 4}}}])


def test_dynamic_ignore_and_symmetric(tmp_path):
    model = TextNet().eval()
    recipe = [{"quantize-dynamic": {"weights": {"symmetric": True, "reduce_range": True}, "ignore": ["head"]}}]
    res = nsq.compress(model, recipe, calib_data=_data(1), progress=False)
    assert type(res.model.head) is nn.Linear and res.model.body[0].bits == 7
    assert res.report["export"]["compressed"]["ort_int8_ops"] == {"DynamicQuantizeMatMul": 2}
