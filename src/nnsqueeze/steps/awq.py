"""Step ``awq``: activation-aware weight quantization for causal LMs, block by block.

Per targeted Linear, searches the AWQ exponent ``alpha`` (scales ``mean|x|^alpha``) on a grid and
keeps the simulated weight ``Q(W * s) / s`` (see :mod:`nnsqueeze.llm.awq`). Recipe::

    steps:
      - awq: {bits: 4, group_size: 128, n_grid: 20, samples: 128}

Report per layer: ``alpha``, ``error`` and ``rtn_error`` (relative output errors on the calibration
tokens; ``error <= rtn_error`` by construction). The scale search is per Linear (not shared by
q/k/v) and AWQ's clipping search is not done.

``pack: true`` (default false) stores each layer as a :class:`~nnsqueeze.llm.packed.PackedLinear`
holding the int4/int8 codes of ``Q(W * s)`` plus an ``input_scale_`` ``s``: the layer computes
``(x / s) @ Q(W * s).T`` (equal to the simulated ``x @ (Q(W * s) / s).T`` up to float rounding),
``nsq.load`` rebuilds it bit-identically, and ONNX export emits ``Div`` + ``MatMulNBits``::

    steps:
      - awq: {bits: 4, group_size: 128, pack: true}
"""

from __future__ import annotations

from pydantic import Field, model_validator
from torch import nn

from ..llm.awq import AWQAccumulator, awq_search
from ..llm.packed import PackedLinear, add_input_scale_, pack_linear_
from ..llm.rtn import rtn_quantize
from ..llm.sequential import get_weight, set_weight
from ..registry import STEPS
from .base import recorded_module
from ._llm import LLMStep, QuantFields, QuantScheme, relative_error
from .gptq import _check_pack, _convert, _pack, _scheme, note_kernel


class AWQConfig(QuantFields):
    n_grid: int = Field(20, ge=1, le=200, description="alpha candidates: 0, 1/n, ..., (n-1)/n")
    pack: bool = Field(False, description="store PackedLinear modules: the codes of Q(W * s) and an input_scale_ "
                       "s (bits 4/8, group_size a power of two >= 16 or null); false: simulated float weights")

    _pack_ok = model_validator(mode="after")(_check_pack)


@STEPS.register("awq")
class AWQ(LLMStep):
    needs_float = True
    quantizes = True
    trainable_after = False
    Config = AWQConfig

    def run(self, model, ctx):
        c = self.config
        layers = self.block_layers(model, ctx)
        self.layers_ = [n for n, _ in layers]

        packs, scales = {}, {}

        def apply(name, mod, acc):
            w = get_weight(mod)
            r = awq_search(w, acc.abs_mean, acc.hessian, c.bits, c.group_size, c.symmetric, c.n_grid, c.scale_dtype)
            set_weight(mod, r.weight)
            if c.pack:
                packs[name], scales[name] = (r.scaled_weight, r.scale, r.zero_point), r.scales
            return {"method": "awq", **_scheme(c), "alpha": r.alpha,
                    "error": round(relative_error(w, r.weight, acc.hessian), 6),
                    "rtn_error": round(relative_error(w, rtn_quantize(w, c.bits, c.group_size, c.symmetric).weight, acc.hessian), 6)}

        def on_block(i, block):  # pack as soon as a block is done (see gptq); the next block sees the packed layers
            if packs:
                _pack(model, packs, c, self.where)
                for name, s in scales.items():
                    add_input_scale_(model.get_submodule(name), s)
                packs.clear()
                scales.clear()

        self.figures_ = self.calibrate(model, ctx, layers, lambda n, m: AWQAccumulator(get_weight(m).shape[1], m.weight.device),
                                       apply, on_block=on_block)
        if c.pack:
            note_kernel(ctx, "awq")
        return model

    def record(self):
        return {"layers": self.layers_, **_scheme(self.config), "pack": self.config.pack,
                "scale_dtype": self.config.scale_dtype}

    @classmethod
    def rebuild(cls, model: nn.Module, config, record):
        if not record.get("pack"):
            return model  # simulated float weights: nothing structural
        c = QuantScheme(bits=record["bits"], group_size=record["group_size"], symmetric=record["symmetric"])
        for name in record.get("layers", []):
            mod = recorded_module(model, name, (nn.Module,), "awq record")
            if not isinstance(mod, PackedLinear):
                mod = pack_linear_(_convert(model, name, mod, c, "awq record"))
            add_input_scale_(mod)  # the stored scales are loaded with the weights
        return model
