"""Benchmark: a small student trained on MNIST-1D from labels alone vs distilled from the demo CNN.

Both students start from the same initialisation and run the same loop (``finetune`` vs
``distill``: same epochs, optimizer, schedule and data, optionally with ``--augment`` fixed shifted
copies of the training set for both); only the loss differs.
Accuracy is ONNX Runtime's on the 1000-sample test set, mean and min/max over ``--seeds``.

    python bench/distill.py [--student mlp|wide-mlp|cnn] [--epochs 60] [--seeds 3] [--alpha 0.1] [--temperature 4]
                            [--augment 0]
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import date

import torch
from torch import nn

import nnsqueeze as nsq
from nnsqueeze.env import cpu_model
from nnsqueeze.zoo import mnist1d


def build_student(kind: str) -> nn.Module:
    if kind in ("mlp", "wide-mlp"):  # the MNIST-1D paper's MLP (~68% from labels alone there), or wider
        h = 100 if kind == "mlp" else 512
        return nn.Sequential(nn.Flatten(), nn.Linear(40, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 10))
    return nn.Sequential(nn.Conv1d(1, 8, 5, padding=2), nn.ReLU(), nn.Conv1d(8, 16, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(16 * 20, 10))


def augmented(batches: list, copies: int, max_shift: int = 8) -> list:
    """The batches plus ``copies`` shifted copies, reshuffled (the teacher's training augmentation)."""
    g = torch.Generator().manual_seed(123)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    xs, ys = [x], [y]
    for _ in range(copies):
        shift = torch.randint(-max_shift, max_shift + 1, (len(y), 1), generator=g)
        idx = (torch.arange(x.shape[-1]).unsqueeze(0) - shift) % x.shape[-1]
        xs.append(x.gather(2, idx.unsqueeze(1)))
        ys.append(y)
    x, y = torch.cat(xs), torch.cat(ys)
    perm = torch.randperm(len(y), generator=g)
    bs = len(batches[0][1])
    return [(x[perm[i:i + bs]], y[perm[i:i + bs]]) for i in range(0, len(y), bs)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", choices=["mlp", "wide-mlp", "cnn"], default="mlp")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--augment", type=int, default=0, help="add this many randomly shifted copies of the "
                    "training set (circular shifts of up to 8 positions, fixed seed), for both students")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    data = mnist1d.load_data()
    if a.augment:
        data["train"] = augmented(data["train"], a.augment)
    teacher = mnist1d.pretrained()
    print(f"date {date.today()}, CPU {cpu_model()}, {a.threads} threads, torch {torch.__version__}")
    common = {"epochs": a.epochs, "lr": a.lr, "weight_decay": 1e-2, "schedule": "cosine"}
    runs = {"labels only (finetune)": {"finetune": common},
            f"distilled (alpha {a.alpha}, T {a.temperature})": {"distill": dict(common, alpha=a.alpha,
                                                                                temperature=a.temperature)}}
    results: dict[str, list[float]] = {k: [] for k in runs}
    t0 = time.perf_counter()
    for seed in range(a.seeds):
        for name, step in runs.items():
            torch.manual_seed(seed)
            student = build_student(a.student)
            recipe = {"steps": [step], "seed": seed, "evaluate": {"runs": 1, "per_step": False}}
            res = nsq.compress(student, recipe, train_data=data["train"], calib_data=data["calib"],
                               eval_data=data["test"], teacher=teacher, progress=False)
            results[name].append(res.report["compressed"]["accuracy"])
    params = sum(p.numel() for p in build_student(a.student).parameters())
    print(f"\nstudent {a.student} ({params} parameters), teacher: demo CNN "
          f"({mnist1d.evaluate(teacher, data['test']):.3f}), {a.epochs} epochs, {a.seeds} seeds, "
          f"{a.augment} shifted copies of the training set, {time.perf_counter() - t0:.0f} s\n")
    print("| student training | test accuracy (mean) | min | max |")
    print("|---|---:|---:|---:|")
    for name, accs in results.items():
        print(f"| {name} | {statistics.mean(accs):.3f} | {min(accs):.3f} | {max(accs):.3f} |")


if __name__ == "__main__":
    main()
