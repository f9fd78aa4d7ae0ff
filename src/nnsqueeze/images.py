"""Image folders as calibration and evaluation data, and torchvision/timm models by name, for the CLI.

    nnsqueeze compress --model net.py:build --data images:photos/ --image-size 224 --recipe int8 --out d

``images:DIR`` is either an ImageFolder layout (``DIR/<class>/<images>``, the class index is the
position of the folder name in sorted order) or a flat folder of images (unlabelled: the evaluation
targets are then the fp32 model's own top-1 and the metric is ``agreement``). Every image is
converted to RGB, its shorter side resized to ``size / 0.875`` and center-cropped to ``size`` (the
ImageNet evaluation transform of torchvision), then normalised with ``mean``/``std``. Only PIL and
numpy are used: torchvision's compiled ops do not load beside the CPU torch build this project pins.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import call_model, describe, logits
from .errors import DataError, ModelError
from .limits import open_regular, quote

log = logging.getLogger("nnsqueeze")

EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp", ".gif")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_RATIO = 0.875     # torchvision's eval transform: resize to 256, crop 224
MAX_CALIB = 512        # calibration images kept (seeded subset beyond): calibration cost grows with them
MAX_EVAL = 2048        # evaluation images kept: each one is run several times (baseline, ORT, result)
MAX_SIZE = 4096
MAX_IMAGE_BYTES = 256 << 20  # one image file; PIL's own decompression-bomb check bounds its pixels

# Preprocessing known for a model built here (torchvision weights meta, timm's data config).
_KNOWN: "weakref.WeakKeyDictionary[torch.nn.Module, Preprocess]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Preprocess:
    size: int = 224                     # the square crop fed to the model
    resize: int = 256                   # the shorter side before cropping
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD


def parse_floats(text: str | None, option: str) -> tuple[float, ...] | None:
    """``"0.5,0.5,0.5"`` -> three floats (one value is used for every channel)."""
    if text is None:
        return None
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        vals = ()
    if len(vals) not in (1, 3) or not all(math.isfinite(v) for v in vals):
        raise DataError(option, f"{quote(text)} is not 1 or 3 comma-separated numbers",
                        fix=f"e.g. {option} {','.join(map(str, IMAGENET_STD if option == '--std' else IMAGENET_MEAN))}")
    if option == "--std" and min(vals) <= 0:
        raise DataError(option, f"{quote(text)} has a value <= 0: the images would be divided by it",
                        fix="give positive standard deviations, e.g. 0.229,0.224,0.225")
    return vals * 3 if len(vals) == 1 else vals


def preprocess(model: Any = None, size: int | None = None, mean: str | None = None,
               std: str | None = None) -> Preprocess:
    """The options given, else the model's own preprocessing when known, else ImageNet's at 224."""
    known = _KNOWN.get(model) if isinstance(model, torch.nn.Module) else None
    base = known or Preprocess()
    if size is not None:
        if not isinstance(size, int) or not 1 <= size <= MAX_SIZE:
            raise DataError("--image-size", f"must be an integer in [1, {MAX_SIZE}], got {size!r}",
                            fix="e.g. --image-size 224")
        base = Preprocess(size, max(size, round(size / CROP_RATIO)), base.mean, base.std)
    return Preprocess(base.size, base.resize, parse_floats(mean, "--mean") or base.mean,
                      parse_floats(std, "--std") or base.std)


def _scan(root: Path) -> tuple[list[str], list[tuple[Path, int]], int]:
    """(class names, [(file, label)], non-image files skipped); label -1 for a flat folder."""
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise DataError("--data", f"images:{root} {what}",
                        fix="give images:DIR, a folder of images or of one sub-folder of images per class")
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    classes = [p.name for p in entries if p.is_dir()]
    loose = [p for p in entries if not p.is_dir()]  # FIFOs and dangling links too: refused when read
    skipped = sum(1 for p in root.iterdir() if not p.is_dir() and p.name.startswith("."))
    if not classes:
        files = [(p, -1) for p in loose if p.suffix.lower() in EXTENSIONS]
        return [], files, skipped + len(loose) - len(files)
    stray = [p for p in loose if p.suffix.lower() in EXTENSIONS]
    if stray:
        raise DataError(f"--data images:{root}", f"has both class folders ({', '.join(classes[:5])}) and "
                        f"{len(stray)} images beside them, first {stray[0].name}",
                        fix="move every image into its class folder (labelled), or use a flat folder (unlabelled)")
    skipped += len(loose)
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        found = []
        for d, subdirs, names in os.walk(root / name):
            subdirs[:] = sorted(s for s in subdirs if not s.startswith("."))
            for n in sorted(names):
                if Path(n).suffix.lower() in EXTENSIONS and not n.startswith("."):
                    found.append(Path(d) / n)
                else:
                    skipped += 1
        if not found:
            raise DataError(f"--data images:{root}", f"class folder {name!r} holds no images "
                            f"({', '.join(EXTENSIONS)})", fix="add images to it or remove the folder")
        files += [(p, label) for p in found]
    return classes, files, skipped


def _split(files: list[tuple[Path, int]], seed: int) -> tuple[list, list]:
    """Half of each class (rounded down) to evaluation, the rest to calibration; seeded, then capped."""
    g = torch.Generator().manual_seed(seed)
    calib, held = [], []
    for label in sorted({lab for _, lab in files}):
        group = [f for f in files if f[1] == label]
        perm = torch.randperm(len(group), generator=g).tolist()
        k = len(group) // 2
        held += [group[i] for i in perm[:k]]
        calib += [group[i] for i in perm[k:]]
    out = []
    for part, cap in ((calib, MAX_CALIB), (held, MAX_EVAL)):
        perm = torch.randperm(len(part), generator=g).tolist()[:cap]  # mixes the classes in every batch
        out.append([part[i] for i in perm])
    return out[0], out[1]


def _read(path: Path, p: Preprocess) -> tuple[np.ndarray, str]:
    """(uint8 CHW array, original mode) of one image, resized and center-cropped."""
    from PIL import Image

    # A regular file only: a FIFO or a link to a device named x.jpg must not hang or flood the reader.
    with open_regular(path, MAX_IMAGE_BYTES, "image", DataError) as f, Image.open(f) as im:
        im.load()  # decodes now: a truncated or corrupt file fails here, not half-way through a run
        mode = im.mode
        rgb = im.convert("RGB")
    w, h = rgb.size
    scale = p.resize / min(w, h)
    nw, nh = max(p.size, round(w * scale)), max(p.size, round(h * scale))
    rgb = rgb.resize((nw, nh), Image.BILINEAR, reducing_gap=None)
    left, top = int(round((nw - p.size) / 2.0)), int(round((nh - p.size) / 2.0))
    rgb = rgb.crop((left, top, left + p.size, top + p.size))
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1).copy(), mode


class ImageBatches(Sequence):
    """Batches ``(float images, labels)`` kept as uint8 and normalised when read (4x less memory)."""

    def __init__(self, pixels: list[torch.Tensor], labels: list[torch.Tensor | None], p: Preprocess):
        self.pixels, self.labels = pixels, labels
        self.mean = torch.tensor(p.mean).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(p.std).view(1, 3, 1, 1) * 255

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        x = (self.pixels[i].float() - self.mean) / self.std
        return x if self.labels[i] is None else (x, self.labels[i])

    def count(self) -> int:
        return sum(int(t.shape[0]) for t in self.pixels)


def _load(files: list[tuple[Path, int]], p: Preprocess, batch_size: int, modes: set[str],
          bad: list[tuple[Path, str]]) -> ImageBatches:
    """Decode ``files`` into batches; non-RGB modes are added to ``modes``, unreadable files to ``bad``."""
    arrays, labels = [], []
    for path, label in files:
        try:
            a, mode = _read(path, p)
        except Exception as e:  # noqa: BLE001 - any decoder failure means a bad file for the user
            bad.append((path, e.problem if isinstance(e, DataError) else describe(e, 120)))
            continue
        if mode != "RGB":
            modes.add(mode)
        arrays.append(a)
        labels.append(label)
    pix, lab = [], []
    for i in range(0, len(arrays), batch_size):
        pix.append(torch.from_numpy(np.stack(arrays[i:i + batch_size])))
        ys = labels[i:i + batch_size]
        lab.append(None if ys[0] < 0 else torch.tensor(ys, dtype=torch.long))
    return ImageBatches(pix, lab, p)


@torch.no_grad()
def _top1(model: torch.nn.Module, batches: ImageBatches) -> None:
    """Replace the labels of ``batches`` with ``model``'s top-1 predictions (the reference for agreement)."""
    was = model.training
    model.eval()
    try:
        for i in range(len(batches)):
            x = batches[i][0] if batches.labels[i] is not None else batches[i]
            out = logits(call_model(model, x))
            if out.dim() != 2 or out.shape[0] != x.shape[0]:
                raise DataError("--data images", f"the model's output of shape {tuple(out.shape)} is not class "
                                f"logits (batch, classes) for images {tuple(x.shape)}",
                                fix="image data measures classifiers; give a MODULE:FACTORY --data and --metric "
                                "for other models")
            batches.labels[i] = out.argmax(-1)
    finally:
        model.train(was)


def load_images(directory: str | Path, model: torch.nn.Module | None = None, size: int | None = None,
                mean: str | None = None, std: str | None = None, agreement: bool = False, seed: int = 0,
                batch_size: int = 32) -> dict[str, Any]:
    """``{'train', 'calib', 'eval', 'metric'}`` from an image folder (see the module docstring).

    Labelled folders give ``accuracy`` against the folder labels. Unlabelled ones (or ``agreement``)
    label the evaluation images with ``model``'s top-1, measured by ``agreement``; unlabelled
    calibration images get them too, so that steps that train (``train`` = the calibration images)
    learn the fp32 model's predictions. Same folder and seed -> the same batches.
    """
    root = Path(directory).expanduser()
    where = f"images:{directory}"
    p = preprocess(model, size, mean, std)
    classes, files, skipped = _scan(root)
    if len(files) < 2:
        raise DataError(f"--data {where}", f"holds {len(files)} image(s) ({', '.join(EXTENSIONS)}); at least 2 "
                        "are needed, for calibration and evaluation", fix="add images to the folder")
    labelled = bool(classes) and not agreement
    if not labelled and model is None:
        raise DataError(f"--data {where}", "unlabelled images need the model to label them (agreement)",
                        fix="pass model=... or use an ImageFolder layout DIR/<class>/<images>")
    calib_files, eval_files = _split(files, seed)
    if not eval_files:  # every class has one image: nothing left to measure on
        raise DataError(f"--data {where}", f"no class has 2 images, so none is left for evaluation "
                        f"({len(files)} images in {len(classes)} classes)", fix="give at least 2 images per class")
    modes: set[str] = set()
    bad: list[tuple[Path, str]] = []
    calib, held = _load(calib_files, p, batch_size, modes, bad), _load(eval_files, p, batch_size, modes, bad)
    if bad:  # every file is tried first, so that the message counts them all
        path, why = min(bad)
        raise DataError(f"--data {where}", f"{len(bad)} of {len(calib_files) + len(eval_files)} image files cannot "
                        f"be read; first: {path} ({why})", fix="remove or replace the corrupt files (or rename "
                        "files that are not images so that their extension says so)")
    if modes:  # said once, not per image
        log.info("%s: converted images in mode %s to RGB", where, ", ".join(sorted(modes)))
    if not labelled:
        _top1(model, held)
        if not classes:
            _top1(model, calib)
    layout = f"{len(classes)} classes ({', '.join(classes[:8])}{', ...' if len(classes) > 8 else ''})" \
        if classes else "unlabelled"
    log.info("%s: %s, %d images%s; split (seed %d): %d calibration + %d evaluation; %dx%d crops of the "
             "shorter side resized to %d, mean %s, std %s; metric: %s", where, layout, len(files),
             f", {skipped} non-image files skipped" if skipped else "", seed, calib.count(), held.count(),
             p.size, p.size, p.resize, list(p.mean), list(p.std),
             "accuracy" if labelled else "agreement with the fp32 model's top-1")
    return {"train": calib, "calib": calib, "eval": held, "metric": "accuracy" if labelled else "agreement"}


def build_model(spec: str) -> torch.nn.Module:
    """``torchvision:NAME`` or ``timm:NAME``, randomly initialised (load ``--weights`` after)."""
    lib, _, name = spec.partition(":")
    try:
        if lib == "torchvision":
            from .zoo.tvision import import_torchvision
            zoo = import_torchvision().models
        else:
            import timm as zoo
    except Exception as e:  # noqa: BLE001 - not installed, or installed but its compiled ops fail to load
        raise ModelError("--model", f"{spec} needs the {lib} package, which cannot be imported here "
                         f"({describe(e, 200)})", fix=f"install {lib} for this torch build, or pass the model as "
                         "path/file.py:factory (a function that builds the architecture) with --weights FILE") from e
    names = zoo.list_models()
    if name not in names:
        near = difflib.get_close_matches(name, names, n=3)
        raise ModelError("--model", f"{lib} has no model {quote(name)}",
                         fix=f"did you mean {', '.join(near)}?" if near else f"see {lib}'s list_models()")
    if lib == "torchvision":
        model = zoo.get_model(name, weights=None)
        try:  # the eval transform of its default weights: the preprocessing its --weights were trained with
            t = zoo.get_model_weights(name).DEFAULT.transforms()
            _KNOWN[model] = Preprocess(int(t.crop_size[0]), int(t.resize_size[0]), tuple(t.mean), tuple(t.std))
        except Exception as e:  # noqa: BLE001 - no weights registered for it: the defaults apply
            log.info("%s: no preprocessing known (%s); using ImageNet's", spec, describe(e, 100))
    else:
        model = zoo.create_model(name, pretrained=False)
        cfg = zoo.data.resolve_model_data_config(model)
        size = int(cfg["input_size"][-1])
        _KNOWN[model] = Preprocess(size, int(math.floor(size / cfg.get("crop_pct", CROP_RATIO))),
                                   tuple(cfg["mean"]), tuple(cfg["std"]))
    return model
