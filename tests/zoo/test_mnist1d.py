"""nnsqueeze.zoo.mnist1d: data, model, training, pretrained cache. Nothing is written outside tmp."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nnsqueeze.zoo import mnist1d as m


@pytest.fixture(autouse=True)
def _cache_env(tmp_path, monkeypatch):
    """Default cache -> a per-test tmp dir, so no test can write to ~/.cache."""
    monkeypatch.setenv("NNSQUEEZE_CACHE", str(tmp_path / "default-cache"))


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("mnist1d-cache")


@pytest.fixture(scope="module")
def data(shared_cache):
    return m.load_data(cache_dir=shared_cache)


def _cat(batches):
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def test_data_shapes_and_dtypes(data):
    assert set(data) == {"train", "test", "calib"}
    sizes = {k: sum(len(y) for _, y in v) for k, v in data.items()}
    assert sizes == {"train": 4000, "test": 1000, "calib": 512}
    for split in data.values():
        for x, y in split:
            assert x.dtype == torch.float32 and y.dtype == torch.int64
            assert x.shape[1:] == (1, 40) and x.shape[0] == y.shape[0] <= 128
            assert torch.isfinite(x).all()
    x, y = _cat(data["train"])
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-3  # train statistics
    assert set(y.tolist()) == set(range(10))
    # calib = first 512 training samples, unshuffled: each is somewhere in the (shuffled) train set
    xc, _ = _cat(data["calib"])
    assert all((x == xc[i]).all(dim=(1, 2)).any() for i in range(0, 512, 97))


def test_data_deterministic_and_cache_round_trip(tmp_path, data, shared_cache):
    files = list((shared_cache / "mnist1d").glob("data-seed42-*.npz"))
    assert len(files) == 1
    assert not list((shared_cache / "mnist1d").glob(".*"))  # no temp files left behind
    with np.load(files[0], allow_pickle=False) as f:  # plain arrays, no pickle
        assert set(f.files) == {"x", "y", "x_test", "y_test"}
    fresh = m.load_data(cache_dir=tmp_path)          # generated again from scratch
    cached = m.load_data(cache_dir=shared_cache)     # read back from the .npz
    for other in (fresh, cached):
        for k in data:
            a, b = _cat(data[k]), _cat(other[k])
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    other_seed = m.load_data(seed=1, cache_dir=shared_cache)
    assert not torch.equal(_cat(other_seed["test"])[0], _cat(data["test"])[0])


def test_data_default_cache_dir_and_global_rng(tmp_path, monkeypatch):
    monkeypatch.setenv("NNSQUEEZE_CACHE", str(tmp_path / "env"))
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    d = m.load_data(seed=3, batch_size=500)
    assert np.random.rand() == expected  # mnist1d's global seeding does not leak out
    assert len(list((tmp_path / "env" / "mnist1d").glob("data-seed3-*.npz"))) == 1
    assert [len(y) for _, y in d["train"]] == [500] * 8


def test_model_size_names_and_output():
    model = m.build_model()
    assert sum(p.numel() for p in model.parameters()) >= 50_000
    names = dict(model.named_children())
    assert set(names) == {"features", "classifier"}
    assert isinstance(names["features"], torch.nn.Sequential)
    assert isinstance(names["classifier"], torch.nn.Sequential)
    kinds = {type(mod) for mod in model.modules()} - {torch.nn.Sequential}
    assert kinds <= {torch.nn.Conv1d, torch.nn.BatchNorm1d, torch.nn.ReLU, torch.nn.Flatten, torch.nn.Linear}
    assert model.eval()(torch.randn(7, 1, 40)).shape == (7, 10)


def test_train_smoke_loss_decreases_and_deterministic(data):
    subset = data["train"][:8]  # 1024 samples
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model, losses = m.build_model(), []
        m.train(model, subset, steps=60, seed=1, losses=losses)
        runs.append((model, losses))
    (model, losses), (model2, losses2) = runs
    assert len(losses) == 60 and all(np.isfinite(losses))
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])
    assert losses == losses2
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k
    assert not model.training
    assert 0.0 <= m.evaluate(model, data["test"]) <= 1.0
    assert m.evaluate(model, data["test"]) > 0.3  # well above chance after 60 steps


def test_pretrained_cache_round_trip(tmp_path, monkeypatch, data, shared_cache):
    # a tiny recipe (its own config hash) keeps this fast; the real one is in the slow test
    monkeypatch.setitem(m.TRAIN_CONFIG, "steps", 20)
    (tmp_path / "mnist1d").mkdir()
    for f in (shared_cache / "mnist1d").glob("data-*.npz"):  # reuse the generated data
        (tmp_path / "mnist1d" / f.name).write_bytes(f.read_bytes())
    model = m.pretrained(cache_dir=tmp_path)
    weights = list((tmp_path / "mnist1d").glob("cnn-*.safetensors"))
    metas = list((tmp_path / "mnist1d").glob("cnn-*.json"))
    assert len(weights) == 1 and len(metas) == 1
    assert not list((tmp_path / "mnist1d").glob(".*"))  # no temp files left behind
    meta = json.loads(metas[0].read_text())
    assert meta["config_hash"] in weights[0].name and meta["config"]["train"]["steps"] == 20
    assert meta["test_accuracy"] == pytest.approx(m.evaluate(model, data["test"]))

    def no_torch_load(*a, **k):
        raise AssertionError("torch.load must not be used")

    monkeypatch.setattr(torch, "load", no_torch_load)
    monkeypatch.setattr(m, "train", lambda *a, **k: pytest.fail("should load from cache, not retrain"))
    loaded = m.pretrained(cache_dir=tmp_path)
    assert not loaded.training
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k

    # a corrupt weights file is detected (sha256 in the JSON) and retrained, not loaded
    monkeypatch.undo()
    monkeypatch.setitem(m.TRAIN_CONFIG, "steps", 20)
    weights[0].write_bytes(b"garbage")
    again = m.pretrained(cache_dir=tmp_path)
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k  # training is deterministic


@pytest.mark.slow
def test_pretrained_reaches_95_percent(tmp_path):
    model = m.pretrained(cache_dir=tmp_path)
    data = m.load_data(cache_dir=tmp_path)
    acc = m.evaluate(model, data["test"])
    assert acc >= 0.95
    meta = json.loads(next((tmp_path / "mnist1d").glob("cnn-*.json")).read_text())
    assert meta["test_accuracy"] == pytest.approx(acc)
