"""ISA detection (nnsqueeze.isa): CPUID through torch first, /proc/cpuinfo only as a fallback,
the NNSQUEEZE_ISA override, and a check that the detected kernel class is the one ONNX Runtime runs."""

import pytest
import torch
from torch import nn

from nnsqueeze import isa as isa_mod
from nnsqueeze.errors import RecipeError
from nnsqueeze.export.ort import u8s8_may_saturate
from nnsqueeze.isa import ISAS, describe, u8s8_saturates


@pytest.fixture
def fresh_detect(monkeypatch):
    """Clear the cached CPUID answer before and after, and drop any NNSQUEEZE_ISA override."""
    monkeypatch.delenv("NNSQUEEZE_ISA", raising=False)
    isa_mod._detect.cache_clear()
    yield
    isa_mod._detect.cache_clear()


@pytest.mark.parametrize("machine,caps,isa,saturates", [
    ("x86_64", {"avx2": True, "fma3": True}, "avx2", True),
    ("x86_64", {"avx2": True, "avx512_f": True, "avx512_bw": True}, "avx512", True),
    ("x86_64", {"avx2": True, "avx512_f": True, "avx512_bw": True, "avx512_vnni": True}, "avx512-vnni", False),
    ("x86_64", {"avx2": True, "avx_vnni": True}, "avx-vnni", False),
    ("x86_64", {"avx2": True, "avx512_vnni": True, "amx_int8": True}, "amx", False),
    ("x86_64", {"sse4_2": True}, "sse", True),
    ("aarch64", {"neon": True, "dot": True}, "arm64", False),
    ("riscv64", {}, "other", False),
])
def test_isa_from_cpuid(monkeypatch, fresh_detect, machine, caps, isa, saturates):
    import platform

    monkeypatch.setattr(platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    # /proc/cpuinfo says VNNI (as the host's file does under qemu-user): CPUID wins
    monkeypatch.setattr(isa_mod, "_proc_flags", lambda: {"avx2": True, "avx512_vnni": True})
    d = describe()
    assert (d["isa"], d["u8s8_saturates"]) == (isa, saturates)
    assert d["source"] == ("cpuid" if machine == "x86_64" else "platform")
    assert u8s8_saturates() is saturates and u8s8_may_saturate() is saturates  # the older name too


@pytest.mark.parametrize("flags,isa", [
    ({"avx2": True, "fma": True}, "avx2"),
    ({"avx2": True, "avx512f": True, "avx512bw": True}, "avx512"),
    ({"avx2": True, "avx512_vnni": True}, "avx512-vnni"),
    ({"avx2": True, "avx_vnni": True}, "avx-vnni"),
    (None, "sse"),  # nothing readable: count as saturating (7-bit codes are exact everywhere)
])
def test_proc_cpuinfo_is_the_fallback(monkeypatch, fresh_detect, flags, isa):
    import platform

    def no_torch():
        raise RuntimeError("no CPUID through torch")

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "get_capabilities", no_torch)
    monkeypatch.setattr(torch.cpu, "_is_avx2_supported", no_torch)
    monkeypatch.setattr(isa_mod, "_proc_flags", lambda: flags)
    d = describe()
    assert d["isa"] == isa and d["source"] == ("/proc/cpuinfo" if flags else "unknown")
    assert d["u8s8_saturates"] is (isa in ("avx2", "avx512", "sse"))


def test_env_override(monkeypatch, fresh_detect):
    for name in ISAS:
        monkeypatch.setenv("NNSQUEEZE_ISA", name.upper())
        d = describe()
        assert d["isa"] == name and d["source"] == "NNSQUEEZE_ISA"
        assert d["u8s8_saturates"] is (name in ("avx2", "avx512", "sse"))
    monkeypatch.setenv("NNSQUEEZE_ISA", "avx9000")
    with pytest.raises(RecipeError, match="unknown ISA 'avx9000'") as e:
        describe()
    assert e.value.where == "NNSQUEEZE_ISA" and "avx512-vnni" in e.value.fix


def test_default_is_the_real_cpu(fresh_detect):
    d = describe()
    assert d["isa"] in ISAS and d["source"] in ("cpuid", "platform")
    assert d["onnxruntime"] == __import__("onnxruntime").__version__


@pytest.mark.ort_isa
@pytest.mark.parametrize("bits", [8, 7])
def test_detected_kernel_class_is_what_onnx_runtime_runs(tmp_path, bits):
    """A layer where every u8*s8 pair sum exceeds int16: ORT is exact with 8-bit codes only where
    nnsqueeze says its u8s8 kernels do not saturate; 7-bit codes are exact on every CPU."""
    from nnsqueeze.export.onnx import export_onnx
    from nnsqueeze.export.ort import OrtModule
    from nnsqueeze.quant.dynamic import convert_dynamic_

    layer = nn.Linear(16, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0] * 16, [-1.0] * 16]))  # codes +-127 (or +-63)
    convert_dynamic_(layer, bits=bits, signed=True).eval()
    assert int(layer.weight_codes().abs().max()) == 2 ** (bits - 1) - 1
    x = torch.ones(3, 16)  # activation codes 255: 2 * 255 * 127 > 32767
    export_onnx(layer, tmp_path / "l.onnx", x, verify=False)
    with torch.no_grad():
        exact = layer(x)  # the layer computes ORT's integer arithmetic in int32
    got = OrtModule(tmp_path / "l.onnx", threads=1)(x)
    assert torch.equal(got, exact) is not (bits == 8 and u8s8_saturates())


@pytest.mark.parametrize("isa", ISAS)
def test_weight_range_is_the_one_decision(monkeypatch, isa):
    """7-bit codes only for 8-bit weights on u8s8 kernels: always with True, on saturating CPUs with
    'auto'; a note when auto reduces and when False keeps 8 bits where ORT will differ."""
    from nnsqueeze.isa import SATURATING, weight_range

    monkeypatch.setenv("NNSQUEEZE_ISA", isa)
    sat = isa in SATURATING
    for bits in (4, 7, 8):
        for rr in (True, False, "auto"):
            for u8s8 in (True, False):
                got = weight_range(bits, rr, u8s8=u8s8, hint="HINT")
                concerned = bits == 8 and u8s8
                assert got.bits == (7 if concerned and (rr is True or rr == "auto" and sat) else bits)
                if concerned and sat and rr == "auto":
                    assert f"({isa})" in got.note and "7-bit" in got.note and got.note.endswith("HINT)")
                elif concerned and sat and rr is False:
                    assert f"({isa})" in got.note and "will differ" in got.note
                else:
                    assert got.note is None


@pytest.mark.parametrize("isa", ["avx2", "avx512-vnni"])
def test_every_caller_takes_the_same_decision(monkeypatch, isa):
    """quantize-dynamic, convert_dynamic_(bits=None) and sensitivity agree with weight_range (the
    quantize step: tests/steps/test_quantize.py::test_reduce_range)."""
    from nnsqueeze.context import Context
    from nnsqueeze.isa import weight_range
    from nnsqueeze.quant.dynamic import convert_dynamic_
    from nnsqueeze.sensitivity import resolve_reduce_range
    from nnsqueeze.steps.quantize_dynamic import QuantizeDynamic

    def first(note):  # the decision's words; each step adds its own hint for keeping 8 bits
        return note.split(" (weights.reduce_range: auto;")[0]

    monkeypatch.setenv("NNSQUEEZE_ISA", isa)
    for signed in (True, False):
        assert convert_dynamic_(nn.Linear(3, 2), signed=signed).bits == weight_range(8, "auto", u8s8=signed).bits
        for rr in (True, False, "auto"):
            ctx = Context()
            ctx.report.begin_step("quantize-dynamic", {})
            step = QuantizeDynamic(QuantizeDynamic.Config(weights={"symmetric": signed, "reduce_range": rr}))
            model = step.run(nn.Sequential(nn.Linear(6, 4)), ctx)
            want = weight_range(8, rr, u8s8=signed)
            assert model[0].bits == want.bits and step.record()["layers"]["0"]["bits"] == want.bits
            notes = [first(n["note"]) for n in ctx.report.notes if "reduce_range" in n["note"]]
            assert notes == ([first(want.note)] if want.note else [])
    assert resolve_reduce_range({"bits": 8})["reduce_range"] is (weight_range(8, "auto").bits == 7)
    assert resolve_reduce_range({"bits": 4}) == {"bits": 4}
