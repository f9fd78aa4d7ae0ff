"""Import torchvision's model code even where its compiled ops do not load.

PyPI's x86-64 ``torchvision`` wheel is built for CUDA: its ``_C.so`` links ``libtorch_cuda.so``, which
the CPU build of torch does not have. torchvision then imports without its C++ ops, and its
``_meta_registrations`` fails with ``operator torchvision::nms does not exist``, so even the pure-Python
classification models cannot be built. The classification models use none of those ops (they are
detection ops: NMS, RoI align, deformable conv). :func:`import_torchvision` declares the two schemas
that the import needs (``nms`` and ``qnms``, without a kernel), logs a warning that says so, and
imports again. Calling a detection op afterwards still fails, with torchvision's own message.

The same broken install also breaks ``transformers``, which imports torchvision for many of its
models (``BertModel`` then fails to import). So :func:`prepare` runs when ``nnsqueeze`` is imported:
where torchvision is installed but not yet imported and its ``_C`` library does not load, it declares
the schemas before anything imports torchvision. It costs one failed ``dlopen``; a working
torchvision (CPU or CUDA build beside a matching torch) is left alone. Code that imports
transformers or torchvision *before* nnsqueeze in such an environment gets torchvision's own error.

    >>> from nnsqueeze.zoo.tvision import import_torchvision
    >>> tv = import_torchvision()  # doctest: +SKIP
    >>> tv.models.get_model("resnet18", weights=None)  # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import sys
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

_MISSING = "torchvision::nms does not exist"
# Kept alive for the whole process: a torch.library.Library removes its definitions when collected.
_LIB: torch.library.Library | None = None


def import_torchvision() -> ModuleType:
    """``import torchvision``, declaring its ``nms``/``qnms`` schemas first when its C++ ops are missing.

    Raises whatever the import raises for any other reason (not installed, a version that needs another
    torch), so the caller can turn it into a clear error.
    """
    try:
        import torchvision
        return torchvision
    except RuntimeError as e:
        if _MISSING not in str(e):
            raise
        cause = str(e)
    # The failed import left half-initialised torchvision modules behind; drop them so it runs again.
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    _declare()
    log.warning("torchvision's compiled ops did not load (%s: likely a CUDA build beside the CPU torch "
                "%s); declared torchvision::nms and ::qnms without kernels so its model code imports. The "
                "classification models need no compiled op; detection ops (nms, roi_align) will fail.",
                cause, torch.__version__)
    import torchvision
    return torchvision


def prepare() -> bool:
    """Declare the schemas now if torchvision is installed, not yet imported, and its ops cannot load.

    Returns whether it declared them. A torchvision whose ``_C`` loads is left alone: loading it here
    registers its real ops, as its own import would.
    """
    if _LIB is not None or "torchvision" in sys.modules:
        return False
    try:
        spec = importlib.util.find_spec("torchvision")  # locates the package without running it
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.submodule_search_locations:
        return False
    libs = [p for d in spec.submodule_search_locations for p in Path(d).glob("_C.*") if p.suffix in (".so", ".pyd")]
    if not libs:
        return False
    try:
        ctypes.CDLL(str(libs[0]))
        return False
    except OSError as e:
        _declare()
        log.info("torchvision is installed but its compiled ops do not load (%s); declared torchvision::nms "
                 "and ::qnms without kernels so torchvision and transformers import", e)
        return True


def _declare() -> None:
    global _LIB
    if _LIB is not None:
        return
    lib = torch.library.Library("torchvision", "FRAGMENT")  # noqa: TOR901 - schemas only, no kernels
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB = lib
