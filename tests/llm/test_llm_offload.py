"""``max_memory``: decoder blocks parked on disk (memory-mapped safetensors) during block-wise
calibration give exactly the in-memory results, and only the active block is in ordinary memory."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from nnsqueeze.context import Context
from nnsqueeze.errors import RecipeError
from nnsqueeze.llm.gptq import HessianAccumulator, gptq_quantize
from nnsqueeze.llm.offload import mmap_safetensors, parse_bytes, tensor_bytes
from nnsqueeze.llm.sequential import block_linears, get_weight, run_sequential, set_weight
from nnsqueeze.llm.tiny import TinyLlama, TinyLlamaConfig
from nnsqueeze.recipe import load_recipe
from nnsqueeze.registry import STEPS

CFG = TinyLlamaConfig(vocab_size=61, hidden_size=64, intermediate_size=96, num_layers=3)


def tiny():
    torch.manual_seed(0)
    return TinyLlama(CFG).eval()


def batches(n=2):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, CFG.vocab_size, (2, 20), generator=g) for _ in range(n)]


def mapping_of(ptr: int) -> str:
    """The /proc/self/maps path of the mapping holding address ``ptr`` ('' for anonymous memory)."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= ptr < hi:
                return parts[5].strip() if len(parts) > 5 else ""
    raise AssertionError(f"address {ptr:#x} is not mapped")


@pytest.mark.skipif(not open("/proc/self/maps").readable(), reason="needs Linux /proc")
def test_only_the_active_block_is_in_memory_and_results_are_identical(tmp_path):
    data = batches()
    ref = tiny()

    def apply(name, mod, acc):
        set_weight(mod, gptq_quantize(get_weight(mod), acc.hessian, bits=4, group_size=32).weight)

    def stats(name, mod):
        return HessianAccumulator(get_weight(mod).shape[1])

    run_sequential(ref, data, block_linears(ref), stats, apply)
    model = tiny()
    budget = tensor_bytes(model) // 2
    where = {}

    def on_block(i, block):
        where[i] = [mapping_of(b.self_attn.q_proj.weight.data_ptr()) for b in model.model.layers]

    rep = run_sequential(model, data, block_linears(model), stats, apply, on_block=on_block, max_memory=budget,
                         offload_dir=str(tmp_path))
    assert rep.offloaded and rep.resident_weights_mib * 2**20 < budget < rep.model_mib * 2**20
    for i, paths in where.items():
        for j, path in enumerate(paths):
            if j == i:
                assert path in ("", "[heap]"), (i, j, path)           # the active block: anonymous memory
            else:
                assert "nsq-offload-" in path, (i, j, path)           # the others: a file mapping
    for (n, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), n
    ids = batches(1)[0]
    assert torch.equal(model(ids).logits, ref(ids).logits)
    assert list(tmp_path.iterdir()) == []                              # nothing left on disk


def test_gptq_step_with_budget_packs_identically():
    ctx_a, ctx_b = Context(calib_data=batches(), progress=False), Context(calib_data=batches(), progress=False)
    for ctx in (ctx_a, ctx_b):
        ctx.report.begin_step("gptq", {})
    cls = STEPS.get("gptq")
    a = cls(cls.Config(bits=4, group_size=32, samples=4), 0).run(tiny(), ctx_a)
    small = tensor_bytes(tiny()) // 3
    b = cls(cls.Config(bits=4, group_size=32, samples=4, max_memory=small), 0).run(tiny(), ctx_b)
    assert ctx_b.report.steps[-1]["figures"]["offloaded_blocks"] is True
    assert "offloaded_blocks" not in ctx_a.report.steps[-1]["figures"]
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert tensor_bytes(b) < tensor_bytes(tiny()) / 2                  # packed blocks came back from disk


def test_mmap_reader_matches_safetensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"f": torch.randn(3, 5, generator=g), "b": torch.rand(7, generator=g) > 0.5,
               "u": torch.randint(0, 255, (5, 3), dtype=torch.uint8, generator=g),
               "h": torch.randn(1, 3, generator=g).to(torch.bfloat16), "e": torch.empty(0, 4),
               "i": torch.arange(11, dtype=torch.int64)}
    save_file(tensors, str(tmp_path / "t.safetensors"))
    ref = load_file(str(tmp_path / "t.safetensors"))
    got = mmap_safetensors(tmp_path / "t.safetensors")
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), k
    got["f"].add_(1)                                                   # copy-on-write: the file is unchanged
    assert torch.equal(load_file(str(tmp_path / "t.safetensors"))["f"], tensors["f"])


def test_budget_parsing_and_errors():
    assert parse_bytes("64MiB") == 64 * 2**20 and parse_bytes("1.5 GB") == 1_500_000_000
    assert load_recipe([{"gptq": {"max_memory": "300MB"}}]).steps[0].config.max_memory == 300_000_000
    with pytest.raises(RecipeError, match="max_memory"):
        load_recipe([{"gptq": {"max_memory": "lots"}}])
    with pytest.raises(RecipeError, match="max_memory"):
        load_recipe([{"awq": {"max_memory": 0}}])
