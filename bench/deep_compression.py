"""Benchmark: the ``deep-compression`` preset on the demo CNN (MNIST-1D) and on an MLP.

Runs the preset (prune 93% while distilling from the original model -> fold BN -> k-means weight
sharing -> centroid fine-tuning -> entropy-coded artifact), saves the artifact, reloads it with
``nsq.load`` and checks the reloaded model reproduces the compressed one exactly. Prints, per
clustered layer, fp32 bytes vs stored bytes (Huffman-coded relative-index positions + Huffman-coded
cluster indices + fp32 centroids) and, in total, the weights' ratio and the whole
``model.safetensors`` file's ratio (which also holds biases and the safetensors header).
Accuracy is ONNX Runtime's on the 1000-sample test set.

    python bench/deep_compression.py [--model cnn|mlp|both] [--recipe deep-compression] [--train finetune]
        [--shift 8] [--sparsity 0.93] [--bits 4] [--epochs 25,10] [--width 256] [--transfer 20000]

``--shift``/``--sparsity``/``--bits``/``--epochs`` override the preset's distill shift augmentation
(the demo data's training augmentation; the preset itself has none), prune sparsity, Linear bits
and the two training lengths; ``--width`` sets the MLP's hidden width. ``--transfer N`` mixes N
unlabeled MNIST-1D inputs (fresh generator seeds, see ``bench/distill.py``) into the training data:
the distill steps match the original model on them (soft term only), which is how the MLP recovers
from pruning; the accuracy baseline is unchanged (the model as trained on the 4000 labeled samples).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from torch import nn

import nnsqueeze as nsq
from nnsqueeze.env import cpu_model
from nnsqueeze.steps.cluster import clustered_layers
from nnsqueeze.zoo import mnist1d


def build_mlp(width: int = 256) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(40, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 10))


def mlp_pretrained(data: dict, width: int = 256) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_mlp(width)
    return mnist1d.train(model, data, steps=3000, lr=2e-3, weight_decay=1e-2, max_shift=8)


def run(name: str, model: nn.Module, fresh: nn.Module, data: dict, recipe: str | dict, train: list) -> None:
    label = recipe if isinstance(recipe, str) else recipe.pop("_label")
    t0 = time.perf_counter()
    res = nsq.compress(model, recipe, train_data=train, calib_data=data["calib"],
                       eval_data=data["test"], progress=False)
    seconds = time.perf_counter() - t0
    r = res.report
    print(f"\n### {name}: recipe `{label}` ({seconds:.0f} s)\n")
    print("| layer | weights | nonzero | k | fp32 bytes | stored bytes | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    tot_fp32 = tot_stored = 0
    for lname, m in clustered_layers(res.model):
        w = m.weight.detach()
        fp32, stored = 4 * w.numel(), m.stored_bytes()
        tot_fp32, tot_stored = tot_fp32 + fp32, tot_stored + stored
        print(f"| {lname} | {w.numel()} | {int((w != 0).sum())} | {m.centroids.numel()} | {fp32} | {stored} | "
              f"{fp32 / stored:.1f}x |")
    print(f"| **all clustered weights** | | | | {tot_fp32} | {tot_stored} | **{tot_fp32 / tot_stored:.1f}x** |")
    b, c = r["baseline"], r["compressed"]
    print(f"\nmodel.safetensors: {b['archive_bytes']} -> {c['archive_bytes']} bytes "
          f"(**{b['archive_bytes'] / c['archive_bytes']:.1f}x**, biases and header included)")
    print(f"accuracy (ONNX Runtime): {b['accuracy']:.4f} -> {c['accuracy']:.4f} "
          f"({100 * (c['accuracy'] - b['accuracy']):+.1f} points); after each step: "
          + ", ".join(f"{s['name']} {s['figures'].get('accuracy', float('nan')):.3f}" for s in r["steps"]))
    with tempfile.TemporaryDirectory() as d:
        res.save(Path(d) / "out")
        loaded = nsq.load(Path(d) / "out", model=fresh)
        x = torch.cat([b[0] for b in data["test"]])
        with torch.no_grad():
            same = torch.equal(loaded(x), res.model.eval()(x))
        print(f"nsq.load reproduces the compressed model's outputs exactly: {same}; "
              f"ONNX parity max |diff| {r['export']['compressed']['max_abs_diff']:.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["cnn", "mlp", "both"], default="both")
    ap.add_argument("--recipe", default="deep-compression")
    ap.add_argument("--train", choices=["distill", "finetune"], default="distill",
                    help="finetune: the same recipe with the distill steps replaced by plain fine-tuning")
    ap.add_argument("--shift", type=int, default=0, help="shift augmentation in the training steps")
    ap.add_argument("--sparsity", type=float, default=None, help="override the prune step's sparsity")
    ap.add_argument("--bits", type=int, default=None, help="override the cluster step's Linear bits")
    ap.add_argument("--epochs", default=None, help="override the two training lengths, e.g. 60,20")
    ap.add_argument("--width", type=int, default=256, help="MLP hidden width")
    ap.add_argument("--transfer", type=int, default=0, help="unlabeled generated inputs added to the training data")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if a.transfer and a.train == "finetune":
        ap.error("--transfer needs --train distill (unlabeled batches have no hard-label loss)")
    changes = []
    if a.train == "finetune" or a.shift or a.sparsity or a.bits or a.epochs:
        rec = nsq.load_recipe(a.recipe).to_dict()
        epochs = [int(e) for e in a.epochs.split(",")] if a.epochs else None
        trains = 0
        for s in rec["steps"]:
            if a.train == "finetune" and "distill" in s:
                s["finetune"] = {k: v for k, v in s.pop("distill").items()
                                 if k not in ("alpha", "temperature", "hints", "attention")}
            (kind, cfg), = s.items()
            if kind in ("distill", "finetune"):
                if a.shift:
                    cfg["shift"] = a.shift
                if epochs:
                    cfg["epochs"] = epochs[min(trains, len(epochs) - 1)]
                trains += 1
            if kind == "prune" and a.sparsity:
                cfg["sparsity"] = a.sparsity
            if kind == "cluster" and a.bits:
                cfg["bits"] = a.bits
        changes = [f"{k} {v}" for k, v in (("train", a.train), ("shift", a.shift), ("sparsity", a.sparsity),
                                           ("bits", a.bits), ("epochs", a.epochs)) if v and v != "distill"]
        changes = changes or ["no change"]
        rec["_label"] = f"{a.recipe} with " + ", ".join(changes)
        a.recipe = rec
    torch.set_num_threads(a.threads)
    print(f"date {date.today()}, CPU {cpu_model()}, {a.threads} threads, torch {torch.__version__}")
    data = mnist1d.load_data()
    train = data["train"]
    if a.transfer:  # interleave labeled and unlabeled batches in a fixed shuffled order
        from distill import transfer_set  # bench/distill.py

        mixed = data["train"] + transfer_set(a.transfer)
        order = torch.randperm(len(mixed), generator=torch.Generator().manual_seed(7)).tolist()
        train = [mixed[i] for i in order]
        print(f"training data: 4000 labeled samples + {a.transfer} unlabeled generated inputs")
    if a.model in ("cnn", "both"):
        recipe = dict(a.recipe) if isinstance(a.recipe, dict) else a.recipe
        run("demo CNN (MNIST-1D)", mnist1d.pretrained(), mnist1d.build_model(), data, recipe, train)
    if a.model in ("mlp", "both"):
        w = a.width
        recipe = dict(a.recipe) if isinstance(a.recipe, dict) else a.recipe
        run(f"MLP 40-{w}-{w}-10 (MNIST-1D)", mlp_pretrained(data, w), build_mlp(w), data, recipe, train)


if __name__ == "__main__":
    main()
