"""Block-wise orchestration and the LLM steps on a pure-torch LLaMA-style model (no transformers)."""

from __future__ import annotations


import pytest
import torch
from pydantic import ValidationError

from nnsqueeze.context import Context
from nnsqueeze.errors import DataError, ModelError, TargetError
from nnsqueeze.llm.gptq import HessianAccumulator, gptq_quantize
from nnsqueeze.ops.rtn import rtn_quantize
from nnsqueeze.llm.sequential import (block_linears, capture_block_inputs, find_blocks, get_weight,
                                      run_sequential, set_weight)
from nnsqueeze.llm.tiny import TinyLlama, TinyLlamaConfig
from nnsqueeze.registry import STEPS

CFG = TinyLlamaConfig(vocab_size=61, hidden_size=64, intermediate_size=96, num_layers=3)


def tiny_model() -> TinyLlama:
    torch.manual_seed(0)
    return TinyLlama(CFG).eval()


def batches(n: int = 3, b: int = 2, t: int = 24, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, CFG.vocab_size, (b, t), generator=g) for _ in range(n)]


def make_ctx(data) -> Context:
    ctx = Context(calib_data=data, progress=False)
    ctx.report.begin_step("test", {})
    return ctx


def gptq_apply(name, mod, acc):
    set_weight(mod, gptq_quantize(get_weight(mod), acc.hessian, bits=4, group_size=32, block_size=16).weight)
    return {}


def hessian_stats(name, mod):
    return HessianAccumulator(get_weight(mod).shape[1])


def whole_model_gptq(model, data):
    """Reference: for block k, hook its Linears while running the WHOLE model (blocks < k already
    quantized) on the calibration data, then quantize them. No block-wise input capture at all."""
    prefix, blocks = find_blocks(model)
    for k in range(len(blocks)):
        mods = [(f"{prefix}.{k}.{n}", m) for n, m in blocks[k].named_modules() if isinstance(m, torch.nn.Linear)]
        accs = {n: hessian_stats(n, m) for n, m in mods}
        hs = [m.register_forward_hook(lambda mod, i, o, a=accs[n]: a.add(i[0])) for n, m in mods]
        with torch.no_grad():
            for x in data:
                model(x)
        for h in hs:
            h.remove()
        for n, m in mods:
            gptq_apply(n, m, accs[n])
    return model


def test_find_blocks_and_capture():
    model = tiny_model()
    prefix, blocks = find_blocks(model)
    assert prefix == "model.layers" and len(blocks) == 3
    assert len(block_linears(model)) == 3 * 7 and "lm_head" not in block_linears(model)
    captured = capture_block_inputs(model, blocks, batches(2))
    assert len(captured) == 2
    args, kwargs = captured[0]
    assert args[0].shape == (2, 24, 64) and "position_embeddings" in kwargs

    class Nothing(torch.nn.Module):
        def forward(self, x):
            return x
    with pytest.raises(ModelError, match="no decoder blocks"):
        find_blocks(Nothing())


def test_sequential_gptq_equals_whole_model_calibration():
    data = batches()
    seq, ref = tiny_model(), tiny_model()
    rep = run_sequential(seq, data, block_linears(seq), hessian_stats, gptq_apply)
    whole_model_gptq(ref, data)
    for (n, a), (_, b) in zip(seq.named_parameters(), ref.named_parameters()):
        assert torch.equal(a, b), n
    assert rep.blocks == 3 and rep.tokens == 3 * 2 * 24 and rep.peak_rss_mib > 0
    assert rep.block_inputs_mib == pytest.approx(3 * 2 * 24 * 64 * 4 / 2**20)


def test_sequential_rtn_equals_direct_and_float_propagation():
    model = tiny_model()
    ref = {n: rtn_quantize(get_weight(m), 4, 16).weight for n, m in model.named_modules() if n in block_linears(model)}
    run_sequential(model, batches(1), list(ref), hessian_stats,
                   lambda n, m, a: set_weight(m, rtn_quantize(get_weight(m), 4, 16).weight))
    for n, w in ref.items():
        assert torch.equal(get_weight(model.get_submodule(n)), w)
    # propagate=False: block 1 calibrated on float activations, so its Hessian matches the float model's.
    seen = {}
    model = tiny_model()
    target = "model.layers.1.mlp.down_proj"
    float_acc = HessianAccumulator(96)
    h = model.get_submodule(target).register_forward_hook(lambda m, i, o: float_acc.add(i[0]))
    with torch.no_grad():
        model(batches(1)[0])
    h.remove()

    def apply(n, m, a):
        seen[n] = a.hessian.clone()
        return gptq_apply(n, m, a)
    run_sequential(model, batches(1), block_linears(model), hessian_stats, apply, propagate=False)
    assert torch.allclose(seen[target], float_acc.hessian, rtol=1e-5, atol=1e-8)


def test_gptq_step_report_and_lm_head():
    model = tiny_model()
    head = model.lm_head.weight.clone()
    ctx = make_ctx(batches())
    step = STEPS.get("gptq")(STEPS.get("gptq").Config(bits=4, group_size=32), 0)
    out = step.run(model, ctx)
    assert torch.equal(out.lm_head.weight, head)
    assert any(s["layer"] == "lm_head" for s in ctx.report.skipped)
    layers = ctx.report.layers
    assert len(layers) == 21
    errs = [(v["error"], v["rtn_error"]) for v in layers.values()]
    assert sum(e for e, _ in errs) < 0.95 * sum(r for _, r in errs)
    fig = ctx.report.steps[-1]["figures"]
    assert fig["blocks"] == 3 and fig["peak_rss_mib"] > 0
    assert step.record()["bits"] == 4


def test_rtn_and_awq_steps():
    model = tiny_model()
    ctx = make_ctx(None)
    STEPS.get("rtn")(STEPS.get("rtn").Config(bits=8, group_size=None), 0).run(model, ctx)
    w = get_weight(model.model.layers[0].self_attn.q_proj)
    assert torch.equal(w, rtn_quantize(w, 8, None).weight)  # idempotent: already on the grid
    model = tiny_model()
    ctx = make_ctx(batches())
    STEPS.get("awq")(STEPS.get("awq").Config(bits=4, group_size=32, n_grid=10), 0).run(model, ctx)
    for v in ctx.report.layers.values():
        assert v["error"] <= v["rtn_error"] * (1 + 1e-6)


@pytest.mark.parametrize("name", ["sparsegpt", "wanda"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_pruning_steps(name, pattern):
    model = tiny_model()
    ctx = make_ctx(batches())
    cls = STEPS.get(name)
    step = cls(cls.Config(sparsity=0.5, pattern=pattern), 0)
    step.run(model, ctx)
    q = model.model.layers[2].self_attn.q_proj
    assert q.weight_mask.dtype == torch.bool and torch.equal(q.weight == 0, ~q.weight_mask)
    if pattern == "2:4":
        assert (q.weight_mask.reshape(64, -1, 4).sum(-1) == 2).all()
    for v in ctx.report.layers.values():
        assert v["sparsity"] == pytest.approx(0.5, abs=0.02) and v["error"] < 1
    fresh = cls.rebuild(tiny_model(), step.config, step.record())
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.model.layers[2].self_attn.q_proj.weight_mask, q.weight_mask)


def test_smoothquant_step_keeps_outputs():
    model = tiny_model()
    with torch.no_grad():  # give the norms uneven gains: activation outlier channels
        for blk in model.model.layers:
            blk.input_layernorm.weight.mul_(torch.linspace(0.1, 20, 64)[torch.randperm(64)])
    data = batches()
    before = model(data[0]).logits
    ctx = make_ctx(data)
    step = STEPS.get("smoothquant")(STEPS.get("smoothquant").Config(alpha=0.5), 0)
    out = step.run(model, ctx)
    after = out(data[0]).logits
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-4)
    assert set(step.record()["layers"]) == {f"model.layers.{i}.{p}" for i in range(3) for p in
                                            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                             "mlp.gate_proj", "mlp.up_proj")}
    skipped = {s["layer"] for s in ctx.report.skipped}
    assert "model.layers.0.self_attn.o_proj" in skipped and "model.layers.0.mlp.down_proj" in skipped
    lay = ctx.report.layers["model.layers.0.self_attn.q_proj"]
    assert lay["act_absmax_ratio_after"] < lay["act_absmax_ratio_before"]


def test_step_errors():
    model = tiny_model()
    cls = STEPS.get("gptq")
    with pytest.raises(DataError, match="calibration"):
        cls(cls.Config(), 0).run(model, make_ctx(None))
    with pytest.raises(TargetError, match="inside the decoder blocks"):
        cls(cls.Config(targets=["lm_head"]), 0).run(model, make_ctx(batches(1)))
    with pytest.raises(Exception, match="pattern"):
        STEPS.get("wanda").Config(pattern="4:4")
    with pytest.raises(ValidationError, match="colour"):
        cls.Config(bits=4, colour="red")
    ctx = make_ctx(batches(1))
    cls(cls.Config(ignore=["re:.*mlp.*"]), 0).run(model, ctx)
    assert len(ctx.report.layers) == 12 and sum("mlp" in s["layer"] for s in ctx.report.skipped) == 9


def test_only_one_block_of_inputs_is_kept():
    """Block 0's input hidden states are freed once block 1 is being calibrated."""
    import gc
    import weakref

    model = tiny_model()
    refs, alive = [], {}

    def extra_hooks(i, block):
        if i == 0:
            return [block.register_forward_pre_hook(lambda m, args: refs.append(weakref.ref(args[0])))]
        return []

    def on_block(i, block):
        gc.collect()
        alive[i] = sum(r() is not None for r in refs)

    run_sequential(model, batches(3), block_linears(model), hessian_stats, gptq_apply,
                   on_block=on_block, extra_hooks=extra_hooks)
    assert alive[0] == 3 and alive[1] == 0 and alive[2] == 0


def test_sparsegpt_then_gptq_keeps_zeros():
    model = tiny_model()
    data = batches()
    for name, cfg in [("sparsegpt", dict(pattern="2:4")), ("gptq", dict(group_size=32))]:
        cls = STEPS.get(name)
        cls(cls.Config(**cfg), 0).run(model, make_ctx(data))
    for n, m in model.named_modules():
        if hasattr(m, "weight_mask"):
            assert not get_weight(m)[~m.weight_mask].any(), n      # packed: the dequantized weight
