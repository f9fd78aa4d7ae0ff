"""Export to ONNX, as an int8 QDQ graph for quantized models, and verify it in ONNX Runtime.

Float models export plain. For models holding fake-quant layers (:mod:`nnsqueeze.quant.modules`)
the TorchScript exporter writes QuantizeLinear/DequantizeLinear pairs, which
:mod:`nnsqueeze.export.qdq` then rewrites so that ONNX Runtime runs int8 kernels (QLinearConv,
QGemm, QLinearMatMul...) and the file is ~4x smaller (int8 weights, int32 biases); 2..4-bit,
per-group and non-uniform weights are stored as codes of their width (int4/uint4/int8/uint8,
:mod:`nnsqueeze.export.lowbit`, which may upgrade the file to opset 21 for int4).

Every rewrite is exact: the file computes what the torch simulation computes, up to ORT's own
int32 requantization rounding. The export is then checked in ONNX Runtime on the example inputs
(and ``samples``) and written atomically::

    >>> import torch, tempfile, os
    >>> from torch import nn
    >>> from nnsqueeze.export.onnx import export_onnx
    >>> model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3)).eval()
    >>> with tempfile.TemporaryDirectory() as d:
    ...     figures = export_onnx(model, os.path.join(d, "m.onnx"), torch.randn(5, 8))
    >>> figures["quantized"], figures["max_abs_diff"] < 1e-5
    (False, True)

A quantized model (after the ``quantize`` step) exports the same way; ``figures["ort_int8_ops"]``
then lists the int8 kernels ONNX Runtime fused, e.g. ``{"QGemm": 2, "QLinearConv": 3}``.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from ..data import as_tuple
from ..errors import ExportError
from ..quant.modules import export_mode, fake_quant_modules
from ..quant.protocol import ExportHints
from ..registry import EXPORTERS
from ..safeio import check_file_target, write_file
from .lowbit import DOMAIN as LOWBIT_DOMAIN
from .lowbit import lowbit_postprocess, stores_lowbit
from .fp8 import fp8_postprocess
from .qdq import qdq_postprocess

INT8_OPS = {"QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat",
            "DynamicQuantizeMatMul", "MatMulNBits", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
            "QLinearAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax"}
FLOAT_COMPUTE_OPS = {"Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul", "NchwcConv"}
# A quantized model agrees with its torch simulation up to ORT's requantization rounding, which can
# move a code by one step per layer: allow this many 8-bit steps of each output's range.
QUANT_TOLERANCE_STEPS = 4.0
FP32_RTOL = 1e-4


# ------------------------------------------------------------------------------------------------
# Export + verification
# ------------------------------------------------------------------------------------------------
def flatten_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flatten_outputs(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flatten_outputs(v)]
    if hasattr(out, "to_tuple"):  # transformers ModelOutput
        return flatten_outputs(out.to_tuple())
    raise ExportError("export", f"model output contains a {type(out).__name__}",
                      fix="return tensors (or tuples/dicts of tensors) from forward")


def _input_names(model: nn.Module, example: Any) -> list[str]:
    if isinstance(example, dict):
        try:
            order = list(inspect.signature(model.forward).parameters)
        except (TypeError, ValueError):
            order = []
        return [k for k in order if k in example] + [k for k in example if k not in order]
    n = len(as_tuple(example))
    return ["input"] if n == 1 else [f"input_{i}" for i in range(n)]


class _KwargsAdapter(nn.Module):
    """``forward(*tensors)`` calling ``model(**dict(zip(names, tensors)))``."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, list(names)

    def forward(self, *args: Any) -> Any:
        return self.model(**dict(zip(self.names, args)))


class _NoCache(nn.Module):
    """A decoder whose forward takes ``use_cache`` (Hugging Face causal LMs) called with
    ``use_cache=False``: the key/value cache object is not an exportable output, the logits are."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.mask = "attention_mask" in inspect.signature(model.forward).parameters

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.mask and len(args) == 1 and "attention_mask" not in kwargs:
            # An explicit all-ones mask: without one, transformers builds it with ops (aten::diff)
            # the TorchScript exporter cannot translate.
            kwargs["attention_mask"] = torch.ones_like(args[0])
        return self.model(*args, **kwargs, use_cache=False)


def _wants_no_cache(model: nn.Module) -> bool:
    try:
        return "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _call(model: Any, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(*as_tuple(inputs))


def _tolerance(ref: torch.Tensor, quantized: bool, atol: float | None) -> float:
    if atol is not None:
        return float(atol)
    ref = ref.detach().double()
    if not ref.is_floating_point() or ref.numel() == 0:
        return 0.0
    fp32_tol = FP32_RTOL * max(1.0, float(ref.abs().max()))
    if quantized:
        return max(QUANT_TOLERANCE_STEPS * float(ref.max() - ref.min()) / 255.0, fp32_tol)
    return fp32_tol


def verify_onnx(model: nn.Module, onnx_bytes: bytes, batches: list, quantized: bool,
                atol: float | None = None, where: str = "export", statistic: str = "max") -> dict[str, Any]:
    """Compare ONNX Runtime with the torch model on ``batches`` (model inputs). Raises ExportError.

    ``statistic="mean"`` checks the mean absolute difference against the tolerance instead of the
    maximum: for run-time (dynamic) activation quantization, float differences of 1e-7 between torch
    and ORT upstream flip a few activation codes, and deep models amplify those flips into
    differences as large as the quantization noise itself on some elements, with the same accuracy.
    """
    from .ort import OrtModule, optimized_op_types

    ort_model = OrtModule(onnx_bytes)
    max_diff, worst_ratio, agree, total, n_samples = 0.0, 0.0, 0, 0, 0
    tol_used, mean_diff, max_seen = 0.0, 0.0, 0.0
    for bi, inputs in enumerate(batches):
        with torch.no_grad():
            ref = flatten_outputs(_call(model, inputs))
        got = flatten_outputs(_call(ort_model, inputs))
        if len(ref) != len(got):
            raise ExportError(where, f"ONNX model returns {len(got)} outputs, torch returns {len(ref)}",
                              fix="return a fixed structure of tensors from forward")
        for oi, (r, g) in enumerate(zip(ref, got)):
            r = r.detach().cpu()
            if tuple(r.shape) != tuple(g.shape):
                raise ExportError(where, f"output {oi}: ONNX shape {tuple(g.shape)} != torch {tuple(r.shape)} "
                                  f"(batch {bi})", fix="avoid shape logic that the tracer freezes (e.g. Python "
                                  "ints from tensor.size() in arithmetic)")
            if not r.is_floating_point():
                d = float((r.long() != g.long()).any())
            else:
                dd = (r.double() - g.double()).abs()
                d = float(dd.max()) if r.numel() else 0.0
                mean_diff = max(mean_diff, float(dd.mean()) if r.numel() else 0.0)
                if statistic == "mean":
                    max_seen = max(max_seen, d)
                    d = float(dd.mean()) if r.numel() else 0.0
            tol = _tolerance(r, quantized, atol)
            max_diff, tol_used = max(max_diff, d), max(tol_used, tol)
            if d > tol or d != d:
                fix = ("check custom ops in forward; compare with verify=False and inspect the graph")
                if quantized:
                    from ..isa import describe

                    isa = describe()
                    fix = "pass atol=... if the difference is acceptable"
                    if isa["u8s8_saturates"]:
                        fix = (f"this CPU ({isa['isa']}, no VNNI) runs ORT's u8s8 kernels, which saturate int16 sums "
                               "with 8-bit weights: quantize with weights.reduce_range: auto (the default) or true "
                               "(7-bit weight codes), or weights.symmetric: false (u8u8) for dynamic layers; " + fix)
                raise ExportError(where, f"ONNX Runtime output {oi} differs from the torch model by {d:.4g} "
                                  f"({'mean' if statistic == 'mean' else 'max'} abs) "
                                  f"(tolerance {tol:.4g}) on verification batch {bi}", fix=fix)
            if tol > 0:
                worst_ratio = max(worst_ratio, d / tol)
        main = ref[0]
        if main.is_floating_point() and main.dim() == 2 and main.shape[1] > 1:
            agree += int((main.argmax(1) == got[0].argmax(1)).sum())
            total += main.shape[0]
        n_samples += int(main.shape[0]) if main.dim() else 1
    ops = Counter(optimized_op_types(onnx_bytes))
    return {
        "verified_batches": len(batches), "verified_samples": n_samples, "check": f"{statistic} abs diff",
        "max_abs_diff": max(max_diff, max_seen), "mean_abs_diff": mean_diff, "tolerance": tol_used,
        "diff_to_tolerance": round(worst_ratio, 4),
        "top1_agreement": (agree / total) if total else None,
        "ort_int8_ops": {k: v for k, v in sorted(ops.items()) if k in INT8_OPS},
        "ort_float_ops": {k: v for k, v in sorted(ops.items()) if k in FLOAT_COMPUTE_OPS},
    }


@contextlib.contextmanager
def no_attention_fastpath() -> Any:
    """Turn off the eval fast path of ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` for a trace.

    In eval mode without gradients those modules call fused kernels (``aten::_native_multi_head_attention``,
    ``aten::_transformer_encoder_layer_fwd``) that the TorchScript ONNX exporter cannot convert; with the
    fast path off they run their composite ops, which compute the same function. The user's setting is
    restored afterwards.
    """
    before = torch.backends.mha.get_fastpath_enabled()  # torch >= 2.1; nnsqueeze needs 2.3
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


@EXPORTERS.register("onnx")
def export_onnx(model: nn.Module, path: str | os.PathLike, example_inputs: Any, opset: int = 17,
                verify: bool = True, samples: Iterable | None = None, atol: float | None = None,
                dynamic_axes: dict[str, dict[int, str]] | None = None) -> dict[str, Any]:
    """Export ``model`` to ``path`` (int8 QDQ if it holds fake-quant layers) and check it in ORT.

    ``example_inputs``: a tensor, a tuple of positional tensors, or a dict of keyword tensors; the
    batch dimension (dim 0 of every input and output) is dynamic. ``samples``: more model inputs to
    verify on (each like ``example_inputs``; targets already split off). Tolerance: ``atol`` if
    given, else 1e-4 relative for float models and 4 steps of an 8-bit grid over each output's range
    for quantized ones. ``dynamic_axes``: more dynamic axes by input/output name, merged with the batch
    axis (e.g. ``{"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}}``). Returns JSON-able figures
    (sizes, max_abs_diff, top1_agreement, ORT op types).
    """
    import onnx

    path = Path(path)
    where = f"export onnx ({path.name})"
    check_file_target(path, where, ExportError)  # a directory or unwritable place: say so before the work
    if opset < 13:
        raise ExportError(where, f"opset {opset} is too old for per-channel QDQ", fix="use opset >= 13 (default 17)")
    hints = [m for m in model.modules() if isinstance(m, ExportHints)]  # declared by quantized modules and ops
    unsupported = sorted({m.onnx_unsupported for m in hints if m.onnx_unsupported})
    if unsupported:  # e.g. MX / NVFP4 block formats: no ONNX Runtime CPU kernel to verify the file on
        raise ExportError(where, "; ".join(unsupported),
                          fix="no dequantized-weight ONNX export exists yet: set export: {onnx: null} and use the "
                          "torch model and the artifact (nsq.load), or quantize with weights: {format: fp8-e4m3}, "
                          "which ONNX Runtime runs as float8 Q/DQ")
    quantized = any(True for _ in fake_quant_modules(model)) or any(m.onnx_quantized for m in hints)
    bf16 = any(m.onnx_bf16_storage for m in hints)
    custom_opsets: dict[str, int] = {}
    for m in hints:
        custom_opsets.update(m.onnx_custom_opsets)
    if any(stores_lowbit(m.qargs) for _, m in fake_quant_modules(model)):
        custom_opsets.setdefault(LOWBIT_DOMAIN, 1)   # export/lowbit.py's markers, replaced before writing
    user_model = model
    if _wants_no_cache(model):  # export and verify the logits of a causal LM, without its cache
        model = _NoCache(model)
    was_training = user_model.training
    model.eval()
    try:
        with torch.no_grad():
            ref_out = flatten_outputs(_call(model, example_inputs))
        in_names = _input_names(model, example_inputs)
        out_names = ["output"] if len(ref_out) == 1 else [f"output_{i}" for i in range(len(ref_out))]
        dyn = {n: {0: "batch"} for n in in_names + out_names}
        if isinstance(model, _NoCache):  # token sequences: the sequence axis is dynamic too
            ins = example_inputs if isinstance(example_inputs, dict) else dict(zip(in_names, as_tuple(example_inputs)))
            seq_names = [n for n in in_names if ins[n].dim() >= 2]
            seq_names += [n for n, o in zip(out_names, ref_out) if o.dim() >= 2]
            for n in seq_names:
                dyn[n][1] = "seq"
        for n, axes in (dynamic_axes or {}).items():
            dyn.setdefault(n, {}).update(axes)
        buf = io.BytesIO()
        args = as_tuple(example_inputs)
        traced: nn.Module = model
        if isinstance(example_inputs, dict):
            # Keyword inputs go in positionally through an adapter: the TorchScript exporter fills
            # unnamed parameters from the signature, which breaks decorated forwards (transformers).
            traced, args = _KwargsAdapter(model, in_names).eval(), tuple(example_inputs[n] for n in in_names)
        try:
            with export_mode(model), torch.no_grad(), no_attention_fastpath(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(traced, args, buf, dynamo=False, opset_version=opset, input_names=in_names,
                                  output_names=out_names, dynamic_axes=dyn, do_constant_folding=True,
                                  custom_opsets=custom_opsets or None)
        except Exception as e:
            raise ExportError(where, f"torch.onnx.export failed: {type(e).__name__}: {e}",
                              fix="make forward traceable (no data-dependent Python control flow)") from e
        raw = buf.getvalue()
        proto = onnx.load_from_string(raw)
        stats = qdq_postprocess(proto) if quantized else {}
        stats.update(fp8_postprocess(proto, where))   # float8 Q/DQ (opset 19) for FP8 layers' markers
        if quantized:  # sub-8-bit / per-group / non-uniform weights: codes of their own width
            stats.update(lowbit_postprocess(proto))
            from .half import fp16_storage

            # fp16-exact scales / outlier weights: half the bytes, same values
            narrowed = 0 if bf16 else fp16_storage(proto, min_size=256)
            if narrowed:
                stats["fp16_exact_constants"] = narrowed
            if not any(a.type in (5, 10) for n in proto.graph.node for a in n.attribute):  # no subgraphs
                from .names import compact_value_names

                stats["renamed_values"] = compact_value_names(proto)  # names are ~0.5% of an int8 file
        if bf16:
            from .half import bf16_storage

            stats["bf16_constants"] = bf16_storage(proto)
        try:
            onnx.checker.check_model(proto)
        except Exception as e:
            raise ExportError(where, f"the exported graph is invalid: {e}", fix="report this as a bug") from e
        data = proto.SerializeToString()
        # the file's opset: export/lowbit.py may have upgraded it to 21 for int4 weights
        final_opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset)
        figures: dict[str, Any] = {"format": "onnx", "opset": final_opset, "quantized": quantized,
                                   "size_bytes": len(data), "fp32_size_bytes": len(raw),
                                   "size_ratio": round(len(data) / len(raw), 4), **stats}
        if verify:
            batches = [example_inputs] + list(samples or [])
            statistic = "mean" if any(m.onnx_verify_mean for m in hints) else "max"
            figures.update(verify_onnx(model, data, batches, quantized, atol, where, statistic))
            if quantized and not figures["ort_int8_ops"] and "fp8_tensors" not in stats:  # fp8: float kernels
                figures["warning"] = "ONNX Runtime fused no int8 kernel: the model runs in float"
        write_file(path, data, where, ExportError)
    finally:
        user_model.train(was_training)
    return figures
