"""Image folders for the images:DIR tests: real photos that ship with matplotlib, plus synthetic
PNGs of odd sizes and modes (grayscale, RGBA), and a tiny CNN that classifies them."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image

SAMPLES = Path(__import__("matplotlib.cbook", fromlist=["cbook"]).get_sample_data(
    "grace_hopper.jpg", asfileobj=False)).parent

NET = textwrap.dedent('''
    import torch
    from torch import nn

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU6(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
''')


def synthetic(path: Path, size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Path:
    """A random image of ``size`` (w, h) in ``mode``, saved as PNG."""
    rng = np.random.default_rng(seed)
    shape = {"RGB": (3,), "RGBA": (4,), "L": ()}[mode]
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], *shape), dtype=np.uint8), mode).save(path)
    return path


def image_folder(root: Path) -> Path:
    """``root``/a and ``root``/b: 3 real photos, 5 synthetic PNGs (odd sizes, L and RGBA), 2 non-images."""
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    shutil.copy(SAMPLES / "grace_hopper.jpg", root / "a" / "hopper.jpg")
    shutil.copy(SAMPLES / "logo2.png", root / "b" / "logo.png")
    shutil.copy(SAMPLES / "Minduka_Present_Blue_Pack.png", root / "b" / "pack.png")
    synthetic(root / "a" / "gray.png", (50, 71), "L", seed=1)
    synthetic(root / "a" / "wide.png", (97, 33), seed=2)
    synthetic(root / "a" / "tiny.png", (9, 13), seed=3)
    synthetic(root / "b" / "rgba.png", (90, 31), "RGBA", seed=4)
    synthetic(root / "b" / "tall.png", (40, 120), seed=5)
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "b" / ".DS_Store").write_bytes(b"\0\1")
    return root


def flat_folder(root: Path) -> Path:
    """Unlabelled: 6 images directly in ``root``."""
    root.mkdir(parents=True)
    shutil.copy(SAMPLES / "grace_hopper.jpg", root / "hopper.jpg")
    for i in range(5):
        synthetic(root / f"img{i}.png", (30 + 7 * i, 45 - 3 * i), "L" if i == 2 else "RGB", seed=10 + i)
    return root


SKIMAGE_PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png",
                  "hubble_deep_field.jpg", "retina.jpg", "camera.png")   # camera: grayscale


def skimage_folder(root: Path) -> Path:
    """Unlabelled: 8 photos that ship with scikit-image, directly in ``root``."""
    import skimage

    data = Path(skimage.data.__file__).parent
    root.mkdir(parents=True)
    for name in SKIMAGE_PHOTOS:
        shutil.copy(data / name, root / name)
    return root
