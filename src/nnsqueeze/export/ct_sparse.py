"""Sparse (pruned) models in compressed-tensors checkpoints: the zeros of ``sparsegpt``, ``wanda``,
``prune`` and ``nm-prune`` are kept in the stored weights (dense float, or the packed / FP8 codes of a
later quantization step), which every compressed-tensors loader reads bit for bit.

What is sparse: a Linear carrying the pruning steps' bool ``weight_mask`` buffer with at least one
pruned entry. Its structure is ``2:4`` when every group of 4 consecutive inputs keeps at most 2
weights, else ``unstructured``. The checkpoint's ``nnsqueeze_export.json`` lists each sparse layer's
sparsity and structure; the masks themselves are nnsqueeze's bookkeeping and are not written (the
zeros are in the weights).

``sparse_format`` (an option of ``save(format="compressed-tensors")``):

- ``dense`` (default): the form above. A model that is pruned but not quantized is written with a
  ``quantization_config`` of format ``dense`` and no config group (plain float weights).
- ``sparse-bitmask`` / ``sparse-24-bitmask`` (values + packed bitmask): an ExportError, before
  anything is written, naming ``dense``. No current loader opens them: compressed-tensors 0.20 has no
  sparse compressor (removed upstream in March 2026, llm-compressor #2452 / compressed-tensors #610;
  only the config classes remain), transformers 5 reads such a file with the sparse layers'
  ``weight`` missing and re-initialised at random (a load report, no error; measured:
  tests/export/test_ct_sparse.py), and vLLM raises NotImplementedError for Sparse24 checkpoints since
  vllm-project/vllm#36799. For the same reason ``sparsity_config`` stays ``{}``: a ``2:4`` declaration
  there makes vLLM refuse a checkpoint it would otherwise load dense.

    >>> import torch, transformers
    >>> import nnsqueeze as nsq
    >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
    ...                                num_attention_heads=2, max_position_embeddings=16)
    >>> llama = transformers.LlamaForCausalLM(cfg).eval()
    >>> ids = torch.zeros(1, 4, dtype=torch.long)
    >>> res = nsq.compress(llama, {"steps": [{"nm-prune": {"targets": ["re:.*layers.*"]}}], "export": {"onnx": None},
    ...                    "evaluate": {"runs": 1, "warmup": 0}}, metric=None, progress=False, example_inputs=ids)
    >>> out = res.save("sparse-ct", format="compressed-tensors")
    >>> import json; info = json.loads((out / "nnsqueeze_export.json").read_text())["sparsity"]
    >>> info["global"], info["layers"]["model.layers.0.mlp.down_proj"]
    (0.5, {'sparsity': 0.5, 'structure': '2:4'})
    >>> back = transformers.AutoModelForCausalLM.from_pretrained(out)
    >>> torch.equal(back(ids).logits, res.model(ids).logits)
    True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ExportError

FMT = "compressed-tensors"
SPARSE_FORMATS = ("dense", "sparse-bitmask", "sparse-24-bitmask")
MASK = "weight_mask"   # the pruning steps' buffer (steps/prune.py); export may not import steps
NO_LOADER = (
    "has no loader to check it against: compressed-tensors 0.20 ships no sparse compressor (removed upstream), "
    "transformers 5 loads such a file with the sparse layers' weights missing and re-initialised at random, "
    "and vLLM refuses Sparse24 checkpoints (vllm-project/vllm#36799)")


def structure(keep: torch.Tensor) -> str:
    """``2:4`` when every 4 consecutive inputs of a row keep at most 2 weights, else ``unstructured``."""
    k = keep.reshape(keep.shape[0], -1)
    if k.shape[1] % 4 == 0 and bool((k.reshape(k.shape[0], -1, 4).sum(-1) <= 2).all()):
        return "2:4"
    return "unstructured"


def sparse_layers(model: nn.Module) -> dict[str, torch.Tensor]:
    """``name -> keep mask`` of the Linears with at least one pruned weight."""
    out = {}
    for name, m in model.named_modules():
        keep = m._buffers.get(MASK) if isinstance(m, nn.Linear) else None
        if keep is not None and not bool(keep.all()):
            out[name] = keep.detach().bool()
    return out


def sparsity_info(layers: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What ``nnsqueeze_export.json`` records: the pruned fraction of the sparse layers, and per layer."""
    pruned = sum(int((~k).sum()) for k in layers.values())
    total = sum(k.numel() for k in layers.values())
    return {"global": round(pruned / max(total, 1), 6),
            "layers": {n: {"sparsity": round(1 - float(k.float().mean()), 6), "structure": structure(k)}
                       for n, k in layers.items()}}


def check_sparse_format(value: str | None, layers: dict[str, torch.Tensor]) -> None:
    """An ExportError, before anything is written, for a ``sparse_format`` with no working loader."""
    where = f"{FMT}.sparse_format"
    if value is None or value == "dense":
        return
    if value not in SPARSE_FORMATS:
        raise ExportError(where, f"unknown sparse_format {value!r}", fix=f"use one of: {', '.join(SPARSE_FORMATS)}")
    kinds = sorted({structure(k) for k in layers.values()}) or ["no sparse layers"]
    raise ExportError(where, f"{value} (the model: {', '.join(kinds)}) {NO_LOADER}",
                      fix="use sparse_format: dense (the default): the pruned zeros stay in the dense or packed "
                          "weights, which transformers loads bit for bit")

