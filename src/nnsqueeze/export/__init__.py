"""Exporters; each module registers itself in :data:`nnsqueeze.registry.EXPORTERS`.

``onnx``: ONNX (int8 QDQ for quantized models), verified against the torch model in ONNX Runtime.
:mod:`nnsqueeze.export.ort` runs and times the exported files.
"""

__all__ = ["onnx"]
