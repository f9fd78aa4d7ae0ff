"""ORT vs torch-simulation helper shared by the quantization parity tests (``tests/`` is on sys.path)."""

from __future__ import annotations

import torch
from torch import nn

from nnsqueeze.export.onnx import export_onnx
from nnsqueeze.export.ort import OrtModule


def ort_vs_sim(q: nn.Module, x: torch.Tensor, samples: list, path) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Export ``q`` to ``path``, run ``x`` through ORT and the torch simulation: (ORT output, simulation
    output, one 8-bit step of the simulation's output range)."""
    export_onnx(q, path, x, samples=samples)
    with torch.no_grad():
        ref = q(x)
    return OrtModule(path)(x), ref, float(ref.max() - ref.min()) / 255
