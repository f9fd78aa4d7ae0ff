"""images:DIR data (ImageFolder and flat folders) and torchvision:/timm: models by name."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import types

import pytest
import torch
from PIL import Image
from torch import nn

import image_folders  # noqa: E402  (tests/ is on sys.path: pytest's rootdir conftest)
from nnsqueeze.data import as_batches
from nnsqueeze.errors import DataError, ModelError
from nnsqueeze.images import IMAGENET_MEAN, IMAGENET_STD, build_model, load_images
from nnsqueeze.metrics import get_metric


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3))


def test_image_folder_labels_split_and_shapes(tmp_path, caplog):
    root = image_folders.image_folder(tmp_path / "photos")
    with caplog.at_level(logging.INFO, logger="nnsqueeze"):
        d = load_images(root, size=32, batch_size=3)
    assert d["metric"] == "accuracy" and d["train"] is d["calib"]
    # Half of each class (rounded down) is held out: a has 4 images -> 2, b has 4 -> 2.
    assert d["calib"].count() == 4 and d["eval"].count() == 4
    xs, ys = zip(*as_batches(d["eval"], "eval"))
    assert all(x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32 for x in xs)
    assert sorted(torch.cat(ys).tolist()) == [0, 0, 1, 1]
    text = caplog.text
    assert "2 classes (a, b), 8 images, 2 non-image files skipped" in text
    assert "4 calibration + 4 evaluation" in text
    assert text.count("to RGB") == 1 and "converted images in mode L, RGBA to RGB" in text
    again = load_images(root, size=32, batch_size=3)  # seeded: the same split and tensors
    for a, b in zip(d["eval"], again["eval"]):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    other = load_images(root, size=32, batch_size=3, seed=1)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(d["calib"], other["calib"]))


def test_resize_crop_and_normalise_values(tmp_path):
    """A 64x32 image, black left half and (255, 0, 128) right half: the 32-pixel center crop of the
    shorter side resized to 37 keeps both halves, normalised with ImageNet's mean and std."""
    root = tmp_path / "one"
    root.mkdir()
    a = torch.zeros(32, 64, 3, dtype=torch.uint8)
    a[:, 32:] = torch.tensor([255, 0, 128], dtype=torch.uint8)
    for name in ("x.png", "y.png"):
        Image.fromarray(a.numpy()).save(root / name)
    d = load_images(root, model=net(), size=32)
    x = d["eval"][0][0][0]
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x[:, 5, 0], -mean / std)
    torch.testing.assert_close(x[:, 5, 31], (torch.tensor([1.0, 0.0, 128 / 255]) - mean) / std)
    d = load_images(root, model=net(), size=32, mean="0.5", std="0.5")
    torch.testing.assert_close(d["eval"][0][0][0][:, 5, 0], torch.full((3,), -1.0))


def test_flat_folder_is_measured_by_agreement_with_the_models_top1(tmp_path):
    root = image_folders.flat_folder(tmp_path / "flat")
    model = net()
    model.train()
    d = load_images(root, model=model, size=24)
    assert d["metric"] == "agreement" and model.training  # its mode is restored
    assert d["calib"].count() == 3 and d["eval"].count() == 3
    model.eval()
    for x, y in d["eval"]:
        assert torch.equal(y, model(x).argmax(-1))
    agreement, _ = get_metric("agreement")
    assert agreement(model, d["eval"]) == 1.0
    x, y = d["calib"][0]  # calibration images are labelled too: training steps learn the fp32 top-1
    assert torch.equal(y, model(x).argmax(-1))


def test_labelled_folder_with_agreement_relabels_the_eval_images_only(tmp_path):
    root = image_folders.image_folder(tmp_path / "photos")
    model = net().eval()
    d = load_images(root, model=model, size=24, agreement=True)
    assert d["metric"] == "agreement"
    for x, y in d["eval"]:
        assert torch.equal(y, model(x).argmax(-1))
    assert set(torch.cat([y for _, y in d["calib"]]).tolist()) == {0, 1}


def _corrupt(root):
    image_folders.image_folder(root)
    data = (image_folders.SAMPLES / "grace_hopper.jpg").read_bytes()
    (root / "a" / "cut.jpg").write_bytes(data[: len(data) // 3])


def _text_as_jpg(root):
    image_folders.image_folder(root)
    (root / "b" / "readme.jpg").write_text("hello, I am not a JPEG")


def _empty_class(root):
    image_folders.image_folder(root)
    (root / "c").mkdir()
    (root / "c" / "notes.txt").write_text("x")


def _stray(root):
    image_folders.image_folder(root)
    shutil.copy(root / "a" / "wide.png", root / "loose.png")


def _singletons(root):
    for c in "ab":
        (root / c).mkdir(parents=True)
        image_folders.synthetic(root / c / "x.png", (10, 10))


@pytest.mark.parametrize("make, words", [
    (lambda r: None, "does not exist"),
    (lambda r: r.write_text("x"), "is not a directory"),
    (lambda r: r.mkdir(), "holds 0 image(s)"),
    (lambda r: (r.mkdir(), (r / "a.txt").write_text("x")), "holds 0 image(s)"),
    (_corrupt, "1 of 9 image files cannot be read; first: "),
    (_text_as_jpg, "readme.jpg (UnidentifiedImageError"),
    (_empty_class, "class folder 'c' holds no images"),
    (_stray, "images beside them, first loose.png"),
    (_singletons, "no class has 2 images"),
])
def test_bad_folders_raise_data_error_naming_the_problem(tmp_path, make, words):
    root = tmp_path / "photos"
    make(root)
    with pytest.raises(DataError) as e:
        load_images(root, model=net(), size=16)
    assert words in str(e.value) and e.value.fix


def test_fifo_named_jpg_is_refused_without_blocking(tmp_path):
    root = image_folders.flat_folder(tmp_path / "flat")
    os.mkfifo(root / "pipe.jpg")
    with pytest.raises(DataError, match=r"pipe\.jpg .*not a regular file"):
        load_images(root, model=net(), size=16)


def test_corrupt_jpeg_is_named(tmp_path):
    _corrupt(tmp_path / "p")
    with pytest.raises(DataError, match=r"cut\.jpg"):
        load_images(tmp_path / "p", size=16)


@pytest.mark.parametrize("kw, words", [
    ({"size": 0}, "--image-size: must be an integer"),
    ({"mean": "0.1,0.2"}, "--mean: '0.1,0.2' is not 1 or 3"),
    ({"mean": "a,b,c"}, "is not 1 or 3"),
    ({"std": "0.2,0,0.2"}, "--std: '0.2,0,0.2' has a value <= 0"),
    ({"std": "nan"}, "is not 1 or 3"),
])
def test_bad_preprocessing_options(tmp_path, kw, words):
    root = image_folders.flat_folder(tmp_path / "flat")
    with pytest.raises(DataError) as e:
        load_images(root, model=net(), **{"size": 16, **kw})
    assert words in str(e.value)


def test_unlabelled_folder_without_a_model_is_refused(tmp_path):
    with pytest.raises(DataError, match="unlabelled images need the model"):
        load_images(image_folders.flat_folder(tmp_path / "flat"), size=16)


def test_models_that_are_not_classifiers_are_refused_for_agreement(tmp_path):
    root = image_folders.flat_folder(tmp_path / "flat")
    with pytest.raises(DataError, match="is not class logits"):
        load_images(root, model=nn.Conv2d(3, 2, 3), size=16)


@pytest.mark.parametrize("lib", ["torchvision", "timm"])
def test_missing_zoo_package_says_how_to_pass_the_model_instead(monkeypatch, lib):
    monkeypatch.setitem(sys.modules, lib, None)  # import fails, installed or not
    monkeypatch.setitem(sys.modules, f"{lib}.models", None)
    with pytest.raises(ModelError) as e:
        build_model(f"{lib}:resnet18")
    assert f"needs the {lib} package" in str(e.value) and "path/file.py:factory" in e.value.fix


class _Transforms:
    crop_size, resize_size, mean, std = [20], [23], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def _fake_torchvision(monkeypatch):
    """A stand-in exposing the torchvision.models API build_model uses (torchvision cannot load here)."""
    tv, models = types.ModuleType("torchvision"), types.ModuleType("torchvision.models")
    models.list_models = lambda: ["resnet18", "resnet34"]
    models.get_model = lambda name, weights=None: net()
    models.get_model_weights = lambda name: types.SimpleNamespace(
        DEFAULT=types.SimpleNamespace(transforms=_Transforms))
    tv.models = models
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)


def test_torchvision_model_brings_its_preprocessing(monkeypatch, tmp_path):
    _fake_torchvision(monkeypatch)
    with pytest.raises(ModelError, match="did you mean resnet18"):
        build_model("torchvision:resnet81")
    model = build_model("torchvision:resnet18")
    d = load_images(image_folders.flat_folder(tmp_path / "flat"), model=model)
    assert d["eval"][0][0].shape[-2:] == (20, 20)
    assert load_images(tmp_path / "flat", model=model, size=16)["eval"][0][0].shape[-2:] == (16, 16)


def test_timm_model_brings_its_preprocessing(monkeypatch, tmp_path):
    timm = types.ModuleType("timm")
    timm.list_models = lambda: ["mobilenetv3_small_050"]
    timm.create_model = lambda name, pretrained=False: net()
    timm.data = types.SimpleNamespace(resolve_model_data_config=lambda m: {
        "input_size": (3, 18, 18), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 0.9})
    monkeypatch.setitem(sys.modules, "timm", timm)
    model = build_model("timm:mobilenetv3_small_050")
    d = load_images(image_folders.flat_folder(tmp_path / "flat"), model=model)
    assert d["eval"][0][0].shape[-2:] == (18, 18)
