"""Structured pruning of a residual 1-D network with depthwise and grouped convolutions (MNIST-1D).

The network (defined here, trained from scratch on ``nnsqueeze.zoo.mnist1d`` data): a stem conv,
then per stage an inverted-residual block: 1x1 expand -> depthwise 3 -> grouped 3 (groups=4) ->
1x1 project, added to the stream; a strided conv between stages; flatten -> Linear. nnsqueeze
prunes it at ``--ratio`` of the channels (l2): the residual stream, depthwise channels, the
grouped conv (the same count from every group), BatchNorms and the flatten into the Linear all
shrink together. Fine-tune, export to ONNX, check ORT against torch, time both in ORT
(interleaved blocks, medians)::

    python bench/structured_resnet_mnist1d.py                 # ~5 min on a shared 2-core machine
    python bench/structured_resnet_mnist1d.py --ratio 0.5 --train-steps 2000 --steps 1000 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from nnsqueeze.context import Context
from nnsqueeze.export.onnx import export_onnx
from nnsqueeze.export.ort import ort_latency_ms
from nnsqueeze.steps.channel_prune import StructuredPrune
from nnsqueeze.structured.macs import count
from nnsqueeze.zoo import mnist1d

from structured_vs_torch_pruning import cpu_name, ort_accuracy


class Block(nn.Module):
    def __init__(self, c: int, groups: int = 4):
        super().__init__()
        e = 2 * c
        self.expand = nn.Sequential(nn.Conv1d(c, e, 1), nn.BatchNorm1d(e), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv1d(e, e, 3, padding=1, groups=e), nn.BatchNorm1d(e), nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv1d(e, e, 3, padding=1, groups=groups), nn.BatchNorm1d(e), nn.ReLU())
        self.project = nn.Sequential(nn.Conv1d(e, c, 1), nn.BatchNorm1d(c))

    def forward(self, x):
        return torch.relu(x + self.project(self.grouped(self.dw(self.expand(x)))))


class ResDWNet(nn.Module):
    def __init__(self, width: int = 32, classes: int = 10):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv1d(1, w, 5, padding=2), nn.BatchNorm1d(w), nn.ReLU())
        self.b1 = Block(w)
        self.down1 = nn.Sequential(nn.Conv1d(w, 2 * w, 3, stride=2, padding=1), nn.BatchNorm1d(2 * w), nn.ReLU())
        self.b2 = Block(2 * w)
        self.down2 = nn.Sequential(nn.Conv1d(2 * w, 2 * w, 3, stride=2, padding=1), nn.BatchNorm1d(2 * w), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * 10, 64), nn.ReLU(), nn.Linear(64, classes))

    def forward(self, x):
        return self.head(self.down2(self.b2(self.down1(self.b1(self.stem(x))))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--train-steps", type=int, default=1200)
    ap.add_argument("--steps", type=int, default=600, help="fine-tune steps after pruning")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--blocks", type=int, default=7)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    data = mnist1d.load_data()
    torch.manual_seed(0)
    base = mnist1d.train(ResDWNet(), data, steps=args.train_steps, lr=args.lr, seed=0).eval()
    t_train = time.perf_counter() - t0
    x1 = data["calib"][0][0][:2]
    pruned = copy.deepcopy(base)
    ctx = Context(example_inputs=x1, progress=False)
    ctx.report.begin_step("structured-prune", {})
    pruned = StructuredPrune(StructuredPrune.Config(ratio=args.ratio, importance="l2")).run(pruned, ctx).eval()
    acc_pruned = mnist1d.evaluate(pruned, data["test"])
    t1 = time.perf_counter()
    mnist1d.train(pruned, data, steps=args.steps, lr=args.lr, seed=1)
    t_ft = time.perf_counter() - t1
    pruned.eval()
    models = {"baseline": base, f"nnsqueeze l2 {args.ratio:.0%}": pruned}
    rows = {}
    for name, m in models.items():
        c = count(m, x1)
        rows[name] = {"acc": mnist1d.evaluate(m, data["test"]), "macs": c.total_macs, "params": c.total_params}
    xb = torch.cat([b[0] for b in data["test"]])[: args.batch]
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for i, (name, m) in enumerate(models.items()):
            paths[name] = Path(tmp) / f"m{i}.onnx"
            fig = export_onnx(m, paths[name], x1, samples=[b[0] for b in data["test"][:2]])
            rows[name]["parity"] = fig.get("max_abs_diff")
            rows[name]["acc_ort"] = ort_accuracy(paths[name], data["test"])
        lat = {n: [] for n in models}
        for _ in range(args.blocks):
            for name in models:
                lat[name].append(ort_latency_ms(paths[name], xb, threads=args.threads, warmup=5, runs=30))
    names = list(models)
    b = rows["baseline"]
    widths = {n: (m.b1.grouped[0].out_channels, m.b1.grouped[0].groups, m.stem[0].out_channels)
              for n, m in models.items()}
    print(f"\n{datetime.date.today()} | {cpu_name()} | torch {torch.__version__} | ORT batch {args.batch}, "
          f"{args.threads} thread(s), {args.blocks} interleaved blocks | train {args.train_steps} steps "
          f"({t_train:.0f}s), prune ratio {args.ratio}, fine-tune {args.steps} steps ({t_ft:.0f}s), lr {args.lr}\n")
    print("| model | acc. after prune | acc. after fine-tune (torch / ORT) | MACs | params | "
          "b1 grouped conv (ch, groups) / stream | ORT latency ms | latency gain | ONNX max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        r = rows[name]
        gain = statistics.median(p / q for p, q in zip(lat["baseline"], lat[name]))
        mac = f"{r['macs']:,}" + ("" if name == "baseline" else f" ({b['macs'] / r['macs']:.2f}x fewer)")
        par = f"{r['params']:,}" + ("" if name == "baseline" else f" ({b['params'] / r['params']:.2f}x fewer)")
        pre = "-" if name == "baseline" else f"{100 * acc_pruned:.1f}%"
        w = widths[name]
        print(f"| {name} | {pre} | {100 * r['acc']:.1f}% / {100 * r['acc_ort']:.1f}% | {mac} | {par} | "
              f"{w[0]}, {w[1]} / {w[2]} | {statistics.median(lat[name]):.3f} | {gain:.2f}x | {r['parity']:.1e} |")


if __name__ == "__main__":
    main()
