"""nnsqueeze: make trained PyTorch models smaller and faster, and prove it.

    import nnsqueeze as nsq
    result = nsq.compress(model, "prune-int8", train_data=train, calib_data=calib, eval_data=test)
    result.save("out/")                                # atomic artifact directory, no pickle
    model = nsq.load("out/", model=MyNet())            # restore onto a fresh fp32 model
    nsq.export_onnx(result, "model.onnx")              # the verified int8 ONNX model
"""

from __future__ import annotations

import os
import sys
from typing import Any

__version__ = "0.1.0"


def _drop_cwd_for_main() -> None:
    """Under ``python -m nnsqueeze`` Python puts the current directory first on ``sys.path``, so a
    file there named like a dependency (``numpy.py``, ``onnxruntime.py``) would be imported instead
    of it. runpy imports this package (and torch with it) before ``__main__`` runs, so the entry is
    dropped here, first. Name a module in the current directory with PYTHONPATH or a file path
    (``--model ./models.py:build``). ``sys.argv[0] == "-m"`` only while ``-m`` locates its module."""
    argv = getattr(sys, "orig_argv", [])
    running_us = any(a == "-m" and b in ("nnsqueeze", "nnsqueeze.__main__") for a, b in zip(argv, argv[1:]))
    if sys.argv[:1] == ["-m"] and running_us and sys.path and sys.path[0] in ("", os.getcwd()):
        del sys.path[0]


_drop_cwd_for_main()

from .zoo.tvision import prepare as _prepare_torchvision  # noqa: E402

_prepare_torchvision()  # PyPI's CUDA torchvision beside a CPU torch breaks transformers' imports (zoo/tvision.py)

from .artifact import load  # noqa: E402 - the path fix above must come first
from .errors import (ArtifactError, DataError, ExportError, MetricError, ModelError, NnsqueezeError,  # noqa: E402
                     RecipeError, TargetError)
from .pipeline import CompressionResult, compress  # noqa: E402
from .recipe import Recipe, load_recipe, presets  # noqa: E402
from .search import SearchResult, search  # noqa: E402 - binds nnsqueeze.search to the function

__all__ = [
    "compress", "search", "SearchResult", "load", "export_onnx", "CompressionResult", "Recipe", "load_recipe",
    "presets",
    "NnsqueezeError", "RecipeError", "DataError", "MetricError", "ModelError", "ExportError", "ArtifactError",
    "TargetError",
    "__version__",
]


def export_onnx(obj: Any, path: str | os.PathLike, example_inputs: Any = None, opset: int | None = None,
                verify: bool = True) -> dict:
    """Export a :class:`CompressionResult` or a plain ``nn.Module`` to ONNX, verified in ONNX Runtime.

    Returns the export figures (parity against torch, file size). A result already holding an
    ONNX model of the requested opset is written as is (it was verified when it was made).
    """
    from torch import nn

    from .registry import EXPORTERS
    from .safeio import check_file_target, write_file

    check_file_target(path, f"export onnx ({os.fspath(path)})", ExportError)  # before any work

    if isinstance(obj, CompressionResult):
        same_opset = opset is None or (obj.recipe.export.onnx and obj.recipe.export.onnx.opset == opset)
        if obj.onnx is not None and same_opset and example_inputs is None:
            write_file(path, obj.onnx, f"export onnx ({os.fspath(path)})", ExportError)
            return dict(obj.report.get("export", {}).get("compressed", {}), size_bytes=len(obj.onnx))
        model, example_inputs = obj.model, example_inputs if example_inputs is not None else obj.example_inputs
        opset = opset or (obj.recipe.export.onnx.opset if obj.recipe.export.onnx else 17)
    elif isinstance(obj, nn.Module):
        model = obj
        if example_inputs is None:
            raise ExportError("example_inputs", "exporting a plain model needs example inputs",
                              fix="pass example_inputs=torch.randn(batch, ...) shaped like real inputs")
    else:
        raise ExportError("export_onnx", f"cannot export a {type(obj).__name__}",
                          fix="pass a CompressionResult or a torch.nn.Module")
    return EXPORTERS.get("onnx")(model, str(path), example_inputs, opset=opset or 17, verify=verify)
