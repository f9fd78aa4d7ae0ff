"""GPTQ export loaded the way users load GPTQ checkpoints: ``transformers.AutoModelForCausalLM.from_pretrained``
on CPU, which hands the ``quantization_config`` to ``optimum`` and ``gptqmodel`` (its quantized Linears and
their v1 -> v2 zero-point conversion). Three checks per scheme on the tiny random LLaMA of the format tests:

- gptqmodel's own dequantization of every layer equals nnsqueeze's weights rounded to float16 (its kernels
  hold the weight in the scales' dtype; the exact ``(q - z) * s`` rounds once to the nearest fp16), bit for bit;
- logits within 5e-4 (absolute; gptqmodel's float32 path multiplies by those fp16 weights, the tiny model's
  logits are below 1);
- 16 greedy tokens equal;
- with ``scale_dtype: fp16-exact``: the fp16 dequantization equals the float32 weights and the logits are
  within 1e-5.

Neither package is in the ``dev`` / ``hf`` extras: gptqmodel 7.7 declares ``torch>=2.14.1`` (install it with
``pip install --no-deps gptqmodel optimum`` plus its other requirements, see docs/llm.md), so without them
this module is skipped with that reason. The layout is tested without them, against the GPTQ dequantization
formula written independently, in ``test_gptq_format.py``.
"""

from __future__ import annotations

import pytest
import torch

from nnsqueeze.llm.packed import PackedLinear
from llm_fixtures import ids, packed, tokenizer  # noqa: F401 - pytest fixtures

WHY = ("needs optimum and gptqmodel (not in the dev/hf extras; gptqmodel 7.7 pins torch>=2.14.1): "
       "pip install --no-deps gptqmodel optimum, then its other requirements (docs/llm.md)")
pytest.importorskip("optimum.gptq", reason=WHY)
pytest.importorskip("gptqmodel", reason=WHY)

import transformers  # noqa: E402
from gptqmodel.nn_modules.qlinear import BaseQuantLinear  # noqa: E402

ATOL = 5e-4   # issue 11's acceptance bound on the logits


@pytest.mark.parametrize("scale_dtype", ["fp16", "fp16-exact"])
@pytest.mark.parametrize("bits,group,sym", [(4, 32, True), (4, 16, False), (8, None, True), (8, 32, False)],
                         ids=["int4-g32-sym-v1", "int4-g16-asym-v2", "int8-channel-sym-v1", "int8-g32-asym-v2"])
def test_transformers_gptqmodel_loads_same_weights_logits_tokens(packed, tokenizer, ids, tmp_path, bits, group, sym,
                                                                 scale_dtype):
    """``fp16-exact`` scales: gptqmodel's fp16 dequantization equals nnsqueeze's float32 weights exactly, and
    the logits differ by float32 summation order only (1e-5 here)."""
    res = packed(bits, group, sym, scale_dtype)
    exact = scale_dtype == "fp16-exact"
    out = res.save(tmp_path / "gptq", format="gptq", tokenizer=tokenizer)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, device_map="cpu").eval()

    mine = {n: m for n, m in res.model.named_modules() if isinstance(m, PackedLinear)}
    theirs = {n: m for n, m in loaded.named_modules() if isinstance(m, BaseQuantLinear)}
    assert set(theirs) == set(mine) and len(mine) == 14
    for name, q in theirs.items():
        assert (q.bits, q.in_features, q.out_features) == (bits, mine[name].in_features, mine[name].out_features)
        with torch.no_grad():
            w = q.dequantize_weight()                       # (in, out), in the scales' dtype (fp16)
        assert w.dtype == torch.float16, name
        assert torch.equal(w.T, mine[name].dequantized_weight().to(torch.float16)), name
        if exact:  # nothing rounded: the fp16 weights are the float32 ones
            assert torch.equal(w.T.float(), mine[name].dequantized_weight()), name

    with torch.no_grad():
        diff = (loaded(ids).logits.float() - res.model(ids).logits).abs().max().item()
        bound = 1e-5 if exact else ATOL
        assert diff <= bound, f"max |logit diff| {diff:.3g} > {bound}"   # measured (fp16): 1.2e-4 .. 2.1e-4
        kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=0)
        theirs_tokens, mine_tokens = loaded.generate(ids[:1], **kw), res.model.generate(ids[:1], **kw)
    assert theirs_tokens.shape[1] == ids.shape[1] + 16
    assert torch.equal(theirs_tokens, mine_tokens)
