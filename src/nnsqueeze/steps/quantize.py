"""The ``quantize`` step: static post-training quantization, simulated in torch, exported as QDQ.

Folds BatchNorm into the preceding layers, optionally equalizes consecutive layers (CLE or
SmoothQuant, :mod:`nnsqueeze.quant.equalize`), swaps Linear/Conv1d/Conv2d for fake-quant layers
(:mod:`nnsqueeze.quant.modules`: weights in a :class:`~nnsqueeze.quant.scheme.WeightScheme`, by
default int8 symmetric per-channel; per-tensor activations in a
:class:`~nnsqueeze.quant.act_scheme.ActScheme`, by default uint8 asymmetric; int32 bias),
calibrates the activation ranges on ``ctx.calib_data`` (else ``ctx.train_data``), optionally learns
the weight rounding with AdaRound (layer by layer, on the quantized model's inputs), corrects the
biases for the mean weight rounding error, and absorbs a ReLU or ReLU6 that directly follows a conv so that
ONNX Runtime runs QLinearConv/QGemm end to end. Recipe::

    - quantize:
        weights: {bits: 8, granularity: per-channel, symmetric: true}   # bits 2..8, per-tensor/per-group
        activations: {bits: 8, granularity: per-tensor, symmetric: false}   # bits 2..8 or 16; true: signed
        calibration: {method: minmax, samples: 512}
        fold_bn: true
        bias_correction: true
        # weights: {bits: 4, clip: mse, adaround: {iters: 1000}}         # low-bit options
        # weights: {bits: 4, levels: nf4}                                # or pow2 / kmeans
        # layer_weights: {classifier.2: {bits: 8}}                       # per-layer schemes
        # layer_activations: {classifier.2: {bits: 16}}                  # per-layer activation formats
        # wide_first: 3                            # the first 3 layers with 16-bit activations (mobile CNNs)
        # equalize: {method: cle, iterations: 2}                         # or smoothquant
        # ops: [add, matmul]   # residual adds + activation matmuls (fx), or HF attention q@k^T, p@v
        # weights: {format: fp8-e4m3}, activations: {format: fp8-e4m3}   # float formats, or
        # weights: {format: mxfp4}   # mxfp8-e4m3 / nvfp4 ...: steps/quantize_float.py, docs/formats.md

``ops`` quantizes what sits between layers (:mod:`nnsqueeze.quant.functional`): on fx-traceable
models every ``add`` / ``matmul`` of two activations gets per-tensor inputs (and output, for
``add``) in the step's ``activations`` format, so ORT runs QLinearAdd and integer MatMuls; Hugging Face
encoders get int8 attention matmuls through :mod:`nnsqueeze.quant.attention`. An untraceable model is
reported via ``ctx.skip``.

In Python::

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.context import Context
    >>> from nnsqueeze.steps.quantize import Quantize
    >>> model = nn.Sequential(nn.Conv1d(1, 4, 3), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten(),
    ...                       nn.Linear(4 * 8, 3)).eval()
    >>> ctx = Context(calib_data=[(torch.randn(16, 1, 10), None)]); ctx.report.begin_step("quantize", {})
    >>> step = Quantize(Quantize.Config())
    >>> model = step.run(model, ctx)
    >>> [type(m).__name__ for m in model]
    ['QuantConv1d', 'Identity', 'Identity', 'Flatten', 'QuantLinear']

Reduced range: on x86 CPUs without VNNI (AVX2, AVX-512 without VNNI), ONNX Runtime's u8s8 GEMM kernels
add pairs of u8*s8 products into int16 with saturation, so full 8-bit weights make the int8 model
drift from its simulation (measured: 4% of the logit range, 96.5% top-1 agreement on the demo CNN).
``weights.reduce_range: auto`` (default) then uses 7-bit weight codes, which cannot saturate, and
notes it in the report; ``true``/``false`` force it. Depthwise convs keep 8 bits either way: ORT runs
them with a kernel that accumulates in int32 on every CPU. The choice is recorded, so a reloaded artifact
is the same on every machine.

Activation formats (``activations`` / ``layer_activations``): uint8 and int8 export as plain
QuantizeLinear/DequantizeLinear; 2..7 bits as ``Q -> Clip(codes) -> DQ`` in a uint8 container
(ORT keeps QLinearConv/QGemm); 16 bits as com.microsoft int16 Q/DQ, where ORT computes those
layers in float on the exact 16-bit values (reported as a fallback). See docs/quantization.md.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..data import as_batches, forward_samples, take
from ..errors import DataError, ModelError, RecipeError
from ..isa import weight_range
from ..quant.fold import fold_batchnorm, refold_structure
from ..quant.protocol import layer_bits
from ..quant.convert import convert
from ..quant.modules import MODULE_MAP
from ..quant.act_scheme import ActScheme
from ..quant.args import FORMATS
from ..quant.scheme import WeightScheme
from ..quant.tie_inputs import tie_layer_inputs
from ..registry import OBSERVERS, STEPS
from .base import Step, record_int, recorded_module
from .quantize_relu import relu_plan
from .quantize_config import (  # noqa: F401 - the config types, re-exported where they always were
    SUPPORTED_TEXT, WEIGHT_FORMATS, ActivationsConfig, AdaRoundConfig, CalibrationConfig, EqualizeConfig,
    QuantizeConfig, WeightsConfig, act_scheme, weight_scheme)
from ..targets import set_module

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)
_CONVS = (nn.Conv1d, nn.Conv2d)
def _mark_float_boundaries(mods: list[nn.Module]) -> None:
    """Layers with 16-bit activations run in float in ORT; where integer layers follow them, float
    round-off (ORT's conv vs torch's) moves a few 16-bit codes and, through them, an 8-bit code now and
    then, which deep nets amplify on some outputs (EfficientNet-Lite0, 3 such layers: up to 0.31 on
    the logits, 4 steps are 0.25). The export then checks the mean difference, as for dynamic
    quantization; all-integer models keep the max check (exact integer simulation)."""
    wide = [m for m in mods if m.act_qargs.bits > 8]
    if wide and len(wide) < len(mods):
        for m in wide:
            m.onnx_verify_mean = True


def _depthwise(mod: nn.Module) -> bool:
    """A depthwise conv (one input and one output channel per group): ORT's QLinearConv runs it with
    its own kernel, which accumulates in int32 exactly, not with the u8s8 GEMM that may saturate."""
    return isinstance(mod, _CONVS) and mod.groups > 1 and mod.in_channels == mod.groups == mod.out_channels


@torch.no_grad()
def _layer_inputs(model: nn.Module, lname: str, data: Any, samples: int, device: Any) -> torch.Tensor:
    """The inputs of module ``lname`` over the first ``samples`` examples of ``data`` (concatenated)."""
    store: list[torch.Tensor] = []
    h = model.get_submodule(lname).register_forward_pre_hook(lambda m, args: store.append(args[0].detach()))
    try:
        forward_samples(model, data, samples, device)
    finally:
        h.remove()
    return torch.cat(store)[:max(samples, 1)] if store else torch.zeros(0)


@STEPS.register("quantize")
class Quantize(Step):
    """Static int8 PTQ; see the module docstring."""
    needs_float = True
    quantizes = True

    Config = QuantizeConfig
    default_targets = ["Linear", "Conv1d", "Conv2d"]

    def __init__(self, config: QuantizeConfig, index: int = 0):
        super().__init__(config, index)
        self._check_supported()
        self._record: dict[str, Any] = {}

    def onnx_limit(self) -> str | None:
        fmt = self.config.weights.format
        if fmt != "int" and FORMATS[fmt].kind == "block":
            return (f"weights format {fmt} is a block format, and ONNX Runtime's CPU provider has no kernel for "
                    "block-scaled DequantizeLinear, so the file could not be run or checked")
        return None

    def _check_supported(self) -> None:
        a, where = self.config.activations, self.where
        for key, w in [("weights", self.config.weights)] + [(f"layer_weights.{k}", v)
                                                            for k, v in self.config.layer_weights.items()]:
            try:
                weight_scheme(w)
            except ValueError as e:
                raise RecipeError(f"{where}.{key}", str(e), fix=f"supported: {SUPPORTED_TEXT}") from None
            if w.adaround is not None and weight_scheme(w).args().nonuniform:
                raise RecipeError(f"{where}.{key}.adaround", "AdaRound learns rounding on a uniform grid",
                                  fix="use levels: uniform with adaround, or drop adaround")
        acts = [("activations", a)] + [(f"layer_activations.{k}", v) for k, v in self.config.layer_activations.items()]
        for key, a in acts:
            if a.granularity not in ("per-tensor", "per-token"):   # per-token: fp8 dynamic (config checks it)
                raise RecipeError(f"{where}.{key}", f"{a.granularity} activations are not supported (activations "
                                  "are quantized per tensor)", fix=f"supported: {SUPPORTED_TEXT}")
            try:
                act_scheme(a)
            except ValueError as e:
                raise RecipeError(f"{where}.{key}.bits", str(e), fix=f"supported: {SUPPORTED_TEXT}") from None
        OBSERVERS.get(self.config.calibration.method, where=f"{where}.calibration.method")

    def select(self, model: nn.Module, ctx: Any, supported: tuple[type, ...]) -> Any:
        # Default targets are a menu: a model without Conv2d must not fail on "Conv2d" matching
        # nothing (targets the user wrote keep the strict check).
        present = {type(m).__name__ for m in model.modules()}
        self.default_targets = [t for t in type(self).default_targets if t in present] or \
            list(type(self).default_targets)
        return super().select(model, ctx, supported)

    # ---------------------------------------------------------------------------------------
    def _calib_data(self, ctx) -> Any:
        if ctx.calib_data is not None:
            return as_batches(ctx.calib_data, "calib_data")
        if ctx.train_data is not None:
            ctx.fallback(self.registered_name, "no calib_data given; calibrating on train_data")
            return as_batches(ctx.train_data, "train_data")
        raise DataError(f"{self.where}.calibration", "static quantization needs calibration data and the "
                        "context has neither calib_data nor train_data",
                        fix="pass calib_data=... (a few hundred representative examples)")

    def _prepare_bn(self, model: nn.Module, ctx) -> list[tuple[str, str]]:
        """Fold BatchNorm into the preceding layers (QAT attaches it instead, see steps/qat.py)."""
        if not self.config.fold_bn:
            return []
        res = fold_batchnorm(model)
        for bn, why in res.unfolded:
            ctx.skip(self.registered_name, bn, f"BatchNorm not folded: {why}")
        return res.folded

    def _schemes(self, layers: list[tuple[str, nn.Module]], ctx) -> dict[str, tuple[WeightScheme, WeightsConfig]]:
        """Weight scheme per layer (``layer_weights`` overrides), with reduced range and group-size
        fallbacks decided and logged here."""
        cfg, name = self.config, self.registered_name
        unknown = set(cfg.layer_weights) - {n for n, _ in layers}
        if unknown:
            raise RecipeError(f"{self.where}.layer_weights", f"{sorted(unknown)} are not quantized layers",
                              fix=f"use exact module names among {[n for n, _ in layers]}")
        rr_noted = False
        out = {}
        for lname, mod in layers:
            w = cfg.layer_weights.get(lname, cfg.weights)
            sch = weight_scheme(w, w.bits)
            # ORT's depthwise kernel widens u8*s8 products to int32 on every CPU (measured under an
            # emulated Haswell: exact with full 8-bit codes), so only GEMM-based layers need 7 bits.
            rng = weight_range(w.bits, w.reduce_range, u8s8=sch.int8_kernels and not _depthwise(mod))
            if rng.note is not None and not rr_noted:
                ctx.fallback(name, rng.note)
                rr_noted = True
            if rng.bits != w.bits:
                sch = weight_scheme(w, rng.bits)
            # A group_size that does not divide a row (C_in/groups * k) is kept: the last group of each
            # output channel is shorter, with its own scale (FakeQuantMixin.weight_groups).
            out[lname] = (sch, w)
        return out

    def _act_schemes(self, layers: list[tuple[str, nn.Module]], ctx) -> dict[str, ActScheme]:
        """Activation scheme per layer (``layer_activations`` overrides); says in the report how ORT
        runs the formats that are not plain 8-bit."""
        cfg, name = self.config, self.registered_name
        unknown = set(cfg.layer_activations) - {n for n, _ in layers}
        if unknown:
            raise RecipeError(f"{self.where}.layer_activations", f"{sorted(unknown)} are not quantized layers",
                              fix=f"use exact module names among {[n for n, _ in layers]}")
        out = {lname: act_scheme(cfg.layer_activations.get(lname, cfg.activations)) for lname, _ in layers}
        for lname in [n for n, _ in layers if n not in cfg.layer_activations][:cfg.wide_first]:
            out[lname] = ActScheme(bits=16, symmetric=bool(cfg.activations.symmetric))
        wide = sorted(n for n, a in out.items() if a.bits == 16)
        narrow = sorted(n for n, a in out.items() if a.bits < 8)
        if wide:
            ctx.fallback(name, f"16-bit activations ({len(wide)} layers: {', '.join(wide[:4])}"
                         f"{'...' if len(wide) > 4 else ''}): ONNX Runtime has no 16-bit conv/matmul kernels, these "
                         "layers run in float on the exact dequantized 16-bit values (com.microsoft Q/DQ; a Linear "
                         "on 3-D "
                         "inputs stores its weight as float, since ORT would turn an int8-coded one into "
                         "MatMulNBits, which re-quantizes its input to 8 bits)")
        if narrow:
            ctx.report.note(name, f"{len(narrow)} layers with 2..7-bit activations are exported in an 8-bit "
                            "container with a Clip on the codes; ONNX Runtime keeps its 8-bit kernels")
        return out

    def run(self, model: nn.Module, ctx) -> nn.Module:
        cfg, name = self.config, self.registered_name
        data = self._calib_data(ctx)
        was_training = model.training
        model.eval()

        folded = self._prepare_bn(model, ctx)
        sel = self.select(model, ctx, supported=SUPPORTED)
        layers = []
        for lname, mod in sel.layers:
            if type(mod) not in MODULE_MAP:  # e.g. a Linear subclass with its own forward
                ctx.skip(name, lname, f"{type(mod).__name__} is a subclass, not a plain Linear/Conv1d/Conv2d")
            else:
                layers.append((lname, mod))
        if not layers:
            raise ModelError(self.where, "no plain Linear/Conv1d/Conv2d left to quantize",
                             fix="target plain nn.Linear / nn.Conv1d / nn.Conv2d modules")
        if cfg.weights.format != "int":  # FP8 / MX / NVFP4: their own module kind (steps/quantize_float.py)
            from .quantize_float import run_float

            return run_float(self, model, ctx, layers, data, folded, was_training)
        equalized: list[dict[str, Any]] = []
        if cfg.equalize is not None:
            from ..quant.equalize import equalize

            eq = cfg.equalize
            equalized = equalize(model, [n for n, _ in layers], eq.method, eq.iterations, eq.alpha,
                                 data=take(data, cfg.calibration.samples), device=ctx.device)
            from ..quant.equalize import find_chains

            relu6 = [f"{a}->{b}" for a, b, c in find_chains(model, [n for n, _ in layers]) if c]
            if relu6:
                ctx.fallback(name, f"equalize: {len(relu6)} pairs with a ReLU6 between left alone "
                             f"({', '.join(relu6[:3])}{'...' if len(relu6) > 3 else ''}): scaling across the clip "
                             "changes the float model (nnsqueeze.quant.equalize)")
            if not equalized:
                ctx.fallback(name, f"equalize ({eq.method}): no layer pair found (a pair is Conv->ReLU/ReLU6->Conv "
                             "or Linear->ReLU->Linear, groups 1 or depthwise; range: a depthwise L2)")
            elif eq.bias_absorption:
                from ..quant.equalize import absorb_biases

                absorbed = absorb_biases(model, [tuple(e["pair"]) for e in equalized],
                                         take(data, cfg.calibration.samples), ctx.device)
                for e in equalized:
                    hit = next((x for x in absorbed if x["pair"] == e["pair"]), None)
                    e["bias_absorbed"] = None if hit is None else hit["absorbed_max"]
        schemes = self._schemes(layers, ctx)
        aschemes = self._act_schemes(layers, ctx)

        plan = relu_plan(model, [n for n, m in layers if isinstance(m, _CONVS)])
        observer = OBSERVERS.get(cfg.calibration.method)
        # AdaRound reconstructs each layer's float output from its input in the QUANTIZED model
        # (earlier layers already quantized): keep a float copy for the targets.
        float_ref = copy.deepcopy(model) if any(w.adaround is not None for _, w in schemes.values()) else None
        for lname, mod in layers:
            act = plan.get(lname, (None, None))[0]
            if act == "relu6" and not aschemes[lname].is_default:  # codes would need a ceiling too: keep it float
                plan.pop(lname)
                act = None
            sch, wcfg = schemes[lname]
            convert(mod, sch.args(), aschemes[lname].args(cfg.calibration.method), act=act)
            mod.start_calibration(lambda name, obs=observer: obs(axis=None, name=name), lname)

        # Calibration: float forward, ranges observed inside each layer.
        try:
            n_samples, n_batches = forward_samples(model, data, cfg.calibration.samples, ctx.device)
        except BaseException:
            for _, mod in layers:  # leave float layers behind, not half-calibrated ones
                mod.revert_()
            model.train(was_training)
            raise

        record_layers: dict[str, dict[str, Any]] = {}
        relu_removed: list[str] = []
        n_corrected = 0
        adaround_stats: dict[str, Any] = {}
        done = []
        for lname, mod in layers:
            if mod.calibrated_batches == 0:
                mod.revert_()
                ctx.skip(name, lname, "never called during calibration (not in the forward path)")
                continue
            adaround = schemes[lname][1].adaround is not None
            if mod.finish_calibration(bias_correction=cfg.bias_correction and not adaround) is not None:
                n_corrected += 1
            done.append((lname, mod))
        for lname, _ in done:  # the conv applies its ReLU/ReLU6 itself: the module after it goes
            relu_name = plan.get(lname, (None, None))[1]
            if relu_name is not None:
                set_module(model, relu_name, nn.Identity())
                relu_removed.append(relu_name)
        # one tensor, one qparams: what ORT runs where a pad sits between two quantized layers
        tied = tie_layer_inputs(model, lambda: forward_samples(model, data, 1, ctx.device))
        for lname, mod in done:  # in registration (usually execution) order: later layers see earlier codes
            c = schemes[lname][1].adaround
            if c is None:
                continue
            x_q = _layer_inputs(model, lname, data, c.samples, ctx.device)
            x_f = _layer_inputs(float_ref, lname, data, c.samples, ctx.device)
            with torch.no_grad():
                target = mod._act(float_ref.get_submodule(lname)(x_f))
            adaround_stats[lname] = self._adaround(mod, x_q, target, c)
            if cfg.bias_correction and mod.correct_bias_(adaround_stats[lname].pop("_reference")) is not None:
                n_corrected += 1
            adaround_stats[lname].pop("_reference", None)
        _mark_float_boundaries([m for _, m in done])
        for lname, mod in done:
            sch, wcfg = schemes[lname]
            record_layers[lname] = {"type": mod._float_class.__name__, "act": mod.act,
                                    "quant_output": mod.quant_output, "weight_bits": mod.weight_bits,
                                    "scheme": sch.to_dict()}
            if not mod.ascheme.is_default:  # absent: uint8 asymmetric (records from before this option)
                record_layers[lname]["act_scheme"] = mod.ascheme.to_dict()
            if sch.granularity == "per-group":  # packed codes alone do not say how rows split into groups
                record_layers[lname]["weight_shape"] = list(mod.weight.shape)
            sqnr = mod.weight_sqnr_db()
            extra = {"adaround": adaround_stats[lname]} if lname in adaround_stats else {}
            asch, wide = mod.ascheme, mod.act_qargs.bits > 8   # 16-bit codes: no int8 kernels
            ctx.report.layer(lname, **layer_bits(mod), scheme=f"{sch.describe()} / {asch.describe()}",
                             ort_kernels="int8" if mod.qargs.int8_kernels and not wide else (
                                 "float (16-bit activations)" if wide else "float (weights pre-quantized)"),
                             weight_sqnr_db=round(sqnr, 2) if sqnr == sqnr and abs(sqnr) != float("inf") else None,
                             **extra)
        if not record_layers:
            raise DataError(f"{self.where}.calibration", "no quantized layer saw calibration data",
                            fix="check that calib_data batches match the model's inputs")

        if n_samples < cfg.calibration.samples:
            ctx.report.note(name, f"calibrated on all {n_samples} samples available "
                            f"(calibration.samples asks for {cfg.calibration.samples})")
        self._record = {"folded": [list(p) for p in folded], "relu_removed": relu_removed,
                        "layers": record_layers}
        if cfg.ops:  # activation-activation ops (fx pass, or HF attention): may return a GraphModule
            from ..quant.functional import quantize_ops

            # the ops' codes: the step's `activations` format (layer_activations are per layer)
            model, self._record["ops"] = quantize_ops(model, cfg.ops, take(data, cfg.calibration.samples),
                                                      lambda name, obs=observer: obs(axis=None, name=name), ctx,
                                                      name, ctx.device, scheme=act_scheme(cfg.activations))
        bits_used = sorted({v["weight_bits"] for v in record_layers.values()})
        act_schemes = {ActScheme.from_dict(v.get("act_scheme")) for v in record_layers.values()}
        acts_used = [a.describe() for a in sorted(act_schemes, key=lambda a: (a.bits, a.symmetric))]
        figures: dict[str, Any] = dict(
            calibration_samples=n_samples, calibration_batches=n_batches, quantized_layers=len(record_layers),
            bn_folded=len(folded), bias_corrected=n_corrected,
            relu_fused=sum(v["act"] in ("relu", "relu6") for v in record_layers.values()),
            weight_bits=bits_used[0] if len(bits_used) == 1 else bits_used,
            scheme=f"{weight_scheme(cfg.weights, bits_used[-1]).describe()}, {' + '.join(acts_used)}"
                   + (", int32 bias" if weight_scheme(cfg.weights).int8_kernels else ""))
        if tied:
            figures["inputs_tied"] = len(tied)
            ctx.report.note(name, f"{len(tied)} layer inputs take the qparams of the quantized output they read "
                            f"(through a pad or pass-through; ORT runs one set per tensor): "
                            f"{', '.join(f'{c}<-{p}' for c, p in tied[:4])}{'...' if len(tied) > 4 else ''}")
        if equalized:
            figures["equalized_pairs"] = equalized
        if adaround_stats:
            figures["adaround_layers"] = sum(v["learned"] for v in adaround_stats.values())
        ctx.report.step(**figures)
        model.train(was_training)
        return model

    @staticmethod
    def _adaround(mod, x: torch.Tensor, target: torch.Tensor, c: AdaRoundConfig) -> dict[str, Any]:
        """Learn the rounding of one calibrated layer: its inputs ``x`` in the quantized model, the
        float layer's outputs ``target``. The layer keeps the learned codes (weight on the grid,
        scales frozen). Returns figures (+ the float weight, for bias correction)."""
        from ..ops.adaround import adaround
        from ..ops.quant import fake_quantize
        ref_w = mod.masked_weight().detach().clone()
        bias = None if mod.bias is None else mod.bias.detach()
        xq = fake_quantize(x, mod.input_scale_, mod.input_zero_point_, *mod.act_qrange)

        def fn(w_rows, xb):  # (R, L) rows -> weight (a partial last group's padding dropped)
            return mod._act(mod._layer(xb, mod.weight_from_rows(w_rows), bias))

        qmin, qmax = mod.weight_qrange
        res = adaround(mod.weight_rows(ref_w), mod.weight_scale_, mod._weight_zp(), qmin, qmax, fn, xq, target,
                       iters=c.iters, batch=c.batch, lam=c.lam, lr=c.lr, mask=mod.weight_row_mask())
        mod.set_weight_codes_(res.codes)
        return {"learned": res.learned, "flipped": round(res.flipped, 4), "mse": res.error,
                "mse_nearest": res.nearest_error, "_reference": ref_w}

    def record(self) -> dict[str, Any]:
        return self._record

    @classmethod
    def rebuild(cls, model: nn.Module, config: QuantizeConfig, record: dict[str, Any]) -> nn.Module:
        refold_structure(model, [tuple(p) for p in record.get("folded", [])])
        for lname, info in record.get("layers", {}).items():
            if "weights" in info:  # a float-format layer (its QuantArgs)
                from .quantize_float import rebuild_float

                rebuild_float(model, lname, info)
                continue
            mod = recorded_module(model, lname, (nn.Module,), "quantize record")
            if type(mod).__name__ != info["type"] or type(mod) not in MODULE_MAP:
                raise ModelError(f"quantize record: {lname}",
                                 f"expected a {info['type']}, found {type(mod).__name__}",
                                 fix="load the artifact with the same model class it was made from")
            bits = record_int(info["weight_bits"], 1, 16, f"quantize record: {lname}: weight_bits")
            sch = WeightScheme.from_dict(info.get("scheme"), bits=bits)
            asch = ActScheme.from_dict(info.get("act_scheme"))  # records without it: uint8 (the old default)
            convert(mod, sch.args(), asch.args(None), act=info["act"], quant_output=info["quant_output"])
        _mark_float_boundaries([recorded_module(model, n, (nn.Module,), "quantize record")
                                for n, info in record.get("layers", {}).items() if "weights" not in info])
        for relu_name in record.get("relu_removed", []):
            set_module(model, relu_name, nn.Identity())
        if record.get("ops"):
            from ..quant.functional import rebuild_ops

            model = rebuild_ops(model, record["ops"])
        return model
