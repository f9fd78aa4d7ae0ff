"""Plots of an artifact, for analysis: quantization grids, activation ranges, per-layer error.

Reads only the artifact directory (``model.safetensors`` and ``report.json``), so no model code is
needed and nothing is executed. Writes PNG files into ``DIR/plots/`` (atomically)::

    nnsqueeze plot nnsqueeze-demo
    # -> weights.png      histogram of each int8 layer's weight codes on its grid, clipping bounds marked
    #    activations.png  the calibrated activation range (clipping range) of each quantized input
    #    layers.png       per-layer weight SQNR (dB) and sparsity from the report
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .artifact import WEIGHTS, read_manifest, write_dir
from .errors import ArtifactError


def _weight_codes(sd: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, int]]:
    """Layer -> (int codes, clipping bound) for layers stored as int8 codes with a weight scale."""
    out = {}
    for key, t in sd.items():
        if key.endswith(".weight") and t.dtype == torch.int8 and f"{key[:-7]}.weight_scale_" in sd:
            bound = int(t.abs().max()) if t.numel() else 0
            bound = 63 if bound <= 63 else 127  # 7-bit (reduced range) or 8-bit symmetric grid
            out[key[:-7]] = (t.flatten().to(torch.int32), bound)
    return out


def _act_ranges(sd: dict[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    """Layer -> float clipping range of its uint8 input quantizer: [(0 - zp) * s, (255 - zp) * s]."""
    out = {}
    for key, s in sd.items():
        if key.endswith(".input_scale_") and s.numel() == 1:
            zp = sd.get(key.replace("input_scale_", "input_zero_point_"))
            z = float(zp) if zp is not None else 0.0
            out[key[: -len(".input_scale_")]] = ((0 - z) * float(s), (255 - z) * float(s))
    return out


def plot_artifact(path: str | Path) -> list[Path]:
    """Draw the artifact's plots into ``path/plots``; returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from safetensors.torch import load

    path = Path(path)
    read_manifest(path)
    try:
        sd = load((path / WEIGHTS).read_bytes())
        layers = json.loads((path / "report.json").read_text()).get("layers", {})
    except FileNotFoundError as e:
        raise ArtifactError(str(path), f"missing {Path(e.filename).name}", fix="re-create the artifact") from None
    figs: dict[str, bytes] = {}

    def png(fig) -> bytes:
        import io

        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        return buf.getvalue()

    codes = _weight_codes(sd)
    if codes:
        n = len(codes)
        cols = min(3, n)
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
        for ax, (name, (c, bound)) in zip(axes.flat, codes.items()):
            ax.hist(c.numpy(), bins=range(-bound - 1, bound + 2), color="tab:blue", log=True)
            for b in (-bound, bound):
                ax.axvline(b, color="tab:red", lw=1, ls="--")
            zeros = float((c == 0).float().mean())
            ax.set_title(f"{name} ({zeros:.0%} zero codes)", fontsize=9)
            ax.set_xlabel("weight code (quantization steps); dashed: clipping bounds", fontsize=8)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        figs["weights.png"] = png(fig)
    acts = _act_ranges(sd)
    if acts:
        fig, ax = plt.subplots(figsize=(6, 0.4 * len(acts) + 1.2))
        names = list(acts)
        lo = [acts[k][0] for k in names]
        hi = [acts[k][1] for k in names]
        ax.barh(names, [h - l for l, h in zip(lo, hi)], left=lo, color="tab:green")
        ax.axvline(0, color="k", lw=0.5)
        ax.set_xlabel("calibrated input range (uint8 clipping range)")
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
        raise ArtifactError(str(path), "nothing to plot: no int8 layers, calibrated inputs or per-layer figures",
                            fix="plot an artifact made by a recipe with a quantize or prune step")
    # plots.json indexes the folder and marks it as ours, so a re-run may replace it.
    write_dir(path / "plots", {**figs, "plots.json": json.dumps({"plots": sorted(figs)})}, marker="plots.json")
    return [path / "plots" / k for k in sorted(figs)]
