"""The ``quantize`` step's float formats: FP8 weights and activations, MX / NVFP4 weights (simulated).

``quantize`` runs this path when ``weights.format`` is not ``int``
(:class:`~nnsqueeze.steps.quantize.QuantizeConfig`). Each selected Linear/Conv1d/Conv2d becomes a
:mod:`nnsqueeze.quant.floatq` layer (weights on the format's grid; FP8 scales per tensor or per
output channel, MX/NVFP4 block scales along each output channel's inputs). With
``activations: {format: fp8-e4m3}`` (or ``fp8-e5m2``) each layer's input gets a static per-tensor FP8
scale, ``amax / max_finite``, from the calibration method's range; with ``dynamic: true`` the scale is
taken from each input at run time instead (per tensor, or ``granularity: per-token``: per row of a
Linear's input; no calibration); without an ``activations`` entry they stay float (weight-only).
The record holds each layer's :class:`~nnsqueeze.quant.args.QuantArgs`,
so ``nsq.load`` rebuilds the same layers and the state dict fills their scales. Recipe::

    - quantize: {weights: {format: fp8-e4m3, granularity: per-channel}, activations: {format: fp8-e4m3}}
    - quantize: {weights: {format: fp8-e4m3}, activations: {format: fp8-e4m3, dynamic: true}}
    - quantize: {weights: {format: mxfp4}}      # or mxfp8-e4m3, nvfp4, ...: weight-only simulation

FP8 exports to ONNX as float8 QuantizeLinear/DequantizeLinear (:mod:`nnsqueeze.export.fp8`); the block
formats have no ONNX Runtime CPU kernel and the exporter says so. ::

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.context import Context
    >>> from nnsqueeze.steps.quantize import Quantize
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    >>> ctx = Context(calib_data=[(torch.randn(16, 8), None)]); ctx.report.begin_step("quantize", {})
    >>> cfg = Quantize.Config(weights={"format": "fp8-e4m3"}, activations={"format": "fp8-e4m3"})
    >>> model = Quantize(cfg).run(model, ctx)
    >>> [type(m).__name__ for m in model], model[0].wargs.describe()
    (['FloatQuantLinear', 'ReLU', 'FloatQuantLinear'], 'fp8-e4m3 channel')
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..data import forward_samples
from ..errors import DataError, ModelError, RecipeError
from ..ops.quant import sqnr_db
from ..quant.args import QuantArgs
from ..quant.protocol import layer_bits
from ..quant.convert import convert
from ..quant.floatq import FLOAT_MODULE_MAP
from ..registry import OBSERVERS
from .base import recorded_module


def float_args(cfg: Any) -> tuple[QuantArgs, QuantArgs | None]:
    """(weights, activations or None: float) QuantArgs of a float-format quantize config."""
    acts = cfg.activations.args(cfg.calibration.method) if cfg.activations.format != "none" else None
    return cfg.weights.args(), acts


def run_float(step: Any, model: nn.Module, ctx: Any, layers: list[tuple[str, nn.Module]], data: Any,
              folded: list, was_training: bool) -> nn.Module:
    """Convert ``layers``, calibrate the FP8 input scales on ``data``, record and report."""
    cfg, name = step.config, step.registered_name
    wargs, aargs = float_args(cfg)
    static = aargs is not None and not aargs.dynamic   # only static activation scales need calibration
    if aargs is not None and aargs.granularity == "token":
        convs = [lname for lname, mod in layers if not isinstance(mod, nn.Linear)]
        if convs:
            model.train(was_training)
            raise RecipeError(f"{step.where}.activations.granularity", "per-token scales are one per row of a "
                              f"Linear's input; {', '.join(convs[:5])} "
                              f"{'is a convolution' if len(convs) == 1 else 'are convolutions'}",
                              fix="use granularity per-tensor, or targets: [Linear]")
    observer = OBSERVERS.get(cfg.calibration.method)
    refs = {lname: mod.weight.detach().clone() for lname, mod in layers}   # float weights, for the SQNR
    for lname, mod in layers:
        convert(mod, wargs, aargs)
        mod.start_calibration(lambda name, obs=observer: obs(axis=None, name=name), lname)
    n_samples = n_batches = 0
    try:
        if static:   # weight-only and dynamic activations need no data
            n_samples, n_batches = forward_samples(model, data, cfg.calibration.samples, ctx.device)
    except BaseException:
        for _, mod in layers:
            mod.revert_()
        model.train(was_training)
        raise
    record_layers: dict[str, dict[str, Any]] = {}
    for lname, mod in layers:
        if static and mod.calibrated_batches == 0:
            mod.revert_()
            ctx.skip(name, lname, "never called during calibration (not in the forward path)")
            continue
        mod.finish_calibration()
        record_layers[lname] = {"type": mod._float_class.__name__, "weights": wargs.to_dict(),
                                "activations": None if aargs is None else aargs.to_dict()}
        sqnr = sqnr_db(refs[lname], mod.dequantized_weight().detach())
        ctx.report.layer(lname, **layer_bits(mod),
                         scheme=f"{wargs.describe()} / {aargs.describe() if aargs else 'float activations'}",
                         ort_kernels="float (fp8 Q/DQ)" if mod.onnx_unsupported is None else "none on CPU",
                         weight_sqnr_db=round(sqnr, 2) if sqnr == sqnr and abs(sqnr) != float("inf") else None)
    if not record_layers:
        raise DataError(f"{step.where}.calibration", "no quantized layer saw calibration data",
                        fix="check that calib_data batches match the model's inputs")
    step._record = {"folded": [list(p) for p in folded], "relu_removed": [], "layers": record_layers}
    ctx.report.step(calibration_samples=n_samples, calibration_batches=n_batches,
                    quantized_layers=len(record_layers), bn_folded=len(folded), weight_bits=wargs.bits,
                    scheme=f"{wargs.describe()}, {aargs.describe() if aargs else 'float activations'}")
    model.train(was_training)
    return model


def rebuild_float(model: nn.Module, lname: str, info: dict[str, Any]) -> None:
    """One recorded float-format layer back onto the fresh model (the state dict then fills its scales)."""
    mod = recorded_module(model, lname, (nn.Module,), "quantize record")
    if type(mod).__name__ != info["type"] or type(mod) not in FLOAT_MODULE_MAP:
        raise ModelError(f"quantize record: {lname}", f"expected a {info['type']}, found {type(mod).__name__}",
                         fix="load the artifact with the same model class it was made from")
    try:
        wargs = QuantArgs.from_dict(info["weights"])
        aargs = None if info.get("activations") is None else QuantArgs.from_dict(info["activations"])
    except ValueError as e:
        raise ModelError(f"quantize record: {lname}", f"invalid quantization args: {e}",
                         fix="the artifact is damaged or from another nnsqueeze version") from None
    convert(mod, wargs, aargs)
