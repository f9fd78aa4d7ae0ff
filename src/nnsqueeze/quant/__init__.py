"""Quantization building blocks: calibration observers, BatchNorm folding, fake-quant layers.

The ``quantize`` step (:mod:`nnsqueeze.steps.quantize`) puts them together; the ONNX exporter
(:mod:`nnsqueeze.export.onnx`) turns the fake-quant layers into int8 QDQ graphs.
"""

__all__ = ["observers"]
