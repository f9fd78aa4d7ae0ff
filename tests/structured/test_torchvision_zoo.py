"""torchvision's classification zoo through `structured-prune` (issue 14), as a user runs it.

For the smallest variant of every architecture family of ``torchvision.models.list_models`` (random
init, seed 0, the smallest input the architecture and the ONNX exporter accept): ``nsq.compress`` with
``structured-prune {ratio: 0.5, importance: l2}`` and the ONNX export on, then

- the FLOPs left, counted by torch's own ``FlopCounterMode`` (independent of nnsqueeze's counter), are
  below a bound measured per family (the bound is the measured fraction rounded up to the next 0.01);
- ONNX Runtime runs the compressed ONNX model on a fresh batch of 3 (not the export's example) and
  matches the torch model within 1e-4 of the output's largest magnitude (``RTOL``);
- ``nsq.load`` onto a freshly built model reproduces the outputs exactly (``torch.equal``).

The family list is derived from ``list_models``: a new family fails ``test_every_family_is_covered``
rather than being left out. ``slow``: the families whose export or prune takes more than a few seconds
here (224-pixel inputs, 20M+ parameters).
"""

from __future__ import annotations

import re

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import nnsqueeze as nsq
from nnsqueeze.export.onnx import export_onnx
from nnsqueeze.zoo.tvision import import_torchvision

tv = import_torchvision()

RTOL = 1e-4   # ORT vs torch: max abs diff <= RTOL * max |torch output|
SLOW = pytest.mark.slow

# representative: (family pattern over list_models names, input size, builder kwargs, FLOPs-left bound, marks)
# Sizes: 32 where the network runs on it; alexnet/vgg need 224 (their AdaptiveAvgPool2d to 6x6 / 7x7 must
# divide its input for the ONNX exporter), inception_v3 75 (its stem), maxvit 224 (7x7 windows on every
# stage); vit_b_16 is built for 32x32 (`image_size=32`, 4 patches).
# Recipe: `norms: prune` (a LayerNorm over channels loses them too, as in Torch-Pruning; ConvNeXt needs it).
# Bounds: FLOPs left after pruning, measured with this file's inputs, rounded up to the next 0.01. Swin's
# window-attention heads are pruned with the MLPs (0.4986 / 0.4988 left at 32 px; 0.95 when they were kept), and so
# are MaxViT's block / grid attention heads (0.4716 left at 224 px; 0.59 when they were kept).
ZOO: dict[str, tuple[str, int, dict, float, tuple]] = {
    "alexnet": (r"alexnet", 224, {}, 0.28, (SLOW,)),
    "convnext_tiny": (r"convnext_(tiny|small|base|large)", 32, {}, 0.26, (SLOW,)),
    "densenet121": (r"densenet\d+", 32, {}, 0.27, ()),
    "efficientnet_b0": (r"efficientnet_b\d", 32, {}, 0.31, ()),
    "efficientnet_v2_s": (r"efficientnet_v2_[sml]", 32, {}, 0.26, (SLOW,)),
    "googlenet": (r"googlenet", 32, {}, 0.28, ()),
    "inception_v3": (r"inception_v3", 75, {}, 0.26, (SLOW,)),
    "maxvit_t": (r"maxvit_t", 224, {}, 0.48, (SLOW,)),
    "mnasnet0_5": (r"mnasnet\d_\d+", 32, {}, 0.38, ()),
    "mobilenet_v2": (r"mobilenet_v2", 32, {}, 0.32, ()),
    "mobilenet_v3_small": (r"mobilenet_v3_(small|large)", 32, {}, 0.36, ()),
    "regnet_x_400mf": (r"regnet_x_\d+(_\d+)?(mf|gf)", 32, {}, 0.27, ()),
    "regnet_y_400mf": (r"regnet_y_\d+(_\d+)?(mf|gf)", 32, {}, 0.27, ()),
    "resnet18": (r"resnet\d+", 32, {}, 0.27, ()),
    "resnext50_32x4d": (r"resnext\d+_\d+x\d+d", 32, {}, 0.27, (SLOW,)),
    "shufflenet_v2_x0_5": (r"shufflenet_v2_x\d_\d", 32, {}, 0.46, ()),
    "squeezenet1_0": (r"squeezenet1_\d", 32, {}, 0.33, ()),
    "swin_t": (r"swin_[tsb]", 32, {}, 0.50, (SLOW,)),
    "swin_v2_t": (r"swin_v2_[tsb]", 32, {}, 0.50, (SLOW,)),
    "vgg11": (r"vgg\d+(_bn)?", 224, {}, 0.26, (SLOW,)),
    "vit_b_16": (r"vit_[bhl]_\d+", 32, {"image_size": 32}, 0.76, (SLOW,)),
    "wide_resnet50_2": (r"wide_resnet\d+_\d", 32, {}, 0.26, (SLOW,)),
}

RECIPE = {"steps": [{"structured-prune": {"ratio": 0.5, "importance": "l2", "norms": "prune"}}], "export": {"onnx": {}},
          "evaluate": {"runs": 1, "warmup": 0, "per_step": False, "torch_latency": False}}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return random_head(tv.models.get_model(name, weights=None, **ZOO[name][2])).eval()


def random_head(model: nn.Module) -> nn.Module:
    """torchvision's ViT initialises its classifier to zeros: every output would be 0 and the ORT and reload
    checks vacuous. Give it random weights (std 0.02, seed 3), like the rest of the random init."""
    head = getattr(getattr(model, "heads", None), "head", None)
    if head is not None and not head.weight.any():
        nn.init.normal_(head.weight, std=0.02, generator=torch.Generator().manual_seed(3))
    return model


def flops(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    return fc.get_total_flops()


def test_every_family_is_covered():
    names = tv.models.list_models(module=tv.models)
    families = {rep: [n for n in names if re.fullmatch(ZOO[rep][0], n)] for rep in ZOO}
    for rep, members in families.items():
        assert rep in members, f"{rep} is not in its family {ZOO[rep][0]} of list_models"
    unmatched = [n for n in names if not any(n in m for m in families.values())]
    assert not unmatched, f"torchvision families with no zoo test: {unmatched}; add their smallest variant to ZOO"
    twice = [n for n in names if sum(n in m for m in families.values()) > 1]
    assert not twice, f"in two families: {twice}"


@pytest.mark.parametrize("name", [pytest.param(n, marks=ZOO[n][4]) for n in ZOO])
def test_zoo_prunes_exports_and_reloads(name, tmp_path):
    model = build(name)
    size = ZOO[name][1]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    result = nsq.compress(model, RECIPE, example_inputs=x, metric=None, progress=False)
    pruned = result.model.eval()

    left = flops(pruned, x) / flops(model, x)
    assert left <= ZOO[name][3], f"{name}: {left:.4f} of the FLOPs left, bound {ZOO[name][3]}"
    step = result.report["steps"][0]["figures"]
    assert step["macs_after"] < step["macs_before"]

    x3 = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = pruned(x3)
    sess = ort.InferenceSession(result.onnx, providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x3.numpy()})[0]
    scale = float(ref.abs().max())
    assert scale > 0 and np.isfinite(got).all()
    assert float(np.abs(got - ref.numpy()).max()) <= RTOL * scale

    result.save(tmp_path / "art")
    fresh = tv.models.get_model(name, weights=None, **ZOO[name][2])  # other weights: load replaces them all
    loaded = nsq.load(tmp_path / "art", fresh)
    with torch.no_grad():
        assert torch.equal(loaded(x3), ref)


def test_mnasnet_reload_keeps_its_state_dict_version(tmp_path):
    """MNASNet refuses a state dict without `_metadata` versions ("version should be set to 1 or 2
    instead of None"); safetensors drops them, so `nsq.load` must supply the model's own."""
    model = build("mnasnet0_5")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    result = nsq.compress(model, {**RECIPE, "export": {"onnx": None}}, example_inputs=x, metric=None,
                          progress=False)
    result.save(tmp_path / "art")
    loaded = nsq.load(tmp_path / "art", tv.models.get_model("mnasnet0_5", weights=None))
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model.eval()(x))


def test_mnasnet_weights_from_safetensors_load(tmp_path):
    """`--weights w.safetensors` (no `_metadata` either) on torchvision:mnasnet0_5 raised an untyped ValueError."""
    from safetensors.torch import save_file

    from nnsqueeze.inputs import load_weights

    src = build("mnasnet0_5")
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    dst = tv.models.get_model("mnasnet0_5", weights=None)
    load_weights(dst, tmp_path / "w.safetensors")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(dst.eval()(x), src(x))


class _Attention(nn.Module):
    """Self-attention as torchvision's ViT encoder block calls it (batch_first, need_weights=False),
    then a TransformerEncoderLayer (its own fused eval path), at odd sizes."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(12, 3, batch_first=True)
        self.layer = nn.TransformerEncoderLayer(12, 2, 20, batch_first=True)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        y, _ = self.attn(x, x, x, need_weights=False)
        return self.head(self.layer(x + y))


@pytest.mark.parametrize("fastpath", [True, False])
def test_multihead_attention_exports_with_or_without_the_fast_path(tmp_path, fastpath):
    torch.manual_seed(0)
    model = _Attention().eval()
    x = torch.randn(3, 7, 12)
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(fastpath)
    try:
        export_onnx(model, tmp_path / "m.onnx", x)   # failed on aten::_native_multi_head_attention
        assert torch.backends.mha.get_fastpath_enabled() is fastpath   # the user's setting is restored
    finally:
        torch.backends.mha.set_fastpath_enabled(before)
    x5 = torch.randn(5, 7, 12, dtype=torch.float64)
    with torch.no_grad():   # reference: float64 with the composite (non-fused) path
        ref = model.double()(x5).numpy()
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x5.float().numpy()})[0]
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_tiny_vision_transformer_baseline_exports_through_compress():
    """The ViT of issue 14 failed before pruning, at the baseline export: a two-layer ViT of torchvision's
    own class goes through `nsq.compress` (both exports) and prunes its heads and MLPs."""
    torch.manual_seed(0)
    vit = random_head(tv.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=3,
                                                  hidden_dim=12, mlp_dim=20, num_classes=5)).eval()
    x = torch.randn(2, 3, 32, 32)
    result = nsq.compress(vit, RECIPE, example_inputs=x, metric=None, progress=False)
    with torch.no_grad():
        scale = float(vit(x).abs().max())
    assert scale > 0
    assert result.report["export"]["baseline"]["max_abs_diff"] <= RTOL * scale
    step = result.report["steps"][0]["figures"]
    assert step["heads_removed"] == 4 and step["macs_after"] < step["macs_before"]   # 3 -> 1 head per layer
