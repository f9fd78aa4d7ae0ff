"""``quantize-dynamic`` step: int8 weights, activations quantized at run time, for Linear layers.

Each activation tensor gets its own uint8 range when the model runs (``DynamicQuantizeLinear``),
so without ``smooth`` the step needs nothing but the model. Weights are quantized per
output channel. Exported, ONNX Runtime fuses each layer into ``DynamicQuantizeMatMul``; the torch
model computes exactly what ORT computes (see :mod:`nnsqueeze.quant.dynamic`). Recipe::

    steps:
      - quantize-dynamic:
          weights: {bits: 8, symmetric: true}    # int8 codes; reduce_range: auto -> 7 bits without VNNI
          embeddings: true                       # nn.Embedding tables as int8 rows
          smooth: {alpha: auto, samples: 128}    # optional: needs calib_data (see below)
          outliers: {ratio: 6.0, max_channels: 8} # optional: needs calib_data (see below)
          attention: true                        # HF encoders: q@k^T and p@v on run-time int8 codes
          ignore: ["re:.*pooler.*"]

``smooth`` migrates activation outlier channels into the weights inside each layer
(:mod:`nnsqueeze.quant.dynamic`): ``s_j = max|x_j|^alpha / max|W_:,j|^(1-alpha)`` from the
calibration inputs (Linears that read the same tensor, e.g. q/k/v, share one ``s``). ``alpha:
auto`` picks one alpha for the model from ``ALPHA_GRID`` and no smoothing, by the error of the
model's outputs on the calibration batches (layers simulated in float32 fake quantization).
Costs one elementwise multiply per group at run time.
``attention: true`` also quantizes the two attention matmuls of Hugging Face encoders at run time
(q, k^T, probabilities and v each through ``DynamicQuantizeLinear``, then ``MatMulInteger``;
:mod:`nnsqueeze.quant.attention`); softmax and LayerNorm stay float by design.
``outliers`` computes in float32 the few input channels whose calibrated max |x| is over ``ratio``
times the median channel's (LLM.int8()'s decomposition; all-MiniLM-L6-v2's FFN-down layers have
one channel 4-17x the median): the int8 path gets a multiplier of 0 there and a ``Gather -> MatMul
(k columns) -> Add`` adds them back, so the run-time range no longer spans them.
``float_layers: N`` keeps in float the N Linears whose quantization alone moves the model's
calibration outputs the most (measured one layer at a time, same simulation).

``weights.symmetric: true`` (default) uses int8 codes (zero point 0), where ``reduce_range: auto``
drops to 7-bit codes on x86 CPUs without VNNI, like the ``quantize`` step (ORT's u8s8 kernels
saturate there). ``symmetric: false`` keeps 8 bits with uint8 codes and a per-channel zero point
(u8u8 kernels, which never saturate) at the same fidelity on MiniLM but 1.7x slower (VNNI Xeon). ::

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.context import Context
    >>> from nnsqueeze.steps.quantize_dynamic import QuantizeDynamic
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    >>> ctx = Context(); ctx.report.begin_step("quantize-dynamic", {})
    >>> model = QuantizeDynamic(QuantizeDynamic.Config()).run(model, ctx)
    >>> [type(m).__name__ for m in model]
    ['DynamicQuantLinear', 'ReLU', 'DynamicQuantLinear']
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from ..data import call_model, split, take
from ..export.onnx import flatten_outputs
from ..errors import DataError, ModelError
from ..isa import weight_range
from ..llm.smoothquant import AbsMaxAccumulator, smooth_scales
from ..ops.dynamic import outlier_channels
from ..quant.args import QuantArgs
from ..quant.protocol import layer_bits
from ..quant.convert import DYNAMIC_UINT8, convert
from ..quant.dynamic import dynamic_fake_linear
from ..quant.embedding import convert_embeddings, rebuild_embeddings
from ..registry import STEPS
from .base import Step, StepConfig, record_indices, record_int, recorded_module

ALPHA_GRID = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class DynamicWeightsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bits: int = Field(8, ge=7, le=8, description="8, or 7 (reduced range, symmetric only)")
    symmetric: bool = Field(True, description="true: int8 codes, zero point 0 (u8s8 kernels, fastest); false: "
                            "uint8 codes with a per-channel zero point (u8u8 kernels: no saturation, full 8 bits, "
                            "but measured 1.7x slower on a VNNI Xeon)")
    reduce_range: bool | Literal["auto"] = Field(
        "auto", description="symmetric only: 7-bit codes where ONNX Runtime's u8s8 kernels saturate "
        "(x86 without VNNI); 'auto' decides on the machine running the step")

    def args(self) -> QuantArgs:
        """The weights' :class:`~nnsqueeze.quant.args.QuantArgs` as asked (``reduce_range: auto`` may
        give 7 bits on the machine running the step: that choice is the step's record)."""
        return QuantArgs(bits=self.bits, symmetric=self.symmetric, granularity="channel")


class SmoothConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alpha: float | Literal["auto"] = Field("auto", description="migration strength in [0, 1], or 'auto': the "
                                           f"best of {list(ALPHA_GRID)} and no smoothing by the model's output "
                                           "error on the calibration batches")
    samples: int = Field(128, ge=1, description="calibration samples (from calib_data)")
    targets: list[str] | None = Field(None, description="only these of the step's layers (class name, module "
                                      "name or re:regex); default all")

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, v):
        if v != "auto" and not 0.0 <= float(v) <= 1.0:
            raise ValueError("alpha must be in [0, 1] or 'auto'")
        return v


class OutliersConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ratio: float = Field(6.0, gt=1.0, description="an input channel whose calibrated max |x| exceeds ratio x the "
                         "median channel's is computed in float32 instead of int8")
    max_channels: int = Field(8, ge=1, description="at most this many float channels per layer")
    samples: int = Field(128, ge=1, description="calibration samples (from calib_data)")
    targets: list[str] | None = Field(None, description="only these of the step's layers (class name, module "
                                      "name or re:regex); default all")


class QuantizeDynamicConfig(StepConfig):
    weights: DynamicWeightsConfig = Field(default_factory=DynamicWeightsConfig)
    embeddings: bool = Field(False, description="also store nn.Embedding tables as per-row int8 (weight-only)")
    smooth: SmoothConfig | None = Field(None, description="per-layer outlier smoothing calibrated on calib_data "
                                        "(null: off, no data needed)")
    outliers: OutliersConfig | None = Field(None, description="calibrated outlier input channels computed in "
                                            "float32 beside the int8 matmul (null: off, no data needed)")
    float_layers: int = Field(0, ge=0, description="keep this many Linears in float: those whose quantization "
                              "alone (with its smoothing) moves the model's outputs on calib_data the most")
    attention: bool = Field(False, description="Hugging Face encoders: quantize the inputs of the attention "
                            "matmuls (q@k^T, p@v) at run time too (DynamicQuantizeLinear + MatMulInteger)")

    def activation_args(self) -> QuantArgs:
        """The layers' inputs: uint8 per tensor, range taken at run time (ONNX DynamicQuantizeLinear)."""
        return QuantArgs(bits=8, symmetric=False, granularity="tensor", dynamic=True)


@STEPS.register("quantize-dynamic")
class QuantizeDynamic(Step):
    """Dynamic int8 quantization of Linear layers; see the module docstring."""
    needs_float = True
    quantizes = True
    trainable_after = False

    Config = QuantizeDynamicConfig
    default_targets = ["Linear"]

    def __init__(self, config: QuantizeDynamicConfig, index: int = 0):
        super().__init__(config, index)
        self._record: dict[str, Any] = {}
        self._outl: dict[str, Tensor] = {}

    def _bits(self, ctx) -> int:
        w = self.config.weights
        rng = weight_range(w.bits, w.reduce_range, u8s8=w.symmetric,
                           hint="or use weights.symmetric: false for full 8-bit u8u8")
        if rng.note is not None:
            ctx.fallback(self.registered_name, rng.note)
        return rng.bits

    def run(self, model: nn.Module, ctx) -> nn.Module:
        name, signed = self.registered_name, self.config.weights.symmetric
        sel = self.select(model, ctx, supported=(nn.Linear,))
        bits = self._bits(ctx)
        layers: dict[str, dict[str, Any]] = {}
        plain = []
        for lname, mod in sel.layers:
            if type(mod) is not nn.Linear:
                ctx.skip(name, lname, f"{type(mod).__name__} is not a plain nn.Linear")
                continue
            plain.append((lname, mod))
        self._outl = self._outliers(model, ctx, plain) if self.config.outliers is not None and plain else {}
        smooth = self._smooth(model, ctx, plain, bits, signed) if self.config.smooth is not None and plain else {}
        if self.config.float_layers and plain:
            keep = self._most_sensitive(model, ctx, plain, smooth, bits, signed)
            plain = [(n, m) for n, m in plain if n not in keep]
        for lname, mod in plain:
            s, alpha = smooth.get(lname, (None, None))
            idx = self._outl.get(lname)
            convert(mod, QuantArgs(bits=bits, symmetric=signed), DYNAMIC_UINT8, smooth=s, outliers=idx)
            layers[lname] = {"bits": bits, "signed": signed, "smoothed": s is not None}
            extra = {} if self.config.smooth is None else {"smooth_alpha": alpha}
            if idx is not None:
                layers[lname]["outliers"] = [int(i) for i in idx]
                extra["float_channels"] = len(idx)
            sqnr = mod.weight_sqnr_db()
            kind = f"w{bits} per-channel {'sym' if signed else 'asym'}"
            ctx.report.layer(lname, **layer_bits(mod), scheme=f"{kind} / a8 dynamic per-tensor asym",
                             weight_sqnr_db=round(sqnr, 2) if abs(sqnr) != float("inf") and sqnr == sqnr else None,
                             **extra)
        if not layers:
            raise ModelError(self.where, "no plain nn.Linear left to quantize", fix="target plain nn.Linear modules")
        embs = convert_embeddings(model, self.config.ignore, f"{self.where}.ignore", ctx, name) \
            if self.config.embeddings else []
        self._record = {"layers": layers, "embeddings": embs}
        if self.config.attention:
            from ..quant.attention import quantize_attention_dynamic

            self._record["attention"] = quantize_attention_dynamic(model, ctx, name, self.where)
        ctx.report.step(quantized_layers=len(layers), weight_bits=bits,
                        scheme=f"w{bits} per-channel {'sym' if signed else 'asym'}, a8 dynamic",
                        smoothed_layers=sum(v["smoothed"] for v in layers.values()),
                        **({"outlier_layers": sum("outliers" in v for v in layers.values())}
                           if self.config.outliers is not None else {}))
        return model

    def _only(self, model: nn.Module, plain: list, targets: list[str] | None, option: str) -> list:
        """``plain`` restricted to ``targets`` (the step's target syntax; a typo raises TargetError)."""
        if targets is None:
            return plain
        from ..targets import select

        chosen = {n for n, _ in select(model, targets, [], (nn.Linear,),
                                       where=f"{self.where}.{option}.targets").layers}
        return [(n, m) for n, m in plain if n in chosen]

    @torch.no_grad()
    def _outliers(self, model: nn.Module, ctx, plain: list) -> dict[str, Tensor]:
        """Per layer the input channels computed in float (calibrated max |x| > ratio x median)."""
        cfg = self.config.outliers
        if ctx is None or ctx.calib_data is None:
            raise DataError(f"{self.where}.outliers", "outlier channels are found on data but no calib_data was "
                            "given", fix="pass calib_data=... or remove 'outliers' from the step")
        plain = self._only(model, plain, cfg.targets, "outliers")
        accs = {n: AbsMaxAccumulator(m.in_features) for n, m in plain}
        was = model.training
        model.eval()
        try:
            self._forward(model, take(ctx.calib_data, cfg.samples),
                          {n: (m, (lambda a: lambda mod, inp: a.add(inp[0]))(accs[n])) for n, m in plain})
        finally:
            model.train(was)
        out = {}
        for n, _ in plain:
            if not accs[n].tokens:
                ctx.skip(self.registered_name, n, "outliers: the layer saw no calibration input; no float channels")
                continue
            idx = outlier_channels(accs[n].absmax, cfg.ratio, cfg.max_channels)
            if idx is not None:
                out[n] = idx
        return out

    @torch.no_grad()
    def _smooth(self, model: nn.Module, ctx, plain: list, bits: int, signed: bool) -> dict[str, tuple]:
        """Per layer ``(s (K,) float64 or None, alpha or None)`` from the calibration inputs."""
        cfg = self.config.smooth
        if ctx is None or ctx.calib_data is None:
            raise DataError(f"{self.where}.smooth", "smoothing is calibrated on data but no calib_data was given",
                            fix="pass calib_data=... or remove 'smooth' from the step")
        batches = take(ctx.calib_data, cfg.samples)
        plain = self._only(model, plain, cfg.targets, "smooth")
        accs = {n: AbsMaxAccumulator(m.in_features) for n, m in plain}
        first: dict[str, Any] = {}

        def collect(n):
            def hook(mod, inp):
                first.setdefault(n, inp[0])
                accs[n].add(inp[0])
            return hook

        was_training = model.training
        model.eval()
        try:
            return self._smooth_scales(model, ctx, plain, bits, signed, batches, accs, first, collect)
        finally:
            model.train(was_training)

    def _smooth_scales(self, model, ctx, plain, bits, signed, batches, accs, first, collect) -> dict[str, tuple]:
        cfg = self.config.smooth
        self._forward(model, batches, {n: (m, collect(n)) for n, m in plain})
        # Layers whose first-batch input is the very same tensor (q/k/v) share one s.
        groups: list[list[str]] = []
        for n, _ in plain:
            g = next((g for g in groups if first.get(g[0]) is first.get(n) and n in first), None)
            groups.append([n]) if g is None else g.append(n)
        mods = dict(plain)
        grid = (None, *ALPHA_GRID) if cfg.alpha == "auto" else (float(cfg.alpha),)
        scales: dict[Any, dict[str, Tensor]] = {a: {} for a in grid}
        for g in groups:
            if g[0] not in first:
                for n in g:
                    ctx.skip(self.registered_name, n, "smoothing: the layer saw no calibration input; not smoothed")
                continue
            for a in grid:
                s = None if a is None else smooth_scales(accs[g[0]].absmax, [mods[n].weight for n in g], a)
                scales[a].update({n: s for n in g})
        alpha = grid[0]
        if cfg.alpha == "auto":  # one alpha for the model: the smallest output error on the calibration data
            errs = {a: self._output_error(model, batches, {n: (mods[n], scales[a][n]) for n in scales[a]},
                                          bits, signed) for a in grid}
            alpha = min(grid, key=lambda a: errs[a])
            ctx.report.step(smooth_alpha_errors={str(a): float(f"{e:.4g}") for a, e in errs.items()})
        return {n: (s, alpha) for n, s in scales[alpha].items()}

    @torch.no_grad()
    def _most_sensitive(self, model, ctx, plain, smooth, bits, signed) -> dict[str, float]:
        """The ``float_layers`` layers whose quantization alone gives the largest calibration output error."""
        if ctx is None or ctx.calib_data is None:
            raise DataError(f"{self.where}.float_layers", "choosing the layers kept in float needs calib_data",
                            fix="pass calib_data=... or set float_layers: 0")
        batches = take(ctx.calib_data, self.config.smooth.samples if self.config.smooth else 128)
        was = model.training
        model.eval()
        try:
            refs = [[t.float() for t in flatten_outputs(call_model(model, split(b)[0])) if t.is_floating_point()]
                    for b in batches]
            errs = {n: self._output_error(model, batches, {n: (m, smooth.get(n, (None,))[0])}, bits, signed, refs)
                    for n, m in plain}
        finally:
            model.train(was)
        ranked = sorted(errs, key=errs.get, reverse=True)[:self.config.float_layers]
        for rank, n in enumerate(ranked, 1):
            ctx.skip(self.registered_name, n, f"kept in float (float_layers): quantizing it alone gives calibration "
                     f"output error {errs[n]:.4g}, rank {rank} of {len(errs)}")
        ctx.report.step(float_layers={n: float(f"{errs[n]:.4g}") for n in ranked})
        return {n: errs[n] for n in ranked}

    @torch.no_grad()
    def _output_error(self, model, batches, layers, bits, signed, refs=None) -> float:
        """Relative squared error of the model's outputs with ``layers`` (name -> (module, s))
        fake-quantized, against the float model, summed over the calibration batches."""

        def swap(n, s):
            return lambda mod, inp, out: dynamic_fake_linear(inp[0], mod.weight, mod.bias, s, bits, signed,
                                                             self._outl.get(n))

        err = 0.0
        for bi, b in enumerate(batches):
            x = split(b)[0]
            ref = refs[bi] if refs is not None else \
                [t.float() for t in flatten_outputs(call_model(model, x)) if t.is_floating_point()]
            handles = [m.register_forward_hook(swap(n, s)) for n, (m, s) in layers.items()]
            try:
                got = [t.float() for t in flatten_outputs(call_model(model, x)) if t.is_floating_point()]
            finally:
                for h in handles:
                    h.remove()
            err += sum(float((g - r).double().pow(2).sum() / r.double().pow(2).sum().clamp(min=1e-30))
                       for g, r in zip(got, ref))
        return err / max(len(batches), 1)

    @staticmethod
    def _forward(model: nn.Module, batches: list, hooks: dict[str, tuple]) -> None:
        handles = [m.register_forward_pre_hook(h) for m, h in hooks.values()]
        try:
            for b in batches:
                call_model(model, split(b)[0])
        finally:
            for h in handles:
                h.remove()

    def record(self) -> dict[str, Any]:
        return self._record

    @classmethod
    def rebuild(cls, model: nn.Module, config: QuantizeDynamicConfig, record: dict[str, Any]) -> nn.Module:
        for lname, info in record.get("layers", {}).items():
            mod = recorded_module(model, lname, (nn.Linear,), "quantize-dynamic record")
            # A smoothed layer gets placeholder scales here; the weights file restores W*s and 1/s.
            s = torch.ones(mod.in_features) if info.get("smoothed") else None
            at = f"quantize-dynamic record: {lname}"
            idx = (torch.tensor(record_indices(info["outliers"], mod.in_features, f"{at}: outliers"), dtype=torch.int64)
                   if info.get("outliers") else None)
            bits = record_int(info["bits"], 2, 16, f"{at}: bits")
            convert(mod, QuantArgs(bits=bits, symmetric=bool(info["signed"])), DYNAMIC_UINT8, smooth=s, outliers=idx)
        rebuild_embeddings(model, record.get("embeddings", []))
        if record.get("attention"):
            from ..quant.attention import rebuild_attention

            rebuild_attention(model, record["attention"])
        return model
