"""``scale_dtype``: scales rounded up to a value of the stored type, codes chosen against it."""

from __future__ import annotations

import pytest
import torch

from nnsqueeze.llm.gptq import gptq_quantize
from nnsqueeze.llm.rtn import rtn_quantize, storable_scale


def test_storable_scale_rounds_up_to_the_type():
    s = torch.tensor([0.1, 1e-3, 3.3e-6, 1e-9, 2.0])
    for name, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        r = storable_scale(s, name)
        assert r.dtype == torch.float32 and torch.equal(r.to(dt).float(), r)
        assert bool((r >= s).all()) and r[4] == 2.0 and bool((r > 0).all())
    assert storable_scale(s, "fp32") is s
    with pytest.raises(ValueError, match="fp16 range"):
        storable_scale(torch.tensor([1e5]), "fp16")


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_fp16_scales_codes_on_the_stored_grid(bits, symmetric):
    w = torch.randn(6, 80, generator=torch.Generator().manual_seed(1))
    r = rtn_quantize(w, bits, 32, symmetric, scale_dtype="fp16")
    assert torch.equal(r.scale.half().float(), r.scale)
    s = r.scale.repeat_interleave(32, 1)[:, :80]
    z = r.zero_point.repeat_interleave(32, 1)[:, :80].float()
    codes = r.weight / s + z
    assert torch.equal(codes, codes.round())                              # weights are exact grid values
    assert (r.weight - w).abs().max() <= s.max() / 2 + 1e-6 or not symmetric
    ref = rtn_quantize(w, bits, 32, symmetric)                            # fp32 scales: close, not equal
    assert (r.weight - ref.weight).abs().max() < 2 * ref.scale.max()


def test_gptq_identity_hessian_equals_rtn_with_fp16_scales():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    g = gptq_quantize(w, torch.eye(64, dtype=torch.float64), 4, 32, True, scale_dtype="fp16")
    r = rtn_quantize(w, 4, 32, True, scale_dtype="fp16")
    assert torch.equal(g.weight, r.weight) and torch.equal(g.scale, r.scale)


def test_bad_scale_dtype():
    with pytest.raises(ValueError, match="scale_dtype"):
        rtn_quantize(torch.randn(2, 8), 4, 8, True, scale_dtype="fp8")
