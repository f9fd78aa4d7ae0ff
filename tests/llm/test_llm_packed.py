"""PackedLinear and its kernels: outputs against a float64 reference on odd shapes (int4/int8,
symmetric/asymmetric, group sizes 16..128 and per-row), every forward path, logged fallbacks."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from nnsqueeze.context import Context
from nnsqueeze.errors import NnsqueezeError
from nnsqueeze.llm import cbuild, gemv, packed
from nnsqueeze.llm.packed import PackedLinear, pack_linear_
from nnsqueeze.llm.tiny import TinyLlama
from nnsqueeze.ops.int4 import pack_int4
from nnsqueeze.ops.rtn import dequantize_groups
from nnsqueeze.quant.weight_only import convert_weight_only_
from nnsqueeze.registry import STEPS

# |y - y64| <= REL * (|x| @ |W|^T): float32 accumulation over K terms, far above the observed ~1e-7
REL = 1e-5
SHAPES = [(37, 301, -1, 4, False), (5, 300, 32, 4, True), (19, 256, 128, 4, False), (7, 130, 16, 4, True),
          (11, 200, 64, 8, False), (13, 77, -1, 8, True)]


def lib_or_skip():
    lib, why = gemv.load_kernel()
    if lib is None:
        pytest.skip(f"packed kernel not built here: {why}")
    return lib


def codes(n, k, g, bits, sym, seed=0):
    gen = torch.Generator().manual_seed(seed)
    groups = 1 if g <= 0 else -(-k // g)
    q = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, generator=gen)
    s = torch.rand(n, groups, generator=gen) * 0.02 + 1e-3
    z = (torch.full((n, groups), 1 << (bits - 1), dtype=torch.uint8) if sym
         else torch.randint(0, 1 << bits, (n, groups), dtype=torch.uint8, generator=gen))
    return q, s, z


@pytest.mark.parametrize("n,k,g,bits,sym", SHAPES)
@pytest.mark.parametrize("m", [1, 3])
def test_gemv_and_dequant_match_float64(n, k, g, bits, sym, m):
    lib = lib_or_skip()
    q, s, z = codes(n, k, g, bits, sym)
    gs = k if g <= 0 else g
    w = dequantize_groups(q, s, z, g)
    blob = pack_int4(q) if bits == 4 else q
    assert torch.equal(gemv.dequantize(lib, bits, k, blob, s, z, gs, 1), w)       # same arithmetic, exact
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(n, generator=torch.Generator().manual_seed(2))
    ref = x.double() @ w.double().T + bias.double()
    bound = REL * (x.double().abs() @ w.double().abs().T) + 1e-7
    for threads in (1, 2):
        y = gemv.gemv(lib, bits, x, blob, s, z, gs, bias, threads)
        assert y.shape == (m, n) and ((y.double() - ref).abs() <= bound).all()


def make_packed(n=19, k=301, g=32, bits=4, sym=False):
    torch.manual_seed(0)
    lin = nn.Linear(k, n)
    wol = convert_weight_only_(lin, bits, g, sym)
    ref_w = wol.dequantized_weight().clone()
    return pack_linear_(wol), ref_w


@pytest.mark.parametrize("bits,sym", [(4, False), (8, True)])
def test_packed_linear_paths_agree_with_reference(bits, sym, monkeypatch):
    lib_or_skip()
    layer, w = make_packed(bits=bits, sym=sym)
    assert isinstance(layer, PackedLinear) and layer.weight.dtype == torch.uint8
    assert "weight" not in dict(layer.named_parameters())                       # no float copy kept
    assert torch.equal(layer.dequantized_weight(), w)
    for shape in [(1, 301), (2, 1, 301), (3, 7, 301)]:                         # kernel, kernel, dequant+matmul
        x = torch.randn(*shape)
        ref = x.double() @ w.double().T + layer.bias.double()
        bound = REL * (x.double().abs() @ w.double().abs().T) + 1e-6
        with torch.no_grad():
            assert ((layer(x).double() - ref).abs() <= bound).all()
        xg = x.clone().requires_grad_(True)                                      # autograd: torch fallback
        y = layer(xg)
        y.sum().backward()
        assert ((y.double() - ref).abs() <= bound).all() and xg.grad is not None


def test_fallback_is_logged_and_reported(monkeypatch, caplog):
    monkeypatch.setattr(packed, "_backends", {})
    monkeypatch.setattr(packed, "_warned", set())
    monkeypatch.setattr(cbuild, "_cache", {})
    monkeypatch.setenv("NNSQUEEZE_PACKED_KERNEL", "0")
    layer, w = make_packed()
    x = torch.randn(1, 301)
    with caplog.at_level(logging.WARNING, logger="nnsqueeze"), torch.no_grad():
        y = layer(x)
    assert any("kernel unavailable" in r.message for r in caplog.records)
    assert torch.allclose(y, x @ w.T + layer.bias, atol=1e-5)
    ctx = Context(progress=False)
    ctx.report.begin_step("rtn", {})
    STEPS.get("rtn")(STEPS.get("rtn").Config(bits=4, group_size=32), 0).run(TinyLlama().eval(), ctx)
    assert any(n["step"] == "rtn" and "kernel unavailable" in n["note"] for n in ctx.report.notes)


@pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"), reason="torch has no int4 CPU op")
def test_aten_backend_matches_reference(monkeypatch):
    monkeypatch.setattr(packed, "_backends", {})
    monkeypatch.setenv("NNSQUEEZE_PACKED_BACKEND", "aten")
    layer, w = make_packed(n=40, k=256, g=128)                                   # N padded to 48 inside
    x = torch.randn(1, 256)
    with torch.no_grad():
        y = layer(x)
    ref = x.double() @ w.double().T + layer.bias.double()
    assert ((y.double() - ref).abs() <= REL * (x.double().abs() @ w.double().abs().T) + 1e-6).all()


def test_packed_weight_bytes_are_a_seventh():
    layer, _ = make_packed(n=64, k=512, g=128, bits=4, sym=True)
    nbytes = sum(t.numel() * t.element_size() for t in list(layer.parameters()) + list(layer.buffers()))
    fp32 = 64 * 512 * 4 + 64 * 4
    assert fp32 / nbytes > 6.5


@pytest.mark.parametrize("march", ["haswell", "x86-64"])  # the AVX2/FMA path and the plain C loop
def test_other_instruction_sets_match_float64(march, monkeypatch):
    """This CPU takes the AVX-512 branch with -march=native; build the other branches explicitly."""
    import platform
    import shutil
    if platform.machine() != "x86_64" or not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("needs an x86-64 machine with a C compiler")
    monkeypatch.setattr(cbuild, "FLAGS", ["-O3", f"-march={march}", "-fopenmp", "-fPIC", "-shared"])
    monkeypatch.setattr(cbuild, "_cache", {})
    lib, why = gemv.load_kernel()
    assert lib is not None, why
    for n, k, g, bits, sym in SHAPES[:4] + SHAPES[-2:]:
        q, s, z = codes(n, k, g, bits, sym)
        gs = k if g <= 0 else g
        w = dequantize_groups(q, s, z, g)
        blob = pack_int4(q) if bits == 4 else q
        assert torch.equal(gemv.dequantize(lib, bits, k, blob, s, z, gs, 1), w)
        x = torch.randn(2, k, generator=torch.Generator().manual_seed(1))
        ref = x.double() @ w.double().T
        bound = REL * (x.double().abs() @ w.double().abs().T) + 1e-7
        y = gemv.gemv(lib, bits, x, blob, s, z, gs, None, 2)
        assert ((y.double() - ref).abs() <= bound).all()


@pytest.mark.parametrize("mode", packed.PREFILL_MODES)
@pytest.mark.parametrize("n,k,g,bits,sym,bias", [(37, 301, -1, 4, False, True), (300, 130, 16, 4, True, False),
                                                 (45, 200, 64, 8, False, True)])
def test_prefill_paths_match_float64_without_a_whole_float_matrix(mode, n, k, g, bits, sym, bias, monkeypatch):
    """Many rows: every prefill path against float64; ``tiles`` never dequantizes more than one tile."""
    lib_or_skip()
    monkeypatch.setenv("NNSQUEEZE_PACKED_PREFILL", mode)
    monkeypatch.setattr(packed, "TILE_BYTES", 16 * 4 * k + 4 * k)   # 17 rows: several tiles and a short last one
    monkeypatch.setattr(packed, "MIN_TILE_ROWS", 1)
    torch.manual_seed(3)
    layer, w = make_packed(n=n, k=k, g=g, bits=bits, sym=sym)
    if not bias:
        layer.bias = None
    seen = []
    real = gemv.dequantize
    monkeypatch.setattr(gemv, "dequantize", lambda *a, **kw: seen.append(a[4].shape[0]) or real(*a, **kw))
    x = torch.randn(2, 33, k, generator=torch.Generator().manual_seed(4))
    ref = x.double() @ w.double().T + (layer.bias.double() if bias else 0)
    bound = REL * (x.double().abs() @ w.double().abs().T) + 1e-6
    with torch.no_grad():
        y = layer(x)
    assert y.shape == (2, 33, n) and y.is_contiguous() and ((y.double() - ref).abs() <= bound).all()
    expected = {"tiles": [17] * (n // 17) + ([n % 17] if n % 17 else []), "codes": [], "full": [n]}[mode]
    assert seen == expected


def test_unknown_prefill_mode_is_logged(monkeypatch, caplog):
    monkeypatch.setattr(packed, "_warned", set())
    monkeypatch.setenv("NNSQUEEZE_PACKED_PREFILL", "bogus")
    with caplog.at_level(logging.WARNING, logger="nnsqueeze"):
        assert packed.prefill_mode() == "tiles"
    assert any("NNSQUEEZE_PACKED_PREFILL='bogus'" in r.message for r in caplog.records)


def test_dequantize_out_buffer_is_checked():
    lib = lib_or_skip()
    q, s, z = codes(5, 64, 32, 4, True)
    blob = pack_int4(q)
    with pytest.raises(NnsqueezeError, match="contiguous float32"):
        gemv.dequantize(lib, 4, 64, blob, s, z, 32, 1, out=torch.empty(5, 63))
    out = torch.empty(5, 64)
    assert gemv.dequantize(lib, 4, 64, blob, s, z, 32, 1, out=out) is out
    assert torch.equal(out, dequantize_groups(q, s, z, 32))


def a8_reference(x, w, gs):
    """float64 y for ``x`` rounded to int8 per group (scale absmax / 127, ties to even) and the
    closed-form bound of that rounding against the float64 product with the unrounded ``x``."""
    m, k = x.shape
    groups = -(-k // gs)
    xp = torch.nn.functional.pad(x, (0, groups * gs - k)).view(m, groups, gs)
    amax = xp.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))            # float32, as the kernel
    xq = (torch.round(xp * inv).clamp(-127, 127).double() * (amax.double() / 127)).view(m, -1)[:, :k]
    wg = torch.nn.functional.pad(w.abs(), (0, groups * gs - k)).view(w.shape[0], groups, gs).sum(-1).double()
    return xq @ w.double().T, 0.5001 * (amax.squeeze(-1).double() / 127) @ wg.T


# (9, 480, 96): groups of three 16-byte blocks, an odd count of them (5), so the two-group step and the general
# loop both run; (40, 576, 64): SmolLM2's hidden size
@pytest.mark.parametrize("n,k,g,bits,sym", SHAPES + [(40, 576, 64, 4, True), (9, 480, 96, 4, False)])
@pytest.mark.parametrize("march", ["native", "haswell", "x86-64"])   # VNNI (here), AVX2 maddubs, none
def test_int8_activation_kernel_matches_float64(n, k, g, bits, sym, march, monkeypatch):
    import platform
    if march != "native" and platform.machine() != "x86_64":
        pytest.skip("explicit -march builds are x86-64 only")
    lib_or_skip()
    monkeypatch.setattr(cbuild, "FLAGS", ["-O3", f"-march={march}", "-fopenmp", "-fPIC", "-shared"])
    monkeypatch.setattr(cbuild, "_cache", {})
    lib, why = gemv.load_kernel()
    assert lib is not None, why
    q, s, z = codes(n, k, g, bits, sym)
    gs = k if g <= 0 else g
    w = dequantize_groups(q, s, z, g)
    blob = pack_int4(q) if bits == 4 else q
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(1))
    x[1, :gs] = 0                                                                  # an all-zero group
    bias = torch.randn(n, generator=torch.Generator().manual_seed(2))
    for threads in (1, 2):
        y = gemv.gemv_a8(lib, bits, x, blob, s, z, gs, bias, threads)
        flags = open("/proc/cpuinfo").read() if march == "native" else ""
        has_int = march == "haswell" and bits == 4 or march == "native" and (bits == 4 or "vnni" in flags)
        if not has_int:
            assert y is None                                                       # caller falls back
            continue
        emulated, bound = a8_reference(x, w, gs)
        emulated = emulated + bias.double()
        exact = x.double() @ w.double().T + bias.double()
        fp_err = REL * (x.double().abs() @ w.double().abs().T) + 1e-6
        assert y.shape == (3, n) and ((y.double() - emulated).abs() <= fp_err).all()   # the int8 rounding, nothing else
        assert ((y.double() - exact).abs() <= bound + fp_err).all()                    # closed-form error bound


def test_int8_activations_are_opt_in_and_fall_back_logged(monkeypatch, caplog):
    lib_or_skip()
    layer, w = make_packed(n=23, k=320, g=64, bits=4, sym=True)
    x = torch.randn(1, 320, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y_float = layer(x)
        monkeypatch.setenv("NNSQUEEZE_PACKED_ACT", "int8")
        y_int8 = layer(x)
        emulated, _ = a8_reference(x, w, 64)
        assert not torch.equal(y_float, y_int8)
        assert ((y_int8.double() - emulated - layer.bias.double()).abs()
                <= REL * (x.double().abs() @ w.double().abs().T) + 1e-6).all()
        monkeypatch.setattr(gemv, "gemv_a8", lambda *a: None)                     # a build without the path
        monkeypatch.setattr(packed, "_warned", set())
        with caplog.at_level(logging.WARNING, logger="nnsqueeze"):
            assert torch.equal(layer(x), y_float)
    assert any("float activations instead" in r.message for r in caplog.records)


@pytest.mark.parametrize("n,k,g,bits,sym", SHAPES)
def test_packed_layers_count_their_weights_as_parameters(n, k, g, bits, sym):
    """count_params of a packed layer: out * in weights (+ bias), the zeros those whose code is the zero
    point (against the dequantized weight, computed independently)."""
    from nnsqueeze.evaluate import count_params

    torch.manual_seed(0)
    layer, w = make_packed(n=n, k=k, g=g, bits=bits, sym=sym)
    total, nonzero = count_params(layer)
    nb = 0 if layer.bias is None else layer.bias.numel()
    assert total == n * k + nb
    assert nonzero == int(torch.count_nonzero(w)) + (0 if layer.bias is None else int(torch.count_nonzero(layer.bias)))
