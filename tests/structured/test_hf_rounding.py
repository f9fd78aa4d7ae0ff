"""The module-pattern check tells float32 rounding from a wrong pattern (``hf.float_error``).

On SmolLM2-135M (30 blocks, activations in the hundreds) the check's float32 comparison of the pruned
model with the zeroed original deviated by 6.25e-4 of the output scale on some example inputs, over its
1e-4 bound, from rounding alone (the pruned model's own float32 forward was 3.2e-4 from float64), and
``structured-prune {params: ...}`` raised. The tests make the bound tight (1e-12) so that a tiny model's
rounding trips it: the right plan must still pass (and equal a float64 reference), a wrong one must not.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from nnsqueeze.errors import ModelError  # noqa: E402
from nnsqueeze.structured import hf  # noqa: E402
from test_hf import Logits, mixing_ffn, run_step, zeroed  # noqa: E402


@pytest.fixture
def tight(monkeypatch):
    monkeypatch.setattr(hf, "mismatch", functools.partial(hf.mismatch, rtol=1e-12))


def odd_llama():                       # wide enough that float32 sums round differently when shorter
    cfg = transformers.LlamaConfig(vocab_size=37, hidden_size=252, intermediate_size=515, num_hidden_layers=4,
                                   num_attention_heads=6, num_key_value_heads=3, head_dim=8,
                                   max_position_embeddings=64, attn_implementation="eager")
    torch.manual_seed(0)
    return Logits(transformers.LlamaForCausalLM(cfg)).eval()


def test_rounding_over_the_bound_is_accepted_and_the_result_is_exact(tight):
    model, ids = odd_llama(), torch.randint(0, 37, (2, 64), generator=torch.Generator().manual_seed(3))
    orig = copy.deepcopy(model)
    pruned, step, ctx = run_step(model, ids, ratio=0.34, head_ratio=0.34, graph="fx")    # fx -> patterns
    fig = ctx.report.steps[-1]["figures"]
    assert 1e-12 < fig["pattern_check_deviation"] <= 4 * fig["pattern_check_float_error"]
    assert fig["heads_removed"] == 8       # one KV group (its 2 query heads) in each of the 4 blocks
    ref = zeroed(orig, step.plan_).double()                          # float64: the original, consumer columns zeroed
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).double(), ref(ids), atol=1e-5, rtol=0)


def test_a_wrong_pattern_still_raises_under_the_same_bound(tight):
    torch.manual_seed(0)                       # fc1 -> softmax -> fc2: the softmax mixes the neurons
    with pytest.raises(ModelError, match="changed the outputs beyond the removed channels"):
        run_step(mixing_ffn(nn.Softmax(-1)), torch.randn(3, 6), ratio=0.5)


def test_float_error_is_the_distance_to_a_float64_forward():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(9, 5), nn.Tanh(), nn.Linear(5, 3)).eval(), torch.randn(4, 9)
    with torch.no_grad():
        got, exact = model(x), copy.deepcopy(model).double()(x.double())
    want = float((exact.float() - got).abs().max() / (1 + exact.float().abs().max()))
    assert hf.float_error(model, x, [got]) == pytest.approx(want, rel=1e-6, abs=1e-12)
    assert hf.float_error(model.double(), x.double(), [exact.float()]) == 0.0      # same computation
