"""``half`` step: fp16 or bf16 weights and compute for Linear / Conv1d / Conv2d / Embedding, the rest in fp32.

Converted layers hold half-precision weights and compute in half precision (inputs cast on the
way in, outputs cast back), so LayerNorm, softmax, residual adds and any layer listed in
``ignore`` stay fp32. The model file halves. Recipe::

    steps:
      - half:
          dtype: float16        # or bfloat16
          ignore: [classifier]  # kept in fp32

ONNX: fp16 layers run in fp16 in ONNX Runtime; bf16 layers are stored in bf16 and computed in
fp32 with bf16 rounding of inputs and outputs (ORT has no bf16 MatMul on CPU; see
:mod:`nnsqueeze.quant.half`). ::

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.context import Context
    >>> from nnsqueeze.steps.half import Half
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    >>> ctx = Context(); ctx.report.begin_step("half", {})
    >>> model = Half(Half.Config(dtype="bfloat16")).run(model, ctx)
    >>> model[0].weight.dtype, model(torch.randn(2, 8)).dtype
    (torch.bfloat16, torch.float32)
"""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from ..errors import ModelError
from ..quant.half import DTYPES, HALF_MAP, HalfMixin, convert_half_
from ..registry import STEPS
from .base import Step, StepConfig, recorded_module


class HalfConfig(StepConfig):
    dtype: Literal["float16", "bfloat16"] = "float16"


@STEPS.register("half")
class Half(Step):
    """fp16 / bf16 layers; see the module docstring."""

    Config = HalfConfig
    default_targets = ["Linear", "Conv1d", "Conv2d", "Embedding"]

    def __init__(self, config: HalfConfig, index: int = 0):
        super().__init__(config, index)
        self._record: dict[str, Any] = {}

    def select(self, model: nn.Module, ctx: Any, supported: tuple[type, ...]) -> Any:
        present = {type(m).__name__ for m in model.modules()}  # defaults are a menu, as in quantize
        self.default_targets = [t for t in type(self).default_targets if t in present] or \
            list(type(self).default_targets)
        return super().select(model, ctx, supported)

    def run(self, model: nn.Module, ctx) -> nn.Module:
        name, dtype = self.registered_name, DTYPES[self.config.dtype]
        layers = []
        for lname, mod in self.select(model, ctx, supported=tuple(HALF_MAP)).layers:
            if type(mod) not in HALF_MAP:
                ctx.skip(name, lname, f"{type(mod).__name__} is not a plain Linear/Conv1d/Conv2d/Embedding")
                continue
            if isinstance(mod.padding if hasattr(mod, "padding") else 0, str) and self.config.dtype == "bfloat16":
                ctx.skip(name, lname, "bf16 export needs numeric padding (padding='same'/'valid' given)")
                continue
            convert_half_(mod, dtype)
            layers.append(lname)
            ctx.report.layer(lname, bits=16, act_bits=16, scheme=self.config.dtype)
        if not layers:
            raise ModelError(self.where, "no plain Linear/Conv1d/Conv2d left to convert",
                             fix="target plain nn.Linear / nn.Conv1d / nn.Conv2d modules")
        self._record = {"layers": layers, "dtype": self.config.dtype}
        ctx.report.step(converted_layers=len(layers), dtype=self.config.dtype)
        return model

    def record(self) -> dict[str, Any]:
        return self._record

    @classmethod
    def rebuild(cls, model: nn.Module, config: HalfConfig, record: dict[str, Any]) -> nn.Module:
        dtype = DTYPES[record.get("dtype", config.dtype)]
        for lname in record.get("layers", []):
            mod = recorded_module(model, lname, (nn.Module,), "half record")
            if not isinstance(mod, HalfMixin):
                convert_half_(mod, dtype)
        return model
