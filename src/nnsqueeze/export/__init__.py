"""Exporters; each module registers itself in :data:`nnsqueeze.registry.EXPORTERS`.

``onnx``: ONNX (int8 QDQ for quantized models), verified against the torch model in ONNX Runtime.
:mod:`nnsqueeze.export.ort` runs and times the exported files.
``compressed-tensors``, ``gptq``, ``gguf``: a packed causal LM as a checkpoint other loaders open
(transformers, vLLM, llama.cpp); :func:`nnsqueeze.export.hf_formats.save_pretrained` dispatches.

There is no list of them here: :data:`~nnsqueeze.registry.EXPORTERS` finds every module of this
package with :mod:`pkgutil` on its first lookup and imports it, so a new exporter is a new file.
``latency_guard``: the ``latency`` guard (:data:`nnsqueeze.registry.GUARDS`) and the replay of its
``revert`` record (:data:`nnsqueeze.registry.REPLAYS`).
"""
