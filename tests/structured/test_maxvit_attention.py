"""Head pruning of torchvision's MaxViT attention (``RelativePositionalMultiHeadAttention``), against float64
references.

Reference: the original layer (or model) in float64 with the removed heads' ``merge`` input columns set to zero
(no norm sits between the heads and ``merge``, so this is what removing them must give); the pruned one must
equal it within 1e-10 of the output's magnitude (float64 both sides), its float32 forward within 1e-5. Sizes
are odd on purpose: 5 heads of 4 (width 20), 3x3 partitions (9 tokens), 3 partitions.
"""

from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import nnsqueeze as nsq
from nnsqueeze.errors import ModelError
from nnsqueeze.structured.graph import build_graph
from nnsqueeze.structured.heads import head_parts as dispatched_parts, num_heads
from nnsqueeze.structured.macs import count
from nnsqueeze.structured.maxvit_attention import PrunedRelativeAttention, head_parts, prune_heads
from nnsqueeze.zoo.tvision import import_torchvision
from test_window_attention import close, zeroed as zeroed_heads

maxvit = import_torchvision().models.maxvit
TOL = 1e-10   # float64 vs float64: max |diff| <= TOL * max |reference|
RTOL = 1e-4   # ONNX Runtime (float32) vs torch
ATTN = "RelativePositionalMultiHeadAttention"


def layer() -> torch.nn.Module:
    torch.manual_seed(0)
    m = maxvit.RelativePositionalMultiHeadAttention(20, 4, 9).eval()
    with torch.no_grad():   # random, non-trivial parameters everywhere (the bias table starts near zero)
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def zeroed(m: torch.nn.Module, keep: list[int], d: int) -> torch.nn.Module:
    """Float64 copy of ``m`` with every head outside ``keep`` cut off at ``merge`` (its input columns zeroed)."""
    return zeroed_heads(m, keep, d, out="merge", heads="n_heads")


def test_pruned_layer_equals_original_with_removed_heads_zeroed():
    m = layer()
    x = torch.randn(2, 3, 9, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    keep = [1, 3, 4]
    small = prune_heads(m, keep)
    assert isinstance(small, PrunedRelativeAttention) and small.n_heads == num_heads(small) == 3
    assert small.head_dim == 4 and small.scale_factor == m.scale_factor == 20 ** -0.5
    assert small.to_qkv.weight.shape == (36, 20) and small.to_qkv.bias.shape == (36,)
    assert small.merge.weight.shape == (20, 12) and small.relative_position_bias_table.shape == (5 * 5, 3)
    assert torch.equal(small.relative_position_bias_table, m.relative_position_bias_table[:, keep])
    assert m.to_qkv.weight.shape == (60, 20)                  # the original is left as it was
    with torch.no_grad():
        ref = zeroed(m, keep, 4)(x)
        got = copy.deepcopy(small).double()(x)
        full = copy.deepcopy(m).double()(x)
        out32 = small(x.float())
    assert close(got, ref, TOL)
    assert not close(full, ref, 1e-3)                         # the removed heads did contribute
    assert close(out32.double(), ref, 1e-5)                   # the float32 layer, same tolerance as ORT parity


def test_all_heads_kept_reproduces_torchvision():
    """The reimplemented forward against torchvision's own (float64)."""
    m = layer().double()
    x = torch.randn(3, 2, 9, 20, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        assert close(prune_heads(m, list(range(5)))(x), m(x), TOL)


def test_pruning_twice_composes():
    m = layer()
    x = torch.randn(1, 3, 9, 20, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    twice = prune_heads(prune_heads(m, [1, 3, 4]), [0, 2])      # original heads 1 and 4
    with torch.no_grad():
        assert close(twice.double()(x), zeroed(m, [1, 4], 4)(x), TOL)


def test_head_parts_rows_are_heads():
    m = layer()
    parts = head_parts(m)
    assert [tuple(p.shape) for p in parts] == [(5, 80)] * 3 + [(5, 4)] * 3 + [(5, 80)]
    assert torch.equal(parts[1][2], m.to_qkv.weight[20 + 8:20 + 12].flatten())      # k rows of head 2
    assert torch.equal(parts[-1][2], m.merge.weight[:, 8:12].flatten())            # merge columns of head 2
    assert all(torch.equal(a, b) for a, b in zip(dispatched_parts(m), parts))


def test_mismatched_widths_and_bad_indices_raise_a_typed_error():
    m = layer()
    m.n_heads = 3              # to_qkv's 60 rows are not 3 heads of 4
    with pytest.raises(ModelError, match="do not match n_heads=3 of head_dim=4"):
        prune_heads(m, [0])
    with pytest.raises(ModelError, match=r"not distinct indices in \[0, 5\)"):
        prune_heads(layer(), [1, 5])
    with pytest.raises(ModelError, match=r"not distinct indices"):
        prune_heads(layer(), [])


def test_macs_match_torch_flop_counter():
    """``count`` against torch's FlopCounterMode (aten matmuls: the Linears and both einsums), pruned or not."""
    x = torch.randn(2, 3, 9, 20, generator=torch.Generator().manual_seed(4))
    for m in (layer(), prune_heads(layer(), [0, 2])):
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            m(x)
        assert count(m, x).total_macs * 2 == fc.get_total_flops() // 2   # count is per sample (batch 2)


def tiny_maxvit() -> torch.nn.Module:
    torch.manual_seed(0)
    return maxvit.MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[20, 20],
                         block_layers=[1, 1], head_dim=4, stochastic_depth_prob=0.0, num_classes=7).eval()


def test_graph_keeps_the_attention_whole():
    """The channel graph treats the layer as a leaf: no group reaches into to_qkv or merge."""
    model = tiny_maxvit()
    g = build_graph(model, torch.randn(1, 3, 32, 32), norms=True)
    assert not [m.module for grp in g.groups for m in grp.members if "attn_layer.1" in m.module]
    assert sum("heads are pruned inside the layer" in r for r in g.skipped.values()) == 4


def test_tiny_maxvit_heads_prune_export_and_reload(tmp_path):
    model = tiny_maxvit()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    recipe = {"steps": [{"structured-prune": {"ratio": 0.4, "targets": [ATTN]}}], "export": {"onnx": {}},
              "evaluate": {"runs": 1, "warmup": 0, "per_step": False, "torch_latency": False}}
    result = nsq.compress(copy.deepcopy(model), recipe, example_inputs=x, metric=None, progress=False)
    pruned = result.model.eval()
    heads = result.records[0]["record"]["heads"]
    assert sorted(heads) == [f"blocks.{s}.layers.0.layers.{k}_attention.attn_layer.1"
                             for s in (0, 1) for k in ("grid", "window")]
    assert all(len(k) == 3 for k in heads.values())          # 5 heads - round(5 * 0.4)
    assert result.report["steps"][0]["figures"]["heads_removed"] == 8

    ref_model = copy.deepcopy(model).double()                 # removed heads cut off at merge, float64
    for attn, keep in heads.items():
        ref_model.set_submodule(attn, zeroed(ref_model.get_submodule(attn), keep, 4))
    x3 = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = ref_model(x3.double())
        assert close(copy.deepcopy(pruned).double()(x3.double()), ref, TOL)
        assert not close(model.double()(x3.double()), ref, 1e-3)
        out = pruned(x3)

    sess = ort.InferenceSession(result.onnx, providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x3.numpy()})[0]
    assert np.isfinite(got).all() and float(np.abs(got - out.numpy()).max()) <= RTOL * float(out.abs().max())

    result.save(tmp_path / "art")
    loaded = nsq.load(tmp_path / "art", tiny_maxvit())
    attn = loaded.blocks[1].layers[0].layers.grid_attention.attn_layer[1]
    assert isinstance(attn, PrunedRelativeAttention) and attn.to_qkv.out_features == 36
    with torch.no_grad():
        assert torch.equal(loaded(x3), out)
