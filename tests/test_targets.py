import pytest
from torch import nn

from nnsqueeze.errors import TargetError
from nnsqueeze.targets import select


def _model():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)), nn.Linear(8, 2))


def test_class_name_exact_name_and_regex():
    m = _model()
    assert select(m, ["Linear"]).names == ["0", "2.0", "3"]
    assert select(m, ["2.0"]).names == ["2.0"]
    assert select(m, [r"re:2\..*"], supported=(nn.Linear,)).names == ["2.0"]


def test_ignore_is_reported_not_silent():
    sel = select(_model(), ["Linear"], ignore=["3"])
    assert sel.names == ["0", "2.0"]
    assert sel.skipped == [("3", "ignored by recipe")]


def test_unsupported_leaf_is_reported():
    sel = select(_model(), ["re:2\\..*"], supported=(nn.Linear,))
    assert ("2.1", "LayerNorm is not supported by this step") in sel.skipped


def test_regex_must_match_whole_name():
    # 're:2\.' would match '2.0' with re.match; with fullmatch it matches nothing.
    with pytest.raises(TargetError, match="matches no module"):
        select(_model(), ["re:2\\."])


def test_pattern_matching_nothing_is_an_error_naming_it():
    with pytest.raises(TargetError, match="'Conv2d'") as e:
        select(_model(), ["Conv2d"])
    assert "fix:" in str(e.value)
    with pytest.raises(TargetError, match="ignore pattern"):
        select(_model(), ["Linear"], ignore=["nope"])


def test_bad_regex():
    with pytest.raises(TargetError, match="bad regex"):
        select(_model(), ["re:("])
