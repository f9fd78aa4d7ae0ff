"""Structured pruning, nnsqueeze vs Torch-Pruning, side by side in one run on the MNIST-1D demo CNN.

Both prune the pretrained demo CNN at a 50% channel ratio with L2 group magnitude (the final
classifier's outputs kept), then fine-tune with the *same* loop and budget (``mnist1d.train``:
AdamW + one-cycle, 1500 steps, lr 3e-3 (the demo's training lr), seed 0). Reported: test accuracy (torch,
and ONNX Runtime for the final models), MACs and parameters, and ONNX Runtime latency measured in interleaved
blocks (median of block medians; the gain is the median of per-block baseline/pruned ratios, so
load from other processes on the machine cancels out)::

    pip install torch-pruning==1.6.1        # the peer, for this benchmark only
    python bench/structured_vs_torch_pruning.py [--steps 1500] [--criteria l2,fpgm] [--blocks 7] [--iterative]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import statistics
import tempfile
from pathlib import Path

import torch
from torch import nn

from nnsqueeze.context import Context
from nnsqueeze.export.onnx import export_onnx
from nnsqueeze.export.ort import OrtModule, ort_latency_ms
from nnsqueeze.steps.channel_prune import StructuredPrune
from nnsqueeze.structured.macs import count
from nnsqueeze.zoo import mnist1d


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def prune_nnsqueeze(model: nn.Module, x: torch.Tensor, ratio: float, importance: str, data) -> nn.Module:
    ctx = Context(example_inputs=x, train_data=data["train"], calib_data=data["calib"], progress=False)
    ctx.report.begin_step("structured-prune", {})
    return StructuredPrune(StructuredPrune.Config(ratio=ratio, importance=importance)).run(model, ctx)


def prune_torch_pruning(model: nn.Module, x: torch.Tensor, ratio: float) -> nn.Module:
    import torch_pruning as tp

    imp = tp.importance.GroupMagnitudeImportance(p=2)
    pruner = tp.pruner.MetaPruner(model, x, importance=imp, pruning_ratio=ratio,
                                  ignored_layers=[model.classifier[2]])
    pruner.step()
    return model


def ort_accuracy(path: Path, batches) -> float:
    m = OrtModule(path, threads=1)
    right = total = 0
    for xb, yb in batches:
        out = torch.as_tensor(m(xb))
        right += int((out.argmax(1) == yb).sum())
        total += len(yb)
    return right / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--criteria", default="l2", help="nnsqueeze importance criteria, comma-separated")
    ap.add_argument("--blocks", type=int, default=7, help="interleaved latency blocks")
    ap.add_argument("--batch", type=int, default=256, help="latency batch size")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iterative", action="store_true", help="add nnsqueeze l2 in two prune -> fine-tune rounds")
    args = ap.parse_args()
    torch.set_num_threads(2)
    data = mnist1d.load_data()
    base = mnist1d.pretrained()
    x1 = data["calib"][0][0][:2]
    models = {"baseline": base}
    for crit in args.criteria.split(","):
        models[f"nnsqueeze {crit}"] = prune_nnsqueeze(copy.deepcopy(base), x1, args.ratio, crit, data)
    try:
        models["torch-pruning l2"] = prune_torch_pruning(copy.deepcopy(base), x1, args.ratio)
    except ImportError:
        print("torch-pruning is not installed: pip install torch-pruning==1.6.1 (peer column skipped)")
    rows = {}
    for name, m in models.items():
        c = count(m, x1)
        rows[name] = {"acc_pruned": mnist1d.evaluate(m, data["test"]), "macs": c.total_macs, "params": c.total_params}
        if name != "baseline":
            mnist1d.train(m, data, steps=args.steps, lr=args.lr, seed=0)
        rows[name]["acc"] = mnist1d.evaluate(m, data["test"])
    if args.iterative:
        # Two prune -> fine-tune rounds with the same total budget: 30% of the channels, 1/3 of the
        # steps, then 29% of what is left (exactly half of each width here), 2/3 of the steps.
        name, m = "nnsqueeze l2 iterative", copy.deepcopy(base)
        prune_nnsqueeze(m, x1, 0.3, "l2", data)
        mnist1d.train(m, data, steps=args.steps // 3, lr=args.lr, seed=0)
        prune_nnsqueeze(m, x1, 0.29, "l2", data)
        c = count(m, x1)
        rows[name] = {"acc_pruned": mnist1d.evaluate(m, data["test"]), "macs": c.total_macs, "params": c.total_params}
        mnist1d.train(m, data, steps=args.steps - args.steps // 3, lr=args.lr, seed=1)
        rows[name]["acc"] = mnist1d.evaluate(m, data["test"])
        models[name] = m
    xb = torch.cat([b[0] for b in data["test"]])[: args.batch]
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for i, (name, m) in enumerate(models.items()):
            paths[name] = Path(tmp) / f"m{i}.onnx"
            export_onnx(m.eval(), paths[name], x1, samples=[b[0] for b in data["test"][:2]])
            rows[name]["acc_ort"] = ort_accuracy(paths[name], data["test"])
        lat = {n: [] for n in models}
        for _ in range(args.blocks):
            for name in models:
                lat[name].append(ort_latency_ms(paths[name], xb, threads=args.threads, warmup=5, runs=30))
    for name in models:
        rows[name]["lat"] = statistics.median(lat[name])
        rows[name]["gain"] = statistics.median(b / p for b, p in zip(lat["baseline"], lat[name]))
    b = rows["baseline"]
    print(f"\n{datetime.date.today()} | {cpu_name()} | torch {torch.__version__} | ORT batch {args.batch}, "
          f"{args.threads} thread(s), {args.blocks} interleaved blocks | ratio {args.ratio}, "
          f"fine-tune {args.steps} steps lr {args.lr}\n")
    print("| model | acc. after prune | acc. after fine-tune (torch / ORT) | MACs | params | ORT latency ms "
          "| latency gain |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        mac = f"{r['macs']:,} ({b['macs'] / r['macs']:.2f}x fewer)" if name != "baseline" else f"{r['macs']:,}"
        par = f"{r['params']:,} ({b['params'] / r['params']:.2f}x fewer)" if name != "baseline" else f"{r['params']:,}"
        pre = "-" if name == "baseline" else f"{100 * r['acc_pruned']:.1f}%"
        pre += " (round 2)" if "iterative" in name else ""
        print(f"| {name} | {pre} | {100 * r['acc']:.1f}% / {100 * r['acc_ort']:.1f}% | {mac} | {par} | "
              f"{r['lat']:.3f} | {r['gain']:.2f}x |")


if __name__ == "__main__":
    main()
