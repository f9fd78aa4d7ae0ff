"""``awq`` with ``pack: true``: PackedLinear layers holding the codes of Q(W * s) and the AWQ input
scales; the artifact reloads bit-identically and matches the simulated (pack: false) model."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import nnsqueeze as nsq
from nnsqueeze.errors import RecipeError
from nnsqueeze.llm.packed import PackedLinear
from nnsqueeze.llm.tiny import TinyLlama, TinyLlamaConfig
from nnsqueeze.recipe import load_recipe

VOCAB = 97
IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))
FAST = {"warmup": 0, "runs": 1, "per_step": False}


def tiny():
    torch.manual_seed(0)
    model = TinyLlama(TinyLlamaConfig(vocab_size=VOCAB)).eval()
    with torch.no_grad():  # uneven norm gains: activation outlier channels, so AWQ picks alpha > 0
        for blk in model.model.layers:
            blk.input_layernorm.weight.mul_(torch.linspace(0.2, 8, 64)[torch.randperm(64)])
    return model


def data():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, VOCAB, (2, 16), generator=g) for _ in range(2)]


def compress(cfg):
    recipe = {"version": 1, "steps": [{"awq": {"bits": 4, "n_grid": 8, "samples": 4, **cfg}}],
              "export": {"onnx": None}, "evaluate": FAST}
    return nsq.compress(tiny(), recipe, calib_data=data(), metric=None, progress=False)


@pytest.mark.parametrize("cfg", [{"group_size": 32}, {"group_size": 16, "symmetric": False}],
                         ids=["g32-sym", "g16-asym"])
def test_awq_pack_reloads_bit_identically(cfg, tmp_path):
    sim = compress({**cfg, "pack": False}).model
    res = compress({**cfg, "pack": True})
    packed = res.model
    layers = {n: m for n, m in packed.named_modules() if isinstance(m, PackedLinear)}
    assert len(layers) == 14 and all("input_scale_" in m._buffers for m in layers.values())
    assert any(not torch.all(m.input_scale_ == 1) for m in layers.values())         # AWQ did scale
    with torch.no_grad():
        ref, got = sim(IDS).logits, packed(IDS).logits
        for n, m in layers.items():   # (codes of Q(W*s)) / s equals the simulated weight to rounding
            w = m.dequantized_weight() / m.input_scale_
            assert torch.allclose(w, sim.get_submodule(n).weight, rtol=1e-6, atol=1e-7), n
    assert (got - ref).abs().max() < 1e-4
    res.save(tmp_path / "a")
    sd = load_file(tmp_path / "a" / "model.safetensors")
    n0 = next(iter(layers))
    assert sd[f"{n0}.weight"].dtype == torch.uint8 and sd[f"{n0}.input_scale_"].shape == (64,)
    loaded = nsq.load(tmp_path / "a", model=tiny())
    sl, sp = loaded.state_dict(), packed.state_dict()
    assert sl.keys() == sp.keys() and all(torch.equal(sl[k], sp[k]) for k in sl)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, got)
        assert torch.equal(loaded(IDS[:1, :1]).logits, packed(IDS[:1, :1]).logits)  # decode path (kernel)


def test_packed_layers_are_not_quantized_twice():
    from nnsqueeze.context import Context
    from nnsqueeze.errors import TargetError
    from nnsqueeze.registry import STEPS

    model, ctx = tiny(), Context(calib_data=data(), progress=False)
    ctx.report.begin_step("awq", {})
    awq, gptq = STEPS.get("awq"), STEPS.get("gptq")
    awq(awq.Config(bits=4, group_size=32, n_grid=2, samples=4, pack=True), 0).run(model, ctx)
    with pytest.raises(TargetError, match="already packed"):
        gptq(gptq.Config(bits=4, group_size=32, samples=4), 1).run(model, ctx)


def test_awq_pack_restrictions():
    with pytest.raises(RecipeError, match="power of two"):
        load_recipe([{"awq": {"group_size": 100, "pack": True}}])
    assert load_recipe([{"awq": {}}]).steps[0].config.pack is False                 # default unchanged
