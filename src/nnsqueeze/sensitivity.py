"""Per-layer quantization sensitivity: quantize ONE layer at a time, measure the damage.

For each quantizable layer (Linear/Conv1d/Conv2d) and each candidate format, a deep copy of the
model gets the ``quantize`` step with ``targets: [layer]`` (everything else stays float; the float
formats of :data:`FLOAT_FORMATS` through the same step's FP8/MX/NVFP4 path) -- or, for
the half formats ``fp16``/``bf16``, that one layer converted exactly as the ``half`` step converts
it (half weights and compute, fp32 in and out; Embedding included) -- and is
measured: the metric drop on ``eval_data`` when a metric is given, else the SQNR (dB) of the
model's output against the fp32 output on the calibration data. Rows come back most sensitive
first; nothing is written::

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.sensitivity import sensitivity
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    >>> calib = [(torch.randn(32, 8), torch.randint(0, 3, (32,)))]
    >>> rows = sensitivity(model, calib, formats=("int8", "int4"))   # no metric: SQNR, ~6 dB per bit
    >>> [(r["layer"], r["format"], round(r["sqnr_db"])) for r in rows][:2]
    [('0', 'int4', 26), ('2', 'int4', 28)]
    >>> [(r["layer"], r["format"], r["sqnr_db"] > 40) for r in rows][2:]   # 47 and 51 dB with VNNI
    [('0', 'int8', True), ('2', 'int8', True)]

(On x86 CPUs without VNNI, int8 uses 7-bit weight codes, :mod:`nnsqueeze.isa`: about 3 dB less.)
    >>> rows = sensitivity(model, calib, eval_data=calib, metric="accuracy")
    >>> rows[0]["layer"], rows[0]["metric_drop"]
    ('0', 0.0)

``nnsqueeze sensitivity`` is the command-line front end; the ``mixed`` step measures it once to
allocate formats per layer (and through it ``mixed-int8`` keeps the most int8-sensitive layers in
float, and ``half`` with ``keep_fp32`` the most half-sensitive ones).
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .context import Context
from .data import as_batches, call_model, logits, split, take, to_device
from .errors import DataError, RecipeError
from .metrics import get_metric
from .quant.args import QuantArgs
from .targets import select

# Int candidate formats -> the weights' QuantArgs (activations: the quantize step's default uint8);
# quantize_weights() turns one into the quantize step's `weights` keys.
FORMATS: dict[str, QuantArgs] = {
    **{f"int{b}": QuantArgs(bits=b) for b in (8, 7, 6, 5, 4, 3, 2)},
    **{f"int{b}-mse": QuantArgs(bits=b, clip="mse") for b in (4, 3, 2)},
    "nf4": QuantArgs(bits=4, levels="nf4"), "pow2-4": QuantArgs(bits=4, levels="pow2"),
    "kmeans4": QuantArgs(bits=4, levels="kmeans"),
    "int4-g32": QuantArgs(bits=4, granularity="group(32)"), "int4-g128": QuantArgs(bits=4, granularity="group(128)"),
}

# Float candidate formats -> the quantize step's {weights, activations} (docs/formats.md). FP8 is
# weights AND activations in FP8 (per-channel weights; activations static per tensor, or dynamic),
# the counterpart of int8's W8A8; the block formats are weight-only (float activations).
FLOAT_FORMATS: dict[str, dict[str, Any]] = {
    "fp8-e4m3": {"weights": {"format": "fp8-e4m3"}, "activations": {"format": "fp8-e4m3"}},
    "fp8-e5m2": {"weights": {"format": "fp8-e5m2"}, "activations": {"format": "fp8-e5m2"}},
    "fp8-e4m3-dynamic": {"weights": {"format": "fp8-e4m3"}, "activations": {"format": "fp8-e4m3", "dynamic": True}},
    **{f: {"weights": {"format": f}} for f in ("mxfp8-e4m3", "mxfp8-e5m2", "mxfp6-e3m2", "mxfp6-e2m3", "mxfp4",
                                              "nvfp4")},
}

# Half formats -> the ``half`` step's dtype (weights AND compute of the one layer in that type).
HALF_FORMATS: dict[str, str] = {"fp16": "float16", "bf16": "bfloat16"}
ALL_FORMATS = [*FORMATS, *FLOAT_FORMATS, *HALF_FORMATS]



def format_args(name: str) -> QuantArgs | None:
    """A candidate format name as the weights' :class:`~nnsqueeze.quant.args.QuantArgs` (None: ``fp32``).

        >>> format_args("int4-mse").describe(), format_args("bf16").format, format_args("fp32")
        ('int4 channel sym mse-clip', 'bf16', None)
        >>> format_args("mxfp4").describe(), format_args("int4-g32").describe()
        ('mxfp4 block(32)', 'int4 group(32) sym')
    """
    if name == "fp32":
        return None
    if name in HALF_FORMATS:
        return QuantArgs(format="fp16" if HALF_FORMATS[name] == "float16" else "bf16")
    if name in FLOAT_FORMATS:
        return QuantArgs(format=FLOAT_FORMATS[name]["weights"]["format"])
    if name not in FORMATS:
        raise RecipeError("sensitivity.formats", f"unknown format {name!r}",
                          fix=f"use one of {', '.join(ALL_FORMATS)} or fp32")
    return FORMATS[name]


def quantize_weights(args: QuantArgs) -> dict[str, Any]:
    """The ``quantize`` step's ``weights`` keys for int weight ``args`` (only those off the defaults).

        >>> quantize_weights(FORMATS["int4-g32"]), quantize_weights(FORMATS["nf4"])
        ({'bits': 4, 'granularity': 'per-group', 'group_size': 32}, {'bits': 4, 'levels': 'nf4'})
    """
    if args.format != "int":
        raise ValueError(f"{args.describe()}: the quantize step's int weight keys take the int format only")
    w: dict[str, Any] = {"bits": args.bits}
    if args.granularity != "channel":
        w["granularity"] = f"per-{args.granularity}"
    if args.granularity == "group":
        w["group_size"] = args.group_size
    if not args.symmetric:
        w["symmetric"] = False
    if args.nonuniform:
        w["levels"] = args.levels
    if args.clip != "none":
        w["clip"] = args.clip
    return w


_quiet = logging.getLogger("nnsqueeze.sensitivity.trial")
_quiet.setLevel(logging.ERROR)
_quiet.propagate = False
_quiet.addHandler(logging.NullHandler())


def quantizable_layers(model: nn.Module, targets: list[str] | None = None,
                       ignore: list[str] | None = None) -> list[tuple[str, str]]:
    """(name, class name) of the Linear/Conv1d/Conv2d layers selected by ``targets``/``ignore``."""
    from .quant.modules import MODULE_MAP

    sel = select(model, list(targets or ["Linear", "Conv1d", "Conv2d"]), list(ignore or []), tuple(MODULE_MAP),
                 where="sensitivity.targets", strict=bool(targets))
    return [(n, type(m).__name__) for n, m in sel.layers]


def half_layers(model: nn.Module, targets: list[str] | None = None, ignore: list[str] | None = None,
                dtype: str = "float16") -> list[tuple[str, str]]:
    """(name, class name) of the layers the ``half`` step would convert to ``dtype``.

    Plain Linear/Conv1d/Conv2d/Embedding only (subclasses are left alone, as the step does), and no
    bf16 conv with string padding (the step skips those: its bf16 export needs numeric padding).
    """
    from .quant.half import HALF_MAP

    sel = select(model, list(targets or ["Linear", "Conv1d", "Conv2d", "Embedding"]), list(ignore or []),
                 tuple(HALF_MAP), where="sensitivity.targets", strict=bool(targets))
    return [(n, type(m).__name__) for n, m in sel.layers if type(m) in HALF_MAP
            and not (dtype == "bfloat16" and isinstance(getattr(m, "padding", 0), str))]


def half_copy(model: nn.Module, names: Iterable[str], dtype: str) -> nn.Module:
    """A deep copy of ``model`` with the layers ``names`` converted by the ``half`` step's own
    :func:`~nnsqueeze.quant.half.convert_half_` (``dtype``: 'float16' or 'bfloat16')."""
    from .quant.convert import convert, half_args

    m = copy.deepcopy(model)
    for n in names:
        convert(m.get_submodule(n), half_args(dtype))
    return m.eval()


def quantize_copy(model: nn.Module, calib_data: Iterable, *, targets: list[str] | None = None,
                  ignore: list[str] | None = None, weights: dict[str, Any] | None = None,
                  calibration: dict[str, Any] | None = None, device: Any = "cpu",
                  activations: dict[str, Any] | None = None) -> nn.Module:
    """A deep copy of ``model`` run through the ``quantize`` step (quietly, with a throwaway report)."""
    from .registry import STEPS

    Quantize = STEPS.get("quantize")  # by name: sensitivity sits below the steps that use it
    cfg: dict[str, Any] = {"targets": list(targets or []), "ignore": list(ignore or []),
                           "weights": dict(weights or {})}
    if activations is not None:
        cfg["activations"] = dict(activations)
    if calibration:
        cfg["calibration"] = dict(calibration)
    step = Quantize(Quantize.Config.model_validate(cfg))
    ctx = Context(calib_data=calib_data, progress=False, log=_quiet, device=torch.device(device))
    ctx.report.begin_step("quantize", {})
    return step.run(copy.deepcopy(model), ctx).eval()


@torch.no_grad()
def output_sqnr(reference: nn.Module, model: nn.Module, data: Iterable, device: Any = "cpu") -> float:
    """SQNR (dB) of ``model``'s output against ``reference``'s over ``data``; inf when identical,
    -inf when ``model`` outputs inf/NaN."""
    reference.eval()
    model.eval()
    sig = err = 0.0
    for batch in data:
        inputs, _ = split(batch)
        inputs = to_device(inputs, device)
        ref = logits(call_model(reference, inputs), strict=False).double()
        out = logits(call_model(model, inputs), strict=False).double()
        sig += float((ref ** 2).sum())
        err += float(((out - ref) ** 2).sum())
    if not math.isfinite(err):  # inf/NaN outputs (e.g. an fp16 overflow): the worst possible
        return -math.inf
    if err == 0.0:
        return math.inf
    if sig == 0.0:
        return -math.inf
    return 10.0 * math.log10(sig / err)


def resolve_reduce_range(weights: dict[str, Any]) -> dict[str, Any]:
    """Decide 'auto' reduced range once, so every trial uses the same grid and logs nothing."""
    w = dict(weights)
    if w.get("bits", 8) == 8 and w.get("reduce_range", "auto") == "auto":
        from .isa import weight_range

        w["reduce_range"] = weight_range(8, "auto").bits == 7
    return w


def sensitivity(
    model: nn.Module,
    calib_data: Iterable,
    eval_data: Iterable | None = None,
    metric: str | Callable | None = None,
    formats: Iterable[str] = ("int8",),
    targets: list[str] | None = None,
    ignore: list[str] | None = None,
    calibration: dict[str, Any] | None = None,
    reduce_range: bool | str = "auto",
    device: Any = "cpu",
) -> list[dict[str, Any]]:
    """Rows ``{layer, type, format, sqnr_db, metric, metric_drop}``, most sensitive first.

    ``formats`` are :data:`FORMATS` and :data:`FLOAT_FORMATS` names (the ``quantize`` step on that layer
    alone) and/or ``fp16``/``bf16`` (:data:`HALF_FORMATS`: the ``half`` step on that layer alone).

    ``metric_drop`` (baseline metric minus the metric with only that layer quantized) is given
    when ``eval_data`` and ``metric`` are, and then orders the rows; otherwise the output SQNR
    (lower is more sensitive) does. ``model`` is not modified.
    """
    calib = as_batches(calib_data, "calib_data", required=True, refuse_nan=True)
    if calib is None:
        raise DataError("calib_data", "sensitivity needs calibration data", fix="pass calib_data=...")
    formats = list(formats)
    for f in formats:
        if f not in FORMATS and f not in FLOAT_FORMATS and f not in HALF_FORMATS:
            raise RecipeError("sensitivity.formats", f"unknown format {f!r}", fix=f"one of {', '.join(ALL_FORMATS)}")
    if not formats:
        raise RecipeError("sensitivity.formats", "no format given", fix=f"one of {', '.join(ALL_FORMATS)}")
    eval_data = as_batches(eval_data, "eval_data", refuse_nan=True)
    metric_fn, _ = get_metric(metric if eval_data is not None else None)
    samples = (calibration or {}).get("samples", 512)
    sqnr_data = take(calib, samples)
    was_training = model.training
    ref = copy.deepcopy(model).eval()
    try:
        base_metric = float(metric_fn(ref, eval_data)) if metric_fn is not None else None
        rows = []
        # Which (layer, format) pairs apply: quantize's layer types for int formats, half's for fp16/bf16.
        per_fmt = {f: {n for n, _ in (half_layers(ref, targets, ignore, HALF_FORMATS[f]) if f in HALF_FORMATS
                                      else quantizable_layers(ref, targets, ignore))} for f in formats}
        for name, mod in ref.named_modules():
            fmts = [f for f in formats if name in per_fmt[f]]
            cls = type(mod).__name__
            for fmt in fmts:
                if fmt in HALF_FORMATS:
                    q = half_copy(ref, [name], HALF_FORMATS[fmt])
                elif fmt in FLOAT_FORMATS:
                    q = quantize_copy(ref, calib, targets=[name], calibration=calibration, device=device,
                                      **FLOAT_FORMATS[fmt])
                else:
                    weights = resolve_reduce_range({**quantize_weights(FORMATS[fmt]), "reduce_range": reduce_range})
                    q = quantize_copy(ref, calib, targets=[name], weights=weights, calibration=calibration,
                                      device=device)
                row: dict[str, Any] = {"layer": name, "type": cls, "format": fmt,
                                       "sqnr_db": output_sqnr(ref, q, sqnr_data, device)}
                if metric_fn is not None:
                    with torch.no_grad():
                        m = float(metric_fn(q, eval_data))
                    row["metric"] = m
                    row["metric_drop"] = base_metric - m
                rows.append(row)
    finally:
        model.train(was_training)
    if metric_fn is not None:
        rows.sort(key=lambda r: (-r["metric_drop"], r["sqnr_db"]))
    else:
        rows.sort(key=lambda r: r["sqnr_db"])
    return rows


def to_json_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with infinite SQNR written as the strings 'inf'/'-inf' (JSON has no infinity)."""
    out = []
    for r in rows:
        r = dict(r)
        v = r.get("sqnr_db")
        if isinstance(v, float) and math.isinf(v):
            r["sqnr_db"] = "inf" if v > 0 else "-inf"
        out.append(r)
    return out


def plot_png(rows: list[dict[str, Any]]) -> bytes:
    """A horizontal bar chart of the rows (metric drop if present, else output SQNR), as PNG bytes."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    use_drop = bool(rows) and "metric_drop" in rows[0]
    labels = [f"{r['layer']} ({r['format']})" for r in rows]
    vals = [r["metric_drop"] if use_drop else (r["sqnr_db"] if math.isfinite(r["sqnr_db"]) else 0.0)
            for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 0.35 * len(rows) + 1.5))
    ax.barh(labels, vals, color="tab:red" if use_drop else "tab:blue")
    ax.set_xlabel("metric drop when only this layer is quantized (higher: more sensitive)" if use_drop
                  else "output SQNR (dB) when only this layer is quantized (lower: more sensitive)", fontsize=8)
    ax.invert_yaxis()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()
