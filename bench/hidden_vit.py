"""torchvision's vit_b_16, swin_t, swin_v2_t (random init, seed 0, 224x224): `structured-prune` `hidden` (issue 14).

Rows: the hidden size (residual stream) alone, heads + MLP neurons alone (``ratio``, as in
``bench/zoo_vs_torch_pruning.py``; Swin with ``norms: prune`` as there), and both; l2 importance. Per row: the
kept hidden width (Swin: per stage), MACs and parameters left (fractions of the baseline). MACs are nnsqueeze's
count (``structured/macs.py``: module hooks, attention layers counted whole: projections, scores and weighted
values), not torch's ``FlopCounterMode``: in eval mode without gradients ``nn.MultiheadAttention`` takes its
fused fast path, which ``FlopCounterMode`` counts as 0 MACs, while the pruned ``PrunedMultiheadAttention`` is
counted in full (the two counts agree on ``PrunedMultiheadAttention``), so a ratio from it would be wrong.
Torch-Pruning 1.6.1 at a 50% ratio prunes vit_b_16's hidden size, heads and MLP together to 0.2618 of the MACs
(``tests/structured/test_tv_transformers.py``), comparable to the ``ratio 0.5 + hidden 0.5`` row.
``--latency`` also exports each model to ONNX and times it in ONNX Runtime (batch 1, ``--threads``, interleaved
blocks, the gain being the median of per-block baseline/pruned ratios; see ``zoo_vs_torch_pruning.session``)::

    python bench/hidden_vit.py [--model swin_t]   # MACs / params only (deterministic)
    python bench/hidden_vit.py --model vit_b_16 --latency --threads 1 --blocks 5

Random init: the figures are sizes, not accuracy (the LayerNorms normalize over the kept channels: distill
after pruning, see docs/structured-pruning.md "Hidden size").
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo_vs_torch_pruning import isa, latency_ms, params, session  # noqa: E402

from nnsqueeze.context import Context  # noqa: E402
from nnsqueeze.env import cpu_model  # noqa: E402
from nnsqueeze.export.onnx import export_onnx  # noqa: E402
from nnsqueeze.structured.macs import count  # noqa: E402
from nnsqueeze.steps.channel_prune import StructuredPrune  # noqa: E402
from nnsqueeze.zoo.tvision import import_torchvision  # noqa: E402

ROWS = {"hidden 0.25": {"hidden": 0.25}, "hidden 0.5": {"hidden": 0.5}, "ratio 0.5": {"ratio": 0.5},
        "ratio 0.5 + hidden 0.25": {"ratio": 0.5, "hidden": 0.25},
        "ratio 0.5 + hidden 0.5": {"ratio": 0.5, "hidden": 0.5}}


def macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    return count(model, x).total_macs


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return import_torchvision().models.get_model(name, weights=None).eval()


def prune(name: str, cfg: dict, x: torch.Tensor) -> torch.nn.Module:
    cfg = cfg | ({"norms": "prune"} if name.startswith("swin") else {})
    ctx = Context(example_inputs=x, progress=False)
    ctx.report.begin_step("structured-prune", cfg)
    return StructuredPrune(StructuredPrune.Config(importance="l2", **cfg)).run(build(name), ctx).eval()


def widths(m: torch.nn.Module) -> str:
    """The stream width(s): ViT's ``hidden_dim``; Swin: each stage's first block's ``qkv`` input."""
    if hasattr(m, "hidden_dim"):
        return str(m.hidden_dim)
    return "/".join(str(stage[0].attn.qkv.in_features) for stage in m.features[1::2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="vit_b_16", choices=["vit_b_16", "swin_t", "swin_v2_t"])
    ap.add_argument("--latency", action="store_true", help="also time the ONNX models in ONNX Runtime")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--only", nargs="*", choices=list(ROWS), help="rows to measure (default: all)")
    a = ap.parse_args()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    base = build(a.model)
    m0, p0 = macs(base, x), params(base)
    models = {"baseline": base} | {name: prune(a.model, ROWS[name], x) for name in (a.only or list(ROWS))}
    print(f"{a.model}, random init, 224x224, batch 1; {datetime.date.today()}; {cpu_model()} ({isa()}); "
          f"baseline {m0 / 1e9:.2f} GMACs, {p0 / 1e6:.2f} M params")
    lat: dict[str, list[float]] = {}
    if a.latency:
        with tempfile.TemporaryDirectory() as tmp:
            sessions = {}
            for name, m in models.items():
                path = Path(tmp) / f"{len(sessions)}.onnx"
                export_onnx(m, path, x)
                sessions[name] = session(path, a.threads)
            feed = {sessions["baseline"].get_inputs()[0].name: x.numpy()}
            for _ in range(a.blocks):
                for name, sess in sessions.items():
                    lat.setdefault(name, []).append(latency_ms(sess, feed, 10))
    print("| config | hidden | MACs left | params left |" + (f" ORT ms ({a.threads} thr) | gain |" if lat else ""))
    print("|---|---|---|---|" + ("---|---|" if lat else ""))
    for name, m in models.items():
        row = f"| {name} | {widths(m)} | {macs(m, x) / m0:.4f} | {params(m) / p0:.4f} |"
        if lat:
            gain = statistics.median(b / p for b, p in zip(lat["baseline"], lat[name]))
            row += f" {statistics.median(lat[name]):.1f} | {gain:.2f}x |"
        print(row)


if __name__ == "__main__":
    main()
