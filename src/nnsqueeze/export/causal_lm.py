"""ONNX export of a causal LM with packed weight-only layers: one ONNX Runtime ``MatMulNBits`` per
:class:`~nnsqueeze.llm.packed.PackedLinear` (int4 or int8 codes, group scales, zero points as
initializers; no float copy of those weights), verified in ONNX Runtime against the torch model.
Registered in :data:`nnsqueeze.registry.EXPORTERS` as ``onnx-causal-lm``.

The exported graph maps ``input_ids`` (batch, seq), both axes dynamic, to the logits (batch, seq,
vocab) of a full forward pass without KV cache (scoring, perplexity, or a prefill step). The model is
called with ``attention_mask`` = ones and ``use_cache=False``: transformers 5 otherwise derives
packed-sequence masks with ``aten::diff``, which the TorchScript exporter cannot translate::

    import nnsqueeze as nsq
    from nnsqueeze.export.causal_lm import export_causal_lm_onnx

    model = nsq.load("out/", model=fresh_model)          # rtn/gptq/awq with pack: true
    figures = export_causal_lm_onnx(model, "out/model-int4.onnx", vocab_size=model.config.vocab_size)
    figures["max_abs_diff"], figures["ort_int8_ops"]      # e.g. 2e-07, {'MatMulNBits': 42}
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch
from torch import nn

from ..errors import ExportError
from ..registry import EXPORTERS
from .onnx import export_onnx


class LogitsOnly(nn.Module):
    """``forward(input_ids) -> logits`` around a causal LM (Hugging Face or :mod:`nnsqueeze.llm.tiny`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        params = inspect.signature(model.forward).parameters
        self._hf = "attention_mask" in params and "use_cache" in params

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self._hf:
            out = self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False)
        else:
            out = self.model(input_ids)
        return out.logits if hasattr(out, "logits") else out


@EXPORTERS.register("onnx-causal-lm")
def export_causal_lm_onnx(model: nn.Module, path: str | os.PathLike, vocab_size: int | None = None,
                          example_ids: torch.Tensor | None = None, samples: list[torch.Tensor] | None = None,
                          atol: float = 1e-4, opset: int = 17, verify: bool = True) -> dict[str, Any]:
    """Export ``model`` (logits only) to ``path`` and check it in ONNX Runtime (max abs diff <= ``atol``).

    ``example_ids`` defaults to a (1, 8) batch of token ids < ``vocab_size``; ``samples`` are more id
    batches to verify on (other lengths exercise the dynamic sequence axis). Returns the figures of
    :func:`nnsqueeze.export.onnx.export_onnx` (``max_abs_diff``, ``ort_int8_ops`` with the
    ``MatMulNBits`` count, sizes).
    """
    if example_ids is None:
        if vocab_size is None:
            vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
        if vocab_size is None:
            raise ExportError("export_causal_lm_onnx", "no example_ids and no vocab_size",
                              fix="pass vocab_size=... or example_ids=torch.tensor([[...]])")
        example_ids = torch.randint(0, vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    if samples is None:
        samples = [torch.randint(0, int(example_ids.max()) + 1, (2, example_ids.shape[1] + 3),
                                 generator=torch.Generator().manual_seed(1))]
    return export_onnx(LogitsOnly(model).eval(), path, example_ids, opset=opset, verify=verify, samples=samples,
                       atol=atol, dynamic_axes={"input": {1: "seq"}, "output": {1: "seq"}})
