import pytest
import torch

from nnsqueeze.data import as_batches, call_model, logits, split, take
from nnsqueeze.errors import DataError


def test_generators_are_materialised_once():
    gen = ((torch.zeros(2, 3), torch.zeros(2)) for _ in range(3))
    data = as_batches(gen, "calib_data")
    assert len(list(data)) == 3 and len(list(data)) == 3


@pytest.mark.parametrize("data, words", [
    ([], "empty"),
    (torch.zeros(3), "bare tensor"),
    (5, "not iterable"),
    (["a", "b"], "a batch is a str"),
])
def test_bad_data_is_a_data_error(data, words):
    with pytest.raises(DataError, match=words):
        as_batches(data, "eval_data")


def test_required_data():
    with pytest.raises(DataError, match="train_data: no data given"):
        as_batches(None, "train_data", required=True)


def test_split_and_call():
    x, y = torch.randn(4, 3), torch.arange(4)
    assert split((x, y))[1] is y
    d = {"input": x, "labels": y}
    assert split(d) == (d, y)
    assert torch.equal(call_model(lambda input, labels: input + 1, d), x + 1)
    assert torch.equal(logits((x, y)), x)


def test_take_counts_examples():
    data = [(torch.zeros(10, 2), None)] * 5
    assert len(take(data, 25)) == 3 and len(take(data, None)) == 5
