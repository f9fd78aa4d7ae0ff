"""The ``quantize`` step: static int8 post-training quantization, simulated in torch, exported as QDQ.

Folds BatchNorm into the preceding layers, swaps Linear/Conv1d/Conv2d for fake-quant layers
(:mod:`nnsqueeze.quant.modules`: int8 symmetric per-channel weights, uint8 asymmetric per-tensor
activations, int32 bias), calibrates the activation ranges on ``ctx.calib_data`` (else
``ctx.train_data``), corrects the biases for the mean weight rounding error (same pass), and absorbs
a ReLU that directly follows a conv so that ONNX Runtime runs QLinearConv/QGemm end to end. Recipe::

    - quantize:
        weights: {bits: 8, granularity: per-channel, symmetric: true}
        activations: {bits: 8, granularity: per-tensor, symmetric: false}
        calibration: {method: minmax, samples: 512}
        fold_bn: true
        bias_correction: true

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

Reduced range: on x86 CPUs without VNNI (AVX2, AVX-512 without VNNI), ONNX Runtime's u8s8 kernels
add pairs of u8*s8 products into int16 with saturation, so full 8-bit weights make the int8 model
drift from its simulation (measured: 4% of the logit range, 96.5% top-1 agreement on the demo CNN).
``weights.reduce_range: auto`` (default) then uses 7-bit weight codes, which cannot saturate, and
notes it in the report; ``true``/``false`` force it. The choice is recorded, so a reloaded artifact
is the same on every machine.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..data import as_batches, call_model, split, take, to_device
from ..errors import DataError, ModelError, RecipeError
from ..quant.fold import fold_batchnorm, refold_structure
from ..quant.modules import MODULE_MAP, convert_
from ..registry import OBSERVERS, STEPS
from .base import Step, StepConfig, recorded_module
from ..targets import set_module

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)
_CONVS = (nn.Conv1d, nn.Conv2d)
_TRANSPARENT = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WeightsConfig(_Strict):
    bits: int = Field(8, ge=2, le=8, description="8 (or 7: always reduced range)")
    granularity: Literal["per-channel", "per-tensor"] = "per-channel"
    symmetric: bool = True
    reduce_range: bool | Literal["auto"] = Field(
        "auto", description="7-bit weight codes (|w| <= 63) so that ONNX Runtime's u8s8 kernels cannot saturate "
        "on x86 CPUs without VNNI; 'auto': only when the CPU running the step lacks VNNI")


class ActivationsConfig(_Strict):
    bits: int = Field(8, ge=2, le=8)
    granularity: Literal["per-tensor", "per-channel"] = "per-tensor"
    symmetric: bool = False


class CalibrationConfig(_Strict):
    method: str = Field("minmax", description="an observer name (nnsqueeze.registry.OBSERVERS)")
    samples: int = Field(512, ge=1, description="calibration examples (whole batches, at least this many)")


class QuantizeConfig(StepConfig):
    weights: WeightsConfig = Field(default_factory=WeightsConfig)
    activations: ActivationsConfig = Field(default_factory=ActivationsConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    fold_bn: bool = True
    bias_correction: bool = Field(True, description="shift biases so the weight rounding error has zero mean on "
                                  "the calibration data (Nagel et al. 2019)")


SUPPORTED_TEXT = ("weights: {bits: 8, granularity: per-channel, symmetric: true} (bits: 7 also works), "
                  "activations: {bits: 8, granularity: per-tensor, symmetric: false}")


def _relu_plan(model: nn.Module, convs: list[str]) -> dict[str, tuple[bool, str | None]]:
    """For each conv name: (absorb a following ReLU?, name of an nn.ReLU module that can become Identity).

    A ReLU is absorbed when the conv's output (through Identity/Dropout) feeds only that ReLU. The
    ReLU module is replaced only if it is called once and not shared; otherwise it stays (a second
    ReLU on non-negative values changes nothing).
    """
    plan: dict[str, tuple[bool, str | None]] = {}
    uses: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    try:
        import torch.fx

        gm = torch.fx.symbolic_trace(model)
    except Exception:
        gm = None
    if gm is not None:
        calls: dict[str, int] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
        wanted = set(convs)
        for node in gm.graph.nodes:
            if node.op != "call_module" or node.target not in wanted or calls[node.target] != 1:
                continue
            cur = node
            while len(cur.users) == 1:
                nxt = next(iter(cur.users))
                if nxt.op == "call_module" and isinstance(gm.get_submodule(nxt.target), _TRANSPARENT):
                    cur = nxt
                    continue
                if nxt.op == "call_module" and type(gm.get_submodule(nxt.target)) is nn.ReLU:
                    relu = gm.get_submodule(nxt.target)
                    own = calls[nxt.target] == 1 and uses[id(relu)] == 1
                    plan[node.target] = (True, nxt.target if own else None)
                elif (nxt.op == "call_function" and nxt.target in (torch.relu, torch.nn.functional.relu,
                                                                  torch.relu_)) or \
                        (nxt.op == "call_method" and nxt.target in ("relu", "relu_")):
                    plan[node.target] = (True, None)
                break
        return plan
    # Untraceable model: adjacency inside nn.Sequential.
    for seq_name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        prefix = f"{seq_name}." if seq_name else ""
        for i, (n, m) in enumerate(children):
            if prefix + n not in convs:
                continue
            j = i + 1
            while j < len(children) and isinstance(children[j][1], _TRANSPARENT):
                j += 1
            if j < len(children) and type(children[j][1]) is nn.ReLU:
                relu = children[j][1]
                plan[prefix + n] = (True, prefix + children[j][0] if uses[id(relu)] == 1 else None)
    return plan



def _batch_size(inputs: Any) -> int:
    t = next(iter(inputs.values())) if isinstance(inputs, dict) else (
        inputs[0] if isinstance(inputs, (tuple, list)) else inputs)
    return int(t.shape[0]) if isinstance(t, torch.Tensor) and t.dim() else 1


@STEPS.register("quantize")
class Quantize(Step):
    """Static int8 PTQ; see the module docstring."""

    Config = QuantizeConfig
    default_targets = ["Linear", "Conv1d", "Conv2d"]

    def __init__(self, config: QuantizeConfig, index: int = 0):
        super().__init__(config, index)
        self._check_supported()
        self._record: dict[str, Any] = {}

    def _check_supported(self) -> None:
        w, a, where = self.config.weights, self.config.activations, self.where
        if w.granularity != "per-channel" or not w.symmetric or w.bits not in (7, 8):
            raise RecipeError(f"{where}.weights",
                              f"{w.bits}-bit {w.granularity} {'symmetric' if w.symmetric else 'asymmetric'} "
                              "weights are not supported yet (ONNX Runtime int8 kernels)",
                              fix=f"supported: {SUPPORTED_TEXT}")
        if a.granularity != "per-tensor" or a.symmetric or a.bits != 8:
            raise RecipeError(f"{where}.activations",
                              f"{a.bits}-bit {a.granularity} {'symmetric' if a.symmetric else 'asymmetric'} "
                              "activations are not supported yet (ONNX Runtime int8 kernels)",
                              fix=f"supported: {SUPPORTED_TEXT}")
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

    def run(self, model: nn.Module, ctx) -> nn.Module:
        cfg, name = self.config, self.registered_name
        data = self._calib_data(ctx)
        was_training = model.training
        model.eval()

        folded: list[tuple[str, str]] = []
        if cfg.fold_bn:
            res = fold_batchnorm(model)
            folded = res.folded
            for bn, why in res.unfolded:
                ctx.skip(name, bn, f"BatchNorm not folded: {why}")

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

        wbits = cfg.weights.bits
        if wbits == 8 and cfg.weights.reduce_range is not False:
            from ..export.ort import u8s8_may_saturate

            if cfg.weights.reduce_range is True:
                wbits = 7
            elif u8s8_may_saturate():
                wbits = 7
                ctx.fallback(name, "this CPU has no VNNI, where ONNX Runtime's u8s8 kernels saturate with 8-bit "
                             "weights: using 7-bit weight codes (weights.reduce_range: auto; set false to keep 8)")

        plan = _relu_plan(model, [n for n, m in layers if isinstance(m, _CONVS)])
        observer = OBSERVERS.get(cfg.calibration.method)
        for lname, mod in layers:
            absorb = plan.get(lname, (False, None))[0]
            convert_(mod, weight_bits=wbits, act="relu" if absorb else None)
            mod.start_calibration(lambda name, obs=observer: obs(axis=None, name=name), lname)

        # Calibration: float forward, ranges observed inside each layer.
        n_samples = n_batches = 0
        try:
            with torch.no_grad():
                for batch in take(data, cfg.calibration.samples):
                    inputs, _ = split(batch)
                    call_model(model, to_device(inputs, ctx.device))
                    n_samples += _batch_size(inputs)
                    n_batches += 1
        except BaseException:
            for _, mod in layers:  # leave float layers behind, not half-calibrated ones
                mod.revert_()
            model.train(was_training)
            raise

        record_layers: dict[str, dict[str, Any]] = {}
        relu_removed: list[str] = []
        n_corrected = 0
        for lname, mod in layers:
            if mod.calibrated_batches == 0:
                mod.revert_()
                ctx.skip(name, lname, "never called during calibration (not in the forward path)")
                continue
            if mod.finish_calibration(bias_correction=cfg.bias_correction) is not None:
                n_corrected += 1
            relu_name = plan.get(lname, (False, None))[1]
            if relu_name is not None:
                set_module(model, relu_name, nn.Identity())
                relu_removed.append(relu_name)
            record_layers[lname] = {"type": mod._float_class.__name__, "act": mod.act,
                                    "quant_output": mod.quant_output, "weight_bits": mod.weight_bits}
            sqnr = mod.weight_sqnr_db()
            ctx.report.layer(lname, bits=mod.weight_bits, act_bits=8,
                             scheme=f"w{mod.weight_bits} per-channel sym / a8 per-tensor asym",
                             weight_sqnr_db=round(sqnr, 2) if sqnr == sqnr and abs(sqnr) != float("inf") else None)
        if not record_layers:
            raise DataError(f"{self.where}.calibration", "no quantized layer saw calibration data",
                            fix="check that calib_data batches match the model's inputs")

        if n_samples < cfg.calibration.samples:
            ctx.report.note(name, f"calibrated on all {n_samples} samples available "
                            f"(calibration.samples asks for {cfg.calibration.samples})")
        self._record = {"folded": [list(p) for p in folded], "relu_removed": relu_removed,
                        "layers": record_layers}
        ctx.report.step(calibration_samples=n_samples, calibration_batches=n_batches,
                        quantized_layers=len(record_layers), bn_folded=len(folded), bias_corrected=n_corrected,
                        relu_fused=sum(v["act"] == "relu" for v in record_layers.values()),
                        weight_bits=wbits, scheme=f"w{wbits} per-channel sym, a8 per-tensor asym, int32 bias")
        model.train(was_training)
        return model

    def record(self) -> dict[str, Any]:
        return self._record

    @classmethod
    def rebuild(cls, model: nn.Module, config: QuantizeConfig, record: dict[str, Any]) -> nn.Module:
        refold_structure(model, [tuple(p) for p in record.get("folded", [])])
        for lname, info in record.get("layers", {}).items():
            mod = recorded_module(model, lname, (nn.Module,), "quantize record")
            if type(mod).__name__ != info["type"] or type(mod) not in MODULE_MAP:
                raise ModelError(f"quantize record: {lname}",
                                 f"expected a {info['type']}, found {type(mod).__name__}",
                                 fix="load the artifact with the same model class it was made from")
            convert_(mod, weight_bits=int(info["weight_bits"]), act=info["act"], quant_output=info["quant_output"])
        for relu_name in record.get("relu_removed", []):
            set_module(model, relu_name, nn.Identity())
        return model
