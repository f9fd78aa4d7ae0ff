"""Environment facts for reports and benchmarks: CPU model, threads, library versions."""

from __future__ import annotations

import platform
from functools import lru_cache
from importlib import metadata


@lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def environment(threads: int) -> dict:
    """Facts for the report; ``isa`` is the integer kernel class the quantization steps assume
    (:func:`nnsqueeze.isa.describe`), also written to the artifact manifest."""
    import os

    from .isa import describe

    return {
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads": threads, "isa": describe(),
        "python": platform.python_version(), "platform": platform.platform(),
        **{pkg: _version(pkg) for pkg in ("nnsqueeze", "torch", "onnx", "onnxruntime", "numpy")},
    }
