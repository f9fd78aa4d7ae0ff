"""Benchmark: low-rank factorization (truncated SVD for Linear, Tucker-2 for Conv1d) of the demo CNN.

``lowrank`` with a per-layer weight budget, then fine-tuning (``distill`` from the original model
by default, or ``finetune`` with ``--train finetune``). Reports the parameters of the Linear/conv
layers before and after, accuracy in ONNX Runtime on the test set, and the ONNX Runtime latency
(median of ``--runs`` at batch 256, ``--threads`` threads) of the exported fp32 models.

    python bench/lowrank.py [--budget 0.4] [--ignore features.0 classifier.2] [--epochs 20]
                            [--train distill|finetune] [--runs 50] [--sensitivity TOL]

``--sensitivity TOL`` replaces the budget by the per-layer sensitivity rule (each layer's smallest
candidate rank keeping the calibration loss within ``TOL`` (absolute) of the original's).
"""

from __future__ import annotations

import argparse
import time
from datetime import date

import torch
from torch import nn

import nnsqueeze as nsq
from nnsqueeze.env import cpu_model
from nnsqueeze.zoo import mnist1d


def layer_params(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=0.4)
    ap.add_argument("--ignore", nargs="*", default=["features.0", "classifier.2"],
                    help="layers left dense (the first conv has 160 weights, the last Linear 1280)")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--train", choices=["distill", "finetune"], default="distill")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--sensitivity", type=float, default=None)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"date {date.today()}, CPU {cpu_model()}, {a.threads} threads, torch {torch.__version__}")
    data = mnist1d.load_data()
    model = mnist1d.pretrained()
    train = {"epochs": a.epochs, "lr": a.lr}
    if a.train == "distill":
        train.update(alpha=0.3, temperature=2.0)
    rule = {"sensitivity": a.sensitivity} if a.sensitivity else {"budget": a.budget}
    recipe = {"steps": [{"lowrank": dict(rule, ignore=a.ignore)}, {a.train: train}],
              "evaluate": {"latency_batch": 256, "threads": a.threads, "runs": a.runs, "warmup": 10}}
    t0 = time.perf_counter()
    res = nsq.compress(model, recipe, train_data=data["train"], calib_data=data["calib"], eval_data=data["test"],
                       progress=False)
    r = res.report
    print(f"\nrecipe: lowrank {rule} ignore {a.ignore} -> {a.train} {train} "
          f"({time.perf_counter() - t0:.0f} s)\n")
    print("| layer | kind | ranks | weights before | after | sensitivity budget |")
    print("|---|---|---|---:|---:|---:|")
    for name, f in r["layers"].items():
        if "ranks" in f:
            print(f"| {name} | {f['lowrank']} | {f['ranks']} | {f['params_before']} | {f['params_after']} | "
                  f"{f.get('sensitivity_budget', '')} |")
    for name, why in [(s.get("layer"), s.get("reason")) if isinstance(s, dict) else (s, "") for s in r["skipped"]]:
        print(f"| {name} | skipped | {why} | | |")
    b, c = r["baseline"], r["compressed"]
    pb, pc = layer_params(model), layer_params(res.model)
    lb, lc = b["latency_ms"]["onnxruntime"], c["latency_ms"]["onnxruntime"]
    after_lr = r["steps"][0]["figures"].get("accuracy", float("nan"))
    print(f"\n| | baseline | low-rank + {a.train} |\n|---|---:|---:|")
    print(f"| Linear/conv weights | {pb} | {pc} ({pb / pc:.2f}x fewer) |")
    print(f"| accuracy (ONNX Runtime) | {b['accuracy']:.4f} | {c['accuracy']:.4f} "
          f"({100 * (c['accuracy'] - b['accuracy']):+.1f} points; {after_lr:.4f} before fine-tuning) |")
    print(f"| ORT latency, batch 256, {a.threads} threads (ms) | {lb:.3f} | {lc:.3f} ({lc / lb:.2f}x) |")
    print(f"| ONNX file (bytes) | {b['size_bytes']} | {c['size_bytes']} |")


if __name__ == "__main__":
    main()
