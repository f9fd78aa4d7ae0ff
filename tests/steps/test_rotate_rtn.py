"""Why ``rotate`` + ``rtn`` can be worse than ``rtn`` alone (issue 11 item 4, SmolLM2-135M): a
residual channel with massive activations that the RMSNorm weights suppress. Unrotated, RTN's error
on that channel's weight column is multiplied by the tiny norm weight (after folding it into the
weight, the column is tiny and rounds to zero with an error no larger than itself). ``rotate``
folds the norm weights and then spreads the channel over every rotated input, so RTN's error is no
longer small along the channel's direction and meets its full energy. GPTQ sees that energy in its
Hessian and compensates. Measured here on logits, against the float model's (compared in float64)."""

from __future__ import annotations

import copy

import torch

import nnsqueeze as nsq
from nnsqueeze.llm.tiny import TinyLlama, TinyLlamaConfig

VOCAB = 97
CH = 5                                   # the massive channel
FAST = {"warmup": 0, "runs": 1, "per_step": False}
IDS = torch.randint(0, VOCAB, (3, 29), generator=torch.Generator().manual_seed(3))
W4 = {"bits": 4, "group_size": 32, "symmetric": True, "pack": False}


def tiny(massive: bool) -> TinyLlama:
    torch.manual_seed(0)
    m = TinyLlama(TinyLlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
        if massive:                       # SmolLM2: channel 507 reaches 23,700 (median |h| ~ 2), norm weights ~1e-4
            m.model.embed_tokens.weight[:, CH] = 40.0
            for b in m.model.layers:
                b.input_layernorm.weight[CH] = 1e-3
                b.post_attention_layernorm.weight[CH] = 1e-3
            m.model.norm.weight[CH] = 1e-3
    return m


def logit_error(model: TinyLlama, steps: list[dict]) -> float:
    with torch.no_grad():
        ref = model(IDS).logits.double()
    calib = [torch.randint(0, VOCAB, (2, 29), generator=torch.Generator().manual_seed(s)) for s in range(4)]
    res = nsq.compress(copy.deepcopy(model), {"version": 1, "steps": steps, "export": {"onnx": None},
                                              "evaluate": FAST}, calib_data=calib, metric=None, progress=False)
    with torch.no_grad():
        return float((res.model(IDS).logits.double() - ref).norm() / ref.norm())


def test_rotation_alone_is_exact_on_the_massive_channel_model():
    assert logit_error(tiny(True), [{"rotate": {"online_hadamard": True}}]) < 1e-5


def fold_norms(m: TinyLlama) -> TinyLlama:
    """Rotate's first stage alone: the norm weights folded into q/k/v and gate/up, no rotation."""
    folded = copy.deepcopy(m)
    with torch.no_grad():
        for b in folded.model.layers:
            for norm, readers in ((b.input_layernorm, (b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj)),
                                  (b.post_attention_layernorm, (b.mlp.gate_proj, b.mlp.up_proj))):
                for lin in readers:
                    lin.weight.mul_(norm.weight.unsqueeze(0))
                norm.weight.fill_(1.0)
    return folded


def test_rtn_after_rotate_amplifies_the_error_of_a_norm_suppressed_massive_channel():
    m = tiny(True)
    rtn = logit_error(m, [{"rtn": W4}])
    rot_rtn = logit_error(m, [{"rotate": {"online_hadamard": True}}, {"rtn": W4}])
    assert rot_rtn > 5 * rtn, (rot_rtn, rtn)            # measured 0.06 vs 0.004
    # The fold alone is harmless: the suppressed channel's weight column is tiny and rounds to zero
    # with an error no larger than itself. It is the rotation that spreads it.
    folded = fold_norms(m)
    with torch.no_grad():
        a, b = folded(IDS).logits.double(), m(IDS).logits.double()
    assert float((a - b).norm() / b.norm()) < 1e-5                         # the fold is exact
    assert logit_error(folded, [{"rtn": W4}]) < 1.5 * rtn
    rot_gptq = logit_error(m, [{"rotate": {"online_hadamard": True}},
                               {"gptq": {**W4, "act_order": True, "samples": 8}}])
    assert rot_gptq < rot_rtn / 3, (rot_gptq, rot_rtn)  # data-aware: the Hessian holds the channel's energy
