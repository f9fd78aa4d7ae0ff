"""Plots of an artifact, for analysis: quantization grids, activation ranges, per-layer error.

Reads only the artifact directory (``nnsqueeze.json``, ``model.safetensors`` and ``report.json``),
so no model code is needed and nothing of the user's is executed. Writes PNG files into
``DIR/plots/`` (atomically)::

    nnsqueeze plot nnsqueeze-demo
    # -> weights.png      histogram of each quantized layer's weight codes on its grid, clipping bounds
    #                     dashed: static int2..int8 (packed 2-4-bit codes included), pow2 / nf4 / kmeans
    #                     level indices (drawn at their level values), dynamic int8, weight-only and
    #                     packed GPTQ/AWQ group-wise codes, int8 embeddings
    #    activations.png  the calibrated clipping range of each quantized input, in its own format
    #                     (uint8 by default; int16, signed or low-bit per the layer's act_scheme)
    #    layers.png       per-layer weight SQNR (dB) and sparsity from the report

The codes come from the library's own classes: for each quantized layer named in the manifest's
step records, a stand-in layer of the recorded kind and scheme is built, the stored tensors are
unpacked by its ``unpack_state`` (the path ``nsq.load`` takes) and its ``weight_codes()`` gives
the codes, so the plots read the artifact exactly as loading does.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .artifact import PLOTS, PLOTS_INDEX, plot_names, read_manifest, read_weights, write_dir
from .errors import ArtifactError
from .limits import MAX_PLOT_ROWS, quote


@dataclass
class WeightHist:
    """What the weight panel of one layer draws.

    ``counts[i]`` codes equal ``qmin + i`` (``i`` in ``0 .. qmax - qmin``); ``levels`` (non-uniform
    grids) gives the normalized weight value of each code index, where the bars are drawn;
    ``clip`` is the clipping range in the x units of the panel (codes, or level values).
    """

    kind: str
    counts: torch.Tensor
    qmin: int
    qmax: int
    clip: tuple[float, float]
    levels: torch.Tensor | None = None

    @property
    def positions(self) -> torch.Tensor:
        return self.levels if self.levels is not None else torch.arange(self.qmin, self.qmax + 1).float()


def _walk_records(rec: Any) -> Iterator[dict]:
    """Every dict in a step record (records nest: ``mixed`` keeps the quantize record inside)."""
    if isinstance(rec, dict):
        yield rec
        for v in rec.values():
            yield from _walk_records(v)
    elif isinstance(rec, list):
        for v in rec:
            yield from _walk_records(v)


def _layer_kinds(manifest: dict) -> dict[str, tuple[str, dict]]:
    """Layer -> (kind, record info) from the manifest's step records; a later step wins."""
    out: dict[str, tuple[str, dict]] = {}
    for step in manifest.get("steps", []):
        for d in _walk_records(step.get("record")):
            layers = d.get("layers")
            if isinstance(layers, dict):
                for name, info in layers.items():
                    if not isinstance(info, dict):
                        continue
                    if "type" in info and "weight_bits" in info:
                        out[name] = ("static", info)
                    elif "signed" in info and "bits" in info:
                        out[name] = ("dynamic", info)
                    elif {"bits", "group_size", "symmetric"} <= set(info):
                        out[name] = ("weight-only", info)
            elif isinstance(layers, list) and d.get("pack") and {"bits", "group_size", "symmetric"} <= set(d):
                for name in layers:  # gptq / rtn / awq with pack: true
                    out[name] = ("packed", {k: d[k] for k in ("bits", "group_size", "symmetric")})
            for name in d.get("embeddings", []) if isinstance(d.get("embeddings"), list) else []:
                if isinstance(name, str):
                    out[name] = ("embedding", {})
            rev = d.get("reverted")  # the latency guard's revert record: these layers are float again
            if isinstance(rev, dict) and isinstance(rev.get("layers"), list):
                for name in rev["layers"]:
                    if isinstance(name, str):
                        out.pop(name, None)
    return out


def _packed_len(q: torch.Tensor, rows: int) -> int:
    """Codes held by ``q`` (flattened or last axis: two codes per byte): 2 per byte, or one less
    when the last nibble is padding. The count must split into ``rows`` equal rows; when both
    counts do (``rows == 1``), a zero last nibble everywhere is read as padding."""
    b = q.shape[-1]
    fits = [n for n in (2 * b, 2 * b - 1) if n > 0 and (n * (q.numel() // b)) % rows == 0]
    if len(fits) == 1:
        return fits[0]
    return 2 * b - 1 if bool((q[..., -1] >> 4 == 0).all()) else 2 * b


def _stand_in_weight(rows: int, cols: int) -> nn.Linear:
    lin = nn.utils.skip_init(nn.Linear, cols, rows)
    with torch.no_grad():  # deterministic placeholder values, replaced by the stored ones
        lin.weight.copy_(torch.linspace(-1, 1, rows * cols).reshape(rows, cols))
        lin.bias.zero_()
    return lin


def _layer_state(sd: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The stored weight tensors of ``name`` (weight and its qparams), keys without the prefix."""
    p = f"{name}."
    return {k[len(p):]: v.clone() for k, v in sd.items() if k.startswith(p) and k[len(p):].startswith("weight")}


def _load(mod: nn.Module, st: dict[str, torch.Tensor]) -> None:
    own = dict(mod.named_parameters(recurse=False)) | dict(mod.named_buffers(recurse=False))
    with torch.no_grad():
        for k, v in st.items():
            if k in own and own[k].shape == v.shape:
                own[k].copy_(v.to(own[k].dtype))
            elif k in own:
                raise ArtifactError(f"model.safetensors: {k}", f"shape {tuple(v.shape)} does not match the "
                                    f"recorded layer ({tuple(own[k].shape)})", fix="re-create the artifact")


def weight_histogram(kind: str, info: dict, st: dict[str, torch.Tensor]) -> WeightHist | None:
    """Codes of one stored layer (``st``: its ``weight*`` tensors) through a stand-in module of the
    recorded kind; None when the layer is stored in float (e.g. a BatchNorm kept attached for QAT)."""
    from .quant.act_scheme import ActScheme
    from .quant.args import QuantArgs
    from .quant.convert import DYNAMIC_UINT8, convert, weight_only_args
    from .quant.scheme import WeightScheme

    q = st.get("weight")
    if q is None or q.is_floating_point():
        return None
    if kind == "static":
        sch = WeightScheme.from_dict(info.get("scheme"), bits=int(info["weight_bits"]))
        rows = st["weight_scale_"].numel()
        if info.get("weight_shape"):  # per-group (a short last group makes rows * row length != numel)
            shape = info["weight_shape"]
            mod = _stand_in_weight(shape[0], math.prod(shape[1:]))
        else:
            n = _packed_len(q.reshape(-1), rows) if (sch.bits <= 4 and q.dim() == 1) else q.numel()
            mod = _stand_in_weight(rows, n // rows)
        convert(mod, sch.args(), ActScheme.from_dict(info.get("act_scheme")).args(None))
        mod.unpack_state(st, "")
        _load(mod, st)
        codes, a = mod.weight_codes().to(torch.int64).reshape(-1), mod.qargs
        if a.nonuniform:  # codes are table indices 0..level_count-1
            lv = mod.weight_levels_.detach().float()
            return WeightHist(kind, torch.bincount(codes, minlength=a.level_count), a.qmin, a.qmax,
                              (float(lv.min()), float(lv.max())), lv)
        return WeightHist(kind, torch.bincount(codes - a.qmin, minlength=a.qmax - a.qmin + 1), a.qmin, a.qmax,
                          (a.qmin, a.qmax))
    if kind == "dynamic":
        mod = _stand_in_weight(*q.shape)
        convert(mod, QuantArgs(bits=int(info["bits"]), symmetric=bool(info["signed"])), DYNAMIC_UINT8)
        mod.unpack_state(st, "")
        _load(mod, st)
        codes, a = mod.weight_codes().to(torch.int64).reshape(-1), mod.qargs
        qmin, qmax = a.qmin, a.qmax
        return WeightHist(kind, torch.bincount(codes - qmin, minlength=qmax - qmin + 1), qmin, qmax, (qmin, qmax))
    if kind in ("weight-only", "packed"):
        bits = int(info["bits"])
        k = _packed_len(q, q.shape[0]) if bits == 4 else q.shape[1]
        mod = _stand_in_weight(q.shape[0], k)
        gs = None if info["group_size"] is None else int(info["group_size"])  # None: one group per row
        args = weight_only_args(bits, gs, bool(info["symmetric"]), bool(info.get("full_range", False)))
        convert(mod, args)
        if kind == "packed":
            from .llm import packed  # noqa: F401  (registers the packed form with convert)

            convert(mod, args)  # the stored weight IS the packed codes; its unpack_state restores the zero points
        mod.unpack_state(st, "")
        _load(mod, st)
        # stored unsigned (MatMulNBits' layout) whatever the grid: codes 0..2^bits-1, zero point
        # 2^(bits-1) for a symmetric grid, which clips at codes 1..2^bits-1
        a = mod.qargs
        codes, qmax = mod.weight_codes().to(torch.int64).reshape(-1), (1 << a.bits) - 1
        lo = 1 if a.symmetric else 0
        return WeightHist(kind, torch.bincount(codes, minlength=qmax + 1), 0, qmax, (lo, qmax))
    if kind == "embedding":
        emb = nn.utils.skip_init(nn.Embedding, *q.shape)
        with torch.no_grad():
            emb.weight.copy_(torch.linspace(-1, 1, q.numel()).reshape(q.shape))
        convert(emb, QuantArgs())  # int8 per row, symmetric
        emb.unpack_state(st, "")
        _load(emb, st)
        codes, a = emb.weight_codes().to(torch.int64).reshape(-1), emb.qargs
        return WeightHist(kind, torch.bincount(codes - a.qmin, minlength=a.qmax - a.qmin + 1), a.qmin, a.qmax,
                          (-a.qmax, a.qmax))  # symmetric: the scale maps absmax to qmax
    return None


def weight_histograms(path: str | Path) -> dict[str, WeightHist]:
    """Layer -> :class:`WeightHist` for every quantized layer stored in the artifact at ``path``."""
    path = Path(path)
    manifest = read_manifest(path)
    sd = read_weights(path)
    out = {}
    with _crafted(f"{path}: manifest records"):
        kinds = _layer_kinds(manifest)
    for name, (kind, info) in kinds.items():
        with _crafted(f"{path}: layer {quote(name, 80)}"):
            h = weight_histogram(kind, info, _layer_state(sd, name))
        if h is not None:
            out[name] = h
    return out


@contextmanager
def _crafted(where: str) -> Iterator[None]:
    """A record or tensor the stand-in layers trip over is a bad artifact, never a traceback."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError, OverflowError) as e:
        raise ArtifactError(where, f"cannot read the recorded layer: {type(e).__name__}: {quote(str(e))}",
                            fix="re-create the artifact") from None


def _act_schemes(manifest: dict) -> dict[str, Any]:
    """Layer -> its input's QuantArgs (from the quantize-like records' ``act_scheme``; absent: uint8)."""
    from .quant.act_scheme import ActScheme

    return {n: ActScheme.from_dict(info.get("act_scheme")).args(None)
            for n, (kind, info) in _layer_kinds(manifest).items() if kind == "static"}


def _float_act_formats(manifest: dict) -> dict[str, str]:
    """Layer -> the float format of its input (FP8 ``quantize`` records: ``activations: {format: ...}``)."""
    out: dict[str, str] = {}
    for step in manifest.get("steps", []):
        for d in _walk_records(step.get("record")):
            layers = d.get("layers")
            if not isinstance(layers, dict):
                continue
            for name, info in layers.items():
                acts = info.get("activations") if isinstance(info, dict) else None
                if isinstance(acts, dict) and isinstance(acts.get("format"), str) and acts["format"] != "int":
                    out[name] = acts["format"]
    return out


def _act_ranges(sd: dict[str, torch.Tensor], schemes: dict[str, Any] | None = None,
                floats: dict[str, str] | None = None) -> dict[str, tuple[float, float]]:
    """Layer -> float clipping range of its input quantizer: ``[(qmin - zp) * s, (qmax - zp) * s]``
    with the layer's code range (``schemes``: layer -> its input's QuantArgs; absent: uint8 0..255), or
    ``[-max * s, max * s]`` for a float format (``floats``: layer -> format, e.g. fp8-e4m3: max 448)."""
    from .ops.fp8 import get_format

    out = {}
    for key, s in sd.items():
        if key.endswith(".input_scale_") and s.numel() == 1:
            name = key[: -len(".input_scale_")]
            if name in (floats or {}):
                top = get_format(floats[name]).max * float(s)
                out[name] = (-top, top)
                continue
            sch = (schemes or {}).get(name)
            qmin, qmax = (sch.qmin, sch.qmax) if sch is not None else (0, 255)
            zp = sd.get(key.replace("input_scale_", "input_zero_point_"))
            z = float(zp) if zp is not None else 0.0
            out[name] = ((qmin - z) * float(s), (qmax - z) * float(s))
    return out


_KIND_TEXT = {"static": "static", "dynamic": "dynamic", "weight-only": "weight-only", "packed": "packed",
              "embedding": "embedding"}


def plot_artifact(path: str | Path) -> list[Path]:
    """Draw the artifact's plots into ``path/plots``; returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import Report

    path = Path(path)
    manifest = read_manifest(path)
    sd = read_weights(path)
    layers = Report.read(path / "report.json").get("layers", {})
    figs: dict[str, bytes] = {}

    def png(fig) -> bytes:
        import io

        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        return buf.getvalue()

    hists = weight_histograms(path)
    with _crafted(f"{path}: activation records"):
        schemes = _act_schemes(manifest)
        floats = _float_act_formats(manifest)
        acts = _act_ranges(sd, schemes, floats)
    if len(hists) + len(acts) + len(layers) > MAX_PLOT_ROWS:  # figure size grows with the rows
        raise ArtifactError(str(path), f"{len(hists) + len(acts) + len(layers):,} layers to plot, over the "
                            f"limit of {MAX_PLOT_ROWS:,}", fix="plot an artifact of a smaller model")
    if hists:
        n = len(hists)
        cols = min(3, n)
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
        for ax, (name, h) in zip(axes.flat, hists.items()):
            pos, counts = h.positions.numpy(), h.counts.numpy()
            if h.levels is not None:  # non-uniform grid: one bar per level, at its value
                width = 0.6 * float((h.levels[1:] - h.levels[:-1]).min()) if h.levels.numel() > 1 else 0.05
                for lv in pos:
                    ax.axvline(lv, color="0.85", lw=0.5, zorder=0)
                xlabel = "weight / scale: bars at the levels (the grid); dashed: clipping bounds"
            else:
                width = 0.9
                xlabel = "weight code (quantization steps); dashed: clipping bounds"
            ax.bar(pos, counts, width=width, color="tab:blue", log=bool(counts.max() > 0))
            for b in h.clip:
                ax.axvline(b, color="tab:red", lw=1, ls="--")
            scheme = layers.get(name, {}).get("scheme", "")
            ax.set_title(f"{name} ({_KIND_TEXT[h.kind]}{', ' + scheme if scheme else ''})", fontsize=8)
            ax.set_xlabel(xlabel, fontsize=7)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        figs["weights.png"] = png(fig)
    if acts:
        fig, ax = plt.subplots(figsize=(6, 0.4 * len(acts) + 1.2))
        names = list(acts)
        lo = [acts[k][0] for k in names]
        hi = [acts[k][1] for k in names]
        labels = [f"{k} ({floats[k] if k in floats else _act_format(schemes.get(k))})" for k in names]
        ax.barh(labels, [h - low for low, h in zip(lo, hi)], left=lo, color="tab:green")
        ax.axvline(0, color="k", lw=0.5)
        # two lines: on one, the label is wider than the figure and was cut off at both ends
        ax.set_xlabel("calibrated input clipping range (float):\ncodes qmin..qmax of its format")
        ax.invert_yaxis()
        figs["activations.png"] = png(fig)
    sqnr = {k: v["weight_sqnr_db"] for k, v in layers.items() if isinstance(v.get("weight_sqnr_db"), (int, float))}
    sparsity = {k: v["sparsity"] for k, v in layers.items() if isinstance(v.get("sparsity"), (int, float))}
    if sqnr or sparsity:
        panels = [(d, t) for d, t in ((sqnr, "weight SQNR (dB), higher is better"),
                                      (sparsity, "sparsity (fraction of zero weights)")) if d]
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 0.35 * len(layers) + 1.5), squeeze=False)
        for ax, (d, title) in zip(axes.flat, panels):
            ax.barh(list(d), list(d.values()), color="tab:orange")
            ax.set_title(title, fontsize=9)
            ax.invert_yaxis()
        figs["layers.png"] = png(fig)
    if not figs:
        raise ArtifactError(str(path), "nothing to plot: no quantized layers, calibrated inputs or per-layer figures",
                            fix="plot an artifact made by a recipe with a quantize or prune step")
    # plots.json indexes the folder and marks it as ours, so a re-run replaces the plots it lists
    # (and only those: any other file put in plots/ is kept); a plots/ without it is refused.
    old = plot_names(path / PLOTS)
    write_dir(path / PLOTS, {**figs, PLOTS_INDEX: json.dumps({"plots": sorted(figs)})}, marker=PLOTS_INDEX,
              overwrite=old is not None, owned=old or ())
    return [path / "plots" / k for k in sorted(figs)]


def _act_format(sch: Any) -> str:
    if sch is None:
        return "uint8"
    return f"{'int' if sch.signed_codes else 'uint'}{sch.bits} {sch.qmin}..{sch.qmax}"
