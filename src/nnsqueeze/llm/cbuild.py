"""Build C kernels once per source, flags and CPU, and load them with ctypes.

:func:`compile_library` compiles C source with the system compiler (``cc -O3 -march=native -fopenmp``)
into ``$NNSQUEEZE_CACHE/kernels/<stem>_<key>.so`` (default ``~/.cache/nnsqueeze``), keyed by the
source, the flags, the compiler and the CPU's feature flags, and reuses it (also across processes: the
file appears by one rename). It returns ``(None, reason)`` where no compiler or build is possible;
callers fall back and log it. ``$NNSQUEEZE_KERNEL_MARCH`` picks another ``-march`` (the tests build the
AVX2 and plain-C paths on any x86-64 machine this way); ``NNSQUEEZE_PACKED_KERNEL=0`` disables every
library. Used by :mod:`.gemv` (packed matrix-vector kernels) and :mod:`.decode_c` (the decode loop)::

    >>> from nnsqueeze.llm.cbuild import flags
    >>> "-O3" in flags() and "-fopenmp" in flags()
    True
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from ..errors import ModelError

# AVX2 + FMA intrinsics where the CPU has them (x86-64 since 2013), a plain C loop elsewhere. No
# -ffast-math: it would link crtfastmath, which flushes denormals to zero for the whole process.
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared"]
MARCH_ENV = "NNSQUEEZE_KERNEL_MARCH"


def flags() -> list[str]:
    """:data:`FLAGS` with ``-march`` taken from ``$NNSQUEEZE_KERNEL_MARCH`` when set: ``haswell`` builds the
    AVX2 + FMA paths an AVX2-only server runs (no AVX-512, no VNNI) on any AVX2 CPU, ``x86-64`` the plain C
    loops; the tests use it to check every path on one machine."""
    march = os.environ.get(MARCH_ENV, "native")
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", march):
        raise ModelError(MARCH_ENV, f"{march!r} is not a -march value",
                         fix="use a GCC -march name such as native, haswell, skylake-avx512 or x86-64")
    return [f"-march={march}" if f == "-march=native" else f for f in FLAGS]

_lock = threading.Lock()
_cache: dict[str, tuple[object | None, str]] = {}


def _cpu_key() -> str:
    """CPU model and feature flags: a library built with -march=native must not run elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("flags", "model name"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get("NNSQUEEZE_CACHE") or Path.home() / ".cache" / "nnsqueeze"
    return Path(root) / "kernels"


def _build(cc: str, source: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "kernel.c"
        src.write_text(source)
        out = Path(tmp) / target.name
        proc = subprocess.run([cc, *flags(), str(src), "-o", str(out)], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[:300]}")
        os.replace(out, target)  # atomic: concurrent processes never load a half-written library


def compile_library(stem: str, source: str, declare) -> tuple[object | None, str]:
    """``(library, "")`` or ``(None, reason)`` for C ``source`` built once into the kernel cache as
    ``<stem>_<key>.so`` (key: source, flags, compiler, CPU) and reused; ``declare(lib)`` sets the
    ctypes signatures. ``NNSQUEEZE_PACKED_KERNEL=0`` disables every such library (callers fall back)."""
    if os.environ.get("NNSQUEEZE_PACKED_KERNEL", "1") == "0":
        return None, "disabled by NNSQUEEZE_PACKED_KERNEL=0"
    fl = flags()
    memo = f"{stem} {' '.join(fl)}"           # one library per stem and flags in this process
    with _lock:
        if memo in _cache:
            return _cache[memo]
        result: tuple[object | None, str]
        if platform.system() != "Linux" and platform.system() != "Darwin":
            result = (None, f"no build recipe for {platform.system()}")
        elif not (cc := os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")):
            result = (None, "no C compiler found (cc/gcc)")
        else:
            key = hashlib.sha256("\n".join([source, " ".join(fl), cc, _cpu_key()]).encode()).hexdigest()[:16]
            target = _cache_dir() / f"{stem}_{key}.so"
            try:
                if not target.exists():
                    _build(cc, source, target)
                lib = ctypes.CDLL(str(target))
                declare(lib)
                result = (lib, "")
            except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
                result = (None, f"could not build {stem}: {e}")
        _cache[memo] = result
        return result
