"""``QuantArgs.full_range``: carried from the step configs and QuantGrid, described, refused where it
means nothing (asymmetric, float formats, non-uniform levels)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from nnsqueeze.ops.rtn import QuantGrid
from nnsqueeze.quant.args import QuantArgs
from nnsqueeze.steps.gptq import GPTQConfig
from nnsqueeze.steps.rtn import WeightOnlyConfig


def test_full_range_is_carried_and_described():
    a = GPTQConfig(bits=4, group_size=64, full_range=True).args()
    assert a.full_range and a.describe() == "int4 group(64) sym full-range"
    assert a == QuantArgs.from_grid(QuantGrid(4, 64, full_range=True))
    assert QuantArgs.from_dict(a.to_dict()) == a
    assert WeightOnlyConfig(bits=8, group_size=-1, full_range=True).args().describe() == "int8 channel sym full-range"
    assert QuantArgs(bits=4).full_range is False and "full-range" not in QuantArgs(bits=4).describe()


@pytest.mark.parametrize("bad", [{"symmetric": False}, {"format": "fp8-e4m3"}, {"levels": "nf4", "bits": 4}])
def test_full_range_refused_where_it_means_nothing(bad):
    with pytest.raises(ValidationError, match="full_range applies to the symmetric uniform int grid"):
        QuantArgs(full_range=True, **bad)
    with pytest.raises(ValidationError, match="full_range: true applies to symmetric grids"):
        GPTQConfig(symmetric=False, full_range=True)
