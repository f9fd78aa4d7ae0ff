"""Which integer kernels ONNX Runtime runs on this CPU, read from CPUID (through torch).

ONNX Runtime's MLAS picks its uint8 x int8 matrix kernel (QLinearConv, QGemm, MatMulInteger,
DynamicQuantizeMatMul) from the CPU's instruction sets, and they do not all compute the same:

- x86 with AMX, AVX512-VNNI or AVX-VNNI (``amx``, ``avx512-vnni``, ``avx-vnni``): VPDPBUSD/TDPBUSD
  add u8*s8 products straight into int32: exact.
- x86 with AVX2 only, or AVX-512 without VNNI (``avx2``, ``avx512``; e.g. Haswell..Skylake, AMD
  Zen 1-3), and older x86 (``sse``): VPMADDUBSW adds two u8*s8 products into an int16 *with
  saturation* (255 * 127 * 2 > 32767), so outputs drift from the exact int32 result. Weight codes
  of 7 bits (|w| <= 63, ``weights.reduce_range``) cannot saturate.
- ARM64 (``arm64``: NEON SDOT/UDOT, I8MM) and other CPUs: ORT accumulates u8s8 in int32: exact.

uint8 x uint8 kernels accumulate in int32 on every CPU (AVX2 widens to int16, then VPMADDWD).

Features come from CPUID through ``torch.cpu.get_capabilities()``, not from ``/proc/cpuinfo``,
which lies under emulation (qemu-user shows the host's file) and in VMs/containers that mask
features; the file is read only when torch cannot tell. ``NNSQUEEZE_ISA=<isa>`` (one of
:data:`ISAS`) forces the answer, e.g. to compress for a known deployment CPU or in tests::

    >>> from nnsqueeze.isa import describe
    >>> sorted(describe())
    ['arch', 'isa', 'onnxruntime', 'source', 'u8s8_saturates']
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from typing import Any, NamedTuple

from .errors import RecipeError

ENV = "NNSQUEEZE_ISA"
SATURATING = ("avx512", "avx2", "sse")  # x86 without VNNI: VPMADDUBSW int16 pair sums
EXACT = ("amx", "avx512-vnni", "avx-vnni", "arm64", "other")
ISAS = EXACT[:3] + SATURATING + EXACT[3:]
_X86 = ("x86_64", "amd64", "i386", "i686", "x86")


def _isa_from(caps: dict[str, Any]) -> str:
    """The best u8s8 kernel class given CPU feature names (torch's spelling, or /proc/cpuinfo's)."""
    has = {k for k, v in caps.items() if v is True}
    if has & {"amx_int8"}:
        return "amx"
    if has & {"avx512_vnni", "avx512vnni"}:
        return "avx512-vnni"
    if has & {"avx_vnni", "avxvnni"}:
        return "avx-vnni"
    if has & {"avx512_f", "avx512f"} and has & {"avx512_bw", "avx512bw"}:
        return "avx512"
    if "avx2" in has:
        return "avx2"
    return "sse"


def _proc_flags() -> dict[str, bool] | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return {flag: True for flag in line.split(":", 1)[1].lower().split()}
    except OSError:
        pass
    return None


def cpu_flags() -> set[str]:
    """This CPU's feature flags as ``/proc/cpuinfo`` lists them (empty where it cannot be read)."""
    return set(_proc_flags() or ())


@lru_cache(maxsize=1)
def _detect() -> tuple[str, str, str]:
    """(arch, isa, source) of this machine: CPUID via torch first, /proc/cpuinfo as a fallback."""
    arch = platform.machine().lower()
    if arch in ("arm64", "aarch64"):
        return "arm64", "arm64", "platform"
    if arch not in _X86:
        return arch or "unknown", "other", "platform"
    arch = "x86_64" if arch in ("x86_64", "amd64") else "x86"
    try:
        import torch

        caps = dict(torch.cpu.get_capabilities())
        return arch, _isa_from(caps), "cpuid"
    except Exception:  # older torch: the individual probes, then the kernel's view
        pass
    try:
        import torch

        c = torch.cpu
        caps = {"amx_int8": c._is_amx_tile_supported(), "avx512_vnni": c._is_vnni_supported(),
                "avx512_f": c._is_avx512_supported(), "avx512_bw": c._is_avx512_supported(),
                "avx2": c._is_avx2_supported()}
        return arch, _isa_from(caps), "cpuid"
    except Exception:
        pass
    flags = _proc_flags()
    if flags is not None:
        return arch, _isa_from(flags), "/proc/cpuinfo"
    return arch, "sse", "unknown"  # unknown x86 counts as saturating: 7-bit weights are safe anywhere


def _ort_version() -> str | None:
    try:
        from importlib import metadata

        return metadata.version("onnxruntime")
    except Exception:
        return None


def describe() -> dict[str, Any]:
    """This CPU's integer kernel class: ``{"arch", "isa", "u8s8_saturates", "source", "onnxruntime"}``.

    ``isa`` is one of :data:`ISAS`; ``source`` says where it came from (``cpuid``, ``/proc/cpuinfo``,
    ``platform``, ``unknown`` or ``NNSQUEEZE_ISA``)."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced:
        if forced not in ISAS:
            raise RecipeError(ENV, f"unknown ISA {forced!r}", fix=f"set it to one of {list(ISAS)} or unset it")
        arch = "arm64" if forced == "arm64" else ("other" if forced == "other" else "x86_64")
        isa, source = forced, ENV
    else:
        arch, isa, source = _detect()
    return {"arch": arch, "isa": isa, "u8s8_saturates": isa in SATURATING, "source": source,
            "onnxruntime": _ort_version()}


def u8s8_saturates() -> bool:
    """True where ONNX Runtime's uint8 x int8 kernels saturate (x86 without VNNI); see the module docstring."""
    return bool(describe()["u8s8_saturates"])


class WeightRange(NamedTuple):
    """What :func:`weight_range` decided: the weight code ``bits`` and a ``note`` for the report
    (None when there is nothing to say)."""

    bits: int
    note: str | None


def weight_range(bits: int, reduce_range: bool | str = "auto", u8s8: bool = True,
                 hint: str = "set false to keep 8") -> WeightRange:
    """The reduced-range decision, made here for every step: 7-bit instead of 8-bit weight codes
    where ONNX Runtime's u8s8 kernels would saturate (see the module docstring).

    Only 8-bit codes that run on the uint8 x int8 kernels are concerned (``u8s8``: signed weights on
    a GEMM-based op; uint8 weights and depthwise convs accumulate exactly everywhere): ``True`` gives
    7 bits, ``"auto"`` 7 bits on a saturating CPU (with a note naming it; ``hint`` says how to keep 8),
    ``False`` keeps 8 bits (with a note when ORT here will then differ from the simulation). ::

        >>> weight_range(8, True)
        WeightRange(bits=7, note=None)
        >>> weight_range(8, "auto", u8s8=False), weight_range(4, "auto")
        (WeightRange(bits=8, note=None), WeightRange(bits=4, note=None))
    """
    if bits != 8 or not u8s8:
        return WeightRange(bits, None)
    if reduce_range is True:
        return WeightRange(7, None)
    isa = describe()
    if not isa["u8s8_saturates"]:
        return WeightRange(8, None)
    if reduce_range == "auto":
        return WeightRange(7, f"this CPU ({isa['isa']}) has no VNNI, where ONNX Runtime's u8s8 kernels saturate "
                           f"with 8-bit weights: using 7-bit weight codes (weights.reduce_range: auto; {hint})")
    # Kept as asked, but ORT on this CPU will not compute what the simulation does.
    return WeightRange(8, f"weights.reduce_range: false on a CPU ({isa['isa']}) whose ONNX Runtime u8s8 kernels "
                       "saturate with 8-bit weights: ORT here will differ from the simulation (fine for "
                       "deployment on VNNI/ARM CPUs; use auto or true to run here)")
