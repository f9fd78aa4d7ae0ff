"""Head pruning of torchvision's Swin window attention (V1 and V2), against float64 references.

Reference: the original layer (or model) in float64 with the removed heads' ``proj`` input columns set to
zero; the pruned one must equal it within 1e-10 of the output's magnitude (float64 both sides). Sizes are
odd on purpose: 5 heads of 4, windows of 3x4 with a shift of 1x2 on a 7x9 map (padding and the shift mask).
"""

from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch

import nnsqueeze as nsq
from nnsqueeze.errors import ModelError
from nnsqueeze.structured.heads import head_parts as dispatched_parts
from nnsqueeze.structured.window_attention import PrunedWindowAttention, head_parts, prune_heads
from nnsqueeze.zoo.tvision import import_torchvision

tv = import_torchvision()
swin = tv.models.swin_transformer
TOL = 1e-10   # float64 vs float64: max |diff| <= TOL * max |reference|
RTOL = 1e-4   # ONNX Runtime (float32) vs torch


def layer(v2: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    cls = swin.ShiftedWindowAttentionV2 if v2 else swin.ShiftedWindowAttention
    m = cls(20, [3, 4], [1, 2], num_heads=5).eval()
    with torch.no_grad():   # random, non-trivial parameters everywhere (V2's qkv key bias stays unused)
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def zeroed(m: torch.nn.Module, keep: list[int], d: int, out: str = "proj", heads: str = "num_heads") -> torch.nn.Module:
    """Float64 copy of ``m`` with every head outside ``keep`` cut off at its output projection ``out`` (its
    input columns zeroed); ``heads``: the attribute holding the head count (MaxViT: ``merge``, ``n_heads``)."""
    ref = copy.deepcopy(m).double()
    with torch.no_grad():
        for h in range(getattr(ref, heads)):
            if h not in keep:
                getattr(ref, out).weight[:, h * d:(h + 1) * d] = 0
    return ref


def close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return float((a - b).abs().max()) <= tol * float(b.abs().max())


@pytest.mark.parametrize("v2", [False, True])
def test_pruned_layer_equals_original_with_removed_heads_zeroed(v2):
    m = layer(v2)
    x = torch.randn(2, 7, 9, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    keep = [1, 3, 4]
    small = prune_heads(m, keep)
    assert isinstance(small, PrunedWindowAttention) and small.num_heads == 3 and small.head_dim == 4
    assert small.qkv.weight.shape == (36, 20) and small.qkv.bias.shape == (36,) and small.proj.weight.shape == (20, 12)
    if v2:
        assert small.logit_scale.shape == (3, 1, 1) and small.cpb_mlp[2].weight.shape == (3, 512)
        assert m.cpb_mlp[2].weight.shape == (5, 512)          # the original is left as it was
    else:
        assert small.relative_position_bias_table.shape == (5 * 7, 3)
    with torch.no_grad():
        ref = zeroed(m, keep, 4)(x)
        got = copy.deepcopy(small).double()(x)
        full = copy.deepcopy(m).double()(x)
        out32 = small(x.float())
    assert close(got, ref, TOL)
    assert not close(full, ref, 1e-3)                         # the removed heads did contribute
    assert close(out32.double(), ref, 1e-5)                   # the float32 layer, same tolerance as ORT parity


@pytest.mark.parametrize("v2", [False, True])
def test_all_heads_kept_reproduces_torchvision(v2):
    """The reimplemented forward against torchvision's own ``shifted_window_attention`` (float64)."""
    m = layer(v2).double()
    x = torch.randn(3, 5, 8, 20, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        assert close(prune_heads(m, list(range(5)))(x), m(x), TOL)


@pytest.mark.parametrize("v2", [False, True])
def test_pruning_twice_composes(v2):
    m = layer(v2)
    x = torch.randn(1, 7, 9, 20, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    twice = prune_heads(prune_heads(m, [1, 3, 4]), [0, 2])      # original heads 1 and 4
    with torch.no_grad():
        assert close(twice.double()(x), zeroed(m, [1, 4], 4)(x), TOL)


def test_head_parts_rows_are_heads():
    m = layer(False)
    parts = head_parts(m)
    assert [tuple(p.shape) for p in parts] == [(5, 80)] * 3 + [(5, 4)] * 3 + [(5, 80)]
    assert torch.equal(parts[1][2], m.qkv.weight[20 + 8:20 + 12].flatten())      # k rows of head 2
    assert torch.equal(parts[-1][2], m.proj.weight[:, 8:12].flatten())            # proj columns of head 2
    assert all(torch.equal(a, b) for a, b in zip(dispatched_parts(m), parts))


def test_widths_that_do_not_split_into_heads_raise_a_typed_error():
    m = layer(False)
    m.num_heads = 3            # 20 channels do not split into 3 heads
    with pytest.raises(ModelError, match="not a multiple of num_heads=3"):
        prune_heads(m, [0])
    with pytest.raises(ModelError, match=r"not distinct indices in \[0, 5\)"):
        prune_heads(layer(True), [1, 5])


def tiny_swin(v2: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    kw = {"block": swin.SwinTransformerBlockV2, "downsample_layer": swin.PatchMergingV2} if v2 else {}
    return swin.SwinTransformer(patch_size=[2, 2], embed_dim=20, depths=[2, 2], num_heads=[5, 5], window_size=[3, 3],
                                mlp_ratio=2.0, num_classes=7, **kw).eval()


@pytest.mark.parametrize("v2", [False, True])
def test_tiny_swin_heads_prune_export_and_reload(v2, tmp_path):
    model = tiny_swin(v2)
    name = "ShiftedWindowAttentionV2" if v2 else "ShiftedWindowAttention"
    x = torch.randn(2, 3, 13, 11, generator=torch.Generator().manual_seed(1))
    recipe = {"steps": [{"structured-prune": {"ratio": 0.4, "targets": [name]}}], "export": {"onnx": {}},
              "evaluate": {"runs": 1, "warmup": 0, "per_step": False, "torch_latency": False}}
    result = nsq.compress(copy.deepcopy(model), recipe, example_inputs=x, metric=None, progress=False)
    pruned = result.model.eval()
    heads = result.records[0]["record"]["heads"]
    assert sorted(heads) == [f"features.{s}.{b}.attn" for s in (1, 3) for b in (0, 1)]
    assert all(len(k) == 3 for k in heads.values())          # 5 heads - round(5 * 0.4)
    assert result.report["steps"][0]["figures"]["heads_removed"] == 8

    ref_model = copy.deepcopy(model).double()                 # removed heads cut off at proj, float64
    for attn, keep in heads.items():
        d = ref_model.get_submodule(attn).qkv.in_features // 5
        ref_model.set_submodule(attn, zeroed(ref_model.get_submodule(attn), keep, d))
    x3 = torch.randn(3, 3, 13, 11, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = ref_model(x3.double())
        assert close(copy.deepcopy(pruned).double()(x3.double()), ref, TOL)
        assert not close(model.double()(x3.double()), ref, 1e-3)
        out = pruned(x3)

    sess = ort.InferenceSession(result.onnx, providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x3.numpy()})[0]
    assert np.isfinite(got).all() and float(np.abs(got - out.numpy()).max()) <= RTOL * float(out.abs().max())

    result.save(tmp_path / "art")
    loaded = nsq.load(tmp_path / "art", tiny_swin(v2))
    assert isinstance(loaded.features[1][0].attn, PrunedWindowAttention)
    with torch.no_grad():
        assert torch.equal(loaded(x3), out)
