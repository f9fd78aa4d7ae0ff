"""Benchmark: a small student trained on MNIST-1D from labels alone vs distilled from the demo CNN.

Both students start from the same initialisation and run the same loop (``finetune`` vs
``distill``: same epochs, optimizer, schedule and data, optionally with ``--augment`` fixed shifted
copies of the training set or ``--shift`` on-line random circular shifts, for both); only the loss
differs. With shifts the teacher labels inputs it has not memorised, which is where its soft
targets carry more than the labels. Accuracy is ONNX Runtime's on the 1000-sample test set,
median and min/max over ``--seeds``.

``--transfer N`` adds N unlabeled inputs to the distilled student's data (Hinton's transfer set):
fresh MNIST-1D samples from the generator under other seeds (its labels are dropped, never used),
standardized like the training set; batches of inputs only get the soft term alone. The
labels-only student cannot use unlabeled inputs, so it gets the same number of optimizer steps on
the labeled set instead. Both students see the same 4000 labeled samples.

    python bench/distill.py [--student mlp|wide-mlp|cnn] [--epochs 60] [--seeds 3] [--alpha 0.1] [--temperature 4]
                            [--augment 0] [--shift 0] [--transfer 0]
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


def transfer_set(n: int, batch_size: int = 128) -> list[torch.Tensor]:
    """``n`` unlabeled MNIST-1D inputs (generator seeds 1000, 1001, ...), standardized like load_data."""
    import numpy as np

    from nnsqueeze.zoo.mnist1d import _raw_data

    ref = _raw_data(42, None)["x"]
    mean, std = float(ref.mean(dtype=np.float64)), float(ref.std(dtype=np.float64))
    xs, seed = [], 1000
    while sum(len(x) for x in xs) < n:
        raw = _raw_data(seed, None)
        xs += [raw["x"], raw["x_test"]]
        seed += 1
    x = torch.from_numpy(((np.concatenate(xs)[:n] - mean) / std).astype(np.float32)).unsqueeze(1)
    return [x[i:i + batch_size] for i in range(0, n, batch_size)]


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
    ap.add_argument("--shift", type=int, default=0, help="finetune/distill `shift` augmentation (both students)")
    ap.add_argument("--transfer", type=int, default=0, help="unlabeled generated inputs for the distilled student")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    data = mnist1d.load_data()
    if a.augment:
        data["train"] = augmented(data["train"], a.augment)
    teacher = mnist1d.pretrained()
    distill_train = data["train"]
    if a.transfer:  # interleave labeled and unlabeled batches in a fixed shuffled order
        mixed = data["train"] + transfer_set(a.transfer)
        order = torch.randperm(len(mixed), generator=torch.Generator().manual_seed(7)).tolist()
        distill_train = [mixed[i] for i in order]
    print(f"date {date.today()}, CPU {cpu_model()}, {a.threads} threads, torch {torch.__version__}")
    common = {"steps": a.epochs * len(distill_train), "lr": a.lr, "weight_decay": 1e-2, "schedule": "cosine",
              "shift": a.shift}
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
            train = distill_train if "distill" in step else data["train"]
            res = nsq.compress(student, recipe, train_data=train, calib_data=data["calib"],
                               eval_data=data["test"], teacher=teacher, progress=False)
            results[name].append(res.report["compressed"]["accuracy"])
    params = sum(p.numel() for p in build_student(a.student).parameters())
    print(f"\nstudent {a.student} ({params} parameters), teacher: demo CNN "
          f"({mnist1d.evaluate(teacher, data['test']):.3f}), {a.epochs} epochs, {a.seeds} seeds, "
          f"{a.augment} shifted copies of the training set, shift {a.shift}, transfer set {a.transfer}, "
          f"{common['steps']} optimizer steps each, {time.perf_counter() - t0:.0f} s\n")
    print("| student training | test accuracy (median) | min | max | per seed |")
    print("|---|---:|---:|---:|---|")
    for name, accs in results.items():
        print(f"| {name} | {statistics.median(accs):.3f} | {min(accs):.3f} | {max(accs):.3f} | "
              f"{' '.join(f'{x:.3f}' for x in accs)} |")
    (lab, lab_accs), (dis, dis_accs) = results.items()
    wins = sum(d > b for d, b in zip(dis_accs, lab_accs))
    print(f"\nmedian margin {100 * (statistics.median(dis_accs) - statistics.median(lab_accs)):+.1f} points; "
          f"distilled beats labels-only on {wins}/{len(lab_accs)} seeds")


if __name__ == "__main__":
    main()
