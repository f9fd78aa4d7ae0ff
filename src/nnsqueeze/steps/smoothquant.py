"""Step ``smoothquant``: migrate activation outliers into the weights before W8A8 quantization.

A float-to-float transform (the model's outputs do not change beyond rounding): for every group of
Linears that read the output of the same LayerNorm/RMSNorm (q/k/v after ``input_layernorm``,
gate/up after ``post_attention_layernorm``, GPT-2's ``c_attn`` after ``ln_1``), computes
``s = max|x|^alpha / max|W|^(1-alpha)`` (:mod:`nnsqueeze.llm.smoothquant`), divides the norm's weight
(and bias) by ``s`` and multiplies the Linears' input columns by ``s``
(:func:`nnsqueeze.ops.equalize.fold_scales`, the fold ``quantize``'s ``equalize`` and
``quantize-dynamic``'s ``smooth`` use too). Run ``quantize`` after it::

    steps:
      - smoothquant: {alpha: 0.5, samples: 128}
      - quantize: {weights: {bits: 8, granularity: per-channel, symmetric: true},
                   activations: {bits: 8, granularity: per-tensor, symmetric: false}}

Which norm feeds which Linear is found generically during calibration: the Linear's input tensor
must be the very tensor object the norm returned. Linears fed by anything else (``o_proj``,
``down_proj``: no op to fold ``1/s`` into) are skipped with a reason. After folding, the norm's
output on the first calibration batch is checked to equal ``old / s``; a norm of another form (e.g.
``(1 + w)`` scaling) fails the check and is restored, with a fallback note in the report.

``statistic`` picks the activation figure in the formula: ``absmax`` (default, the paper's
``max |x_j|``) or ``range``, llm-compressor's per-channel dynamic range ``max x_j - min x_j`` (its
weight figure ``2 max |W|`` differs from ``max |W|`` by a constant, which cancels: per-channel
weight and per-tensor activation grids do not change when every ``s_j`` is scaled alike). The two
differ on channels whose values are one-sided (a massive positive activation): ``range`` then
smooths them less than symmetric channels of the same ``max |x|``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..llm.sequential import get_weight, set_weight
from ..llm.smoothquant import AbsMaxAccumulator, smooth_activation, smooth_scales
from ..ops.equalize import fold_scales
from ..registry import STEPS
from ._llm import LLMStep, LLMStepConfig


def _peak_ratio(absmax) -> float:
    """Largest over median per-channel ``max |x|`` (the outlier figure in the report)."""
    return float(absmax.max() / absmax.median().clamp(min=1e-12))


class SmoothQuantConfig(LLMStepConfig):
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="migration strength: 0 = none, 1 = all to weights")
    statistic: Literal["absmax", "range"] = Field("absmax", description="activation figure per channel: max |x| "
                                                  "(the paper) or max x - min x (llm-compressor)")


class _FirstInput(AbsMaxAccumulator):
    """Per-channel absmax and min / max, plus the first batch's input tensor itself (to match it to
    its norm)."""

    def __init__(self, cols: int, device: torch.device | str = "cpu"):
        super().__init__(cols, device)
        self.first = None
        self.lo = torch.full((cols,), float("inf"), dtype=torch.float64, device=device)
        self.hi = -self.lo

    def add(self, x):
        if self.first is None:
            self.first = x
        super().add(x)
        rows = x.detach().reshape(-1, x.shape[-1])
        self.lo = torch.minimum(self.lo, rows.amin(0).to(self.lo.device, torch.float64))
        self.hi = torch.maximum(self.hi, rows.amax(0).to(self.hi.device, torch.float64))

    def statistic(self, kind: str) -> torch.Tensor:
        """``max |x_j|`` (``absmax``) or ``max x_j - min x_j`` (``range``), float64 (C,)."""
        return self.absmax if kind == "absmax" else self.hi - self.lo


def _is_norm(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return type(m).__name__.endswith("Norm") and isinstance(w, torch.Tensor) and w.dim() == 1


@STEPS.register("smoothquant")
class SmoothQuant(LLMStep):
    needs_float = True
    Config = SmoothQuantConfig

    def run(self, model, ctx):
        layers = self.block_layers(model, ctx)
        self.layers_: list[str] = []
        stats: dict[str, _FirstInput] = {}
        norms: dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor]] = {}  # name -> (module, in, out)
        prefix_of = {id(m): n for n, m in model.named_modules()}

        def extra_hooks(i, block):
            def hook(mod, inp, out):
                name = prefix_of[id(mod)]
                if name not in norms:
                    norms[name] = (mod, inp[0], out)
            return [m.register_forward_hook(hook) for m in block.modules() if _is_norm(m)]

        def apply(name, mod, acc):
            stats[name] = acc
            return None

        def on_block(i, block):
            groups: dict[str, list[str]] = {}
            for lname, acc in stats.items():
                src = next((n for n, (_, _, out) in norms.items() if out is acc.first), None)
                if src is None:
                    ctx.skip("smoothquant", lname, "input is not a LayerNorm/RMSNorm output: no op to fold 1/s into")
                else:
                    groups.setdefault(src, []).append(lname)
            for nname, lnames in groups.items():
                self._fold(model, ctx, nname, norms[nname], [stats[n] for n in lnames], lnames)
            stats.clear()
            norms.clear()

        self.figures_ = self.calibrate(model, ctx, layers,
                                       lambda n, m: _FirstInput(get_weight(m).shape[1], m.weight.device), apply,
                                       on_block=on_block, extra_hooks=extra_hooks)
        return model

    @torch.no_grad()
    def _fold(self, model, ctx, nname, norm_io, accs, lnames):
        norm, x_in, y_old = norm_io
        mods = [model.get_submodule(n) for n in lnames]
        weights = [get_weight(m) for m in mods]                                 # each (out, in) float32
        s = smooth_scales(accs[0].statistic(self.config.statistic), weights, self.config.alpha)  # (in,) f64
        bias = getattr(norm, "bias", None)
        # 1/s into the norm's output channels (weight and bias), s into every Linear's input columns
        (norm_w, norm_b), smoothed = fold_scales(s, [norm.weight, bias], weights)
        saved = (norm.weight.detach().clone(), None if bias is None else bias.detach().clone())
        norm.weight.copy_(norm_w)
        if bias is not None:
            bias.copy_(norm_b)
        y_new = norm(x_in)
        ref = smooth_activation(y_old, s)
        if not torch.allclose(y_new, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max().clamp(min=1))):
            norm.weight.copy_(saved[0])
            if bias is not None:
                bias.copy_(saved[1])
            ctx.fallback("smoothquant", f"{nname}: dividing its weight by s does not divide its output by s "
                         f"({type(norm).__name__}); left {', '.join(lnames)} unsmoothed")
            return
        for lname, m, w in zip(lnames, mods, smoothed):
            set_weight(m, w)
            ctx.report.layer(lname, smoothquant_alpha=self.config.alpha, smoothed_by=nname,
                             act_absmax_ratio_before=round(_peak_ratio(accs[0].absmax), 3),
                             act_absmax_ratio_after=round(_peak_ratio(accs[0].absmax / s), 3))
            self.layers_.append(lname)

    def record(self):
        extra = {} if self.config.statistic == "absmax" else {"statistic": self.config.statistic}
        return {"layers": self.layers_, "alpha": self.config.alpha, **extra}
