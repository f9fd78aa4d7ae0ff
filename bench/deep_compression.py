"""Benchmark: the ``deep-compression`` preset on the demo CNN (MNIST-1D) and on an MLP.

Runs the preset (prune 93% while distilling from the original model -> fold BN -> k-means weight
sharing -> centroid fine-tuning -> entropy-coded artifact), saves the artifact, reloads it with
``nsq.load`` and checks the reloaded model reproduces the compressed one exactly. Prints, per
clustered layer, fp32 bytes vs stored bytes (Huffman-coded relative-index positions + Huffman-coded
cluster indices + fp32 centroids) and, in total, the weights' ratio and the whole
``model.safetensors`` file's ratio (which also holds biases and the safetensors header).
Accuracy is ONNX Runtime's on the 1000-sample test set.

    python bench/deep_compression.py [--model cnn|mlp|both] [--recipe deep-compression] [--train finetune]
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


def build_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 10))


def mlp_pretrained(data: dict) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_mlp()
    return mnist1d.train(model, data, steps=3000, lr=2e-3, weight_decay=1e-2, max_shift=8)


def run(name: str, model: nn.Module, fresh: nn.Module, data: dict, recipe: str | dict) -> None:
    t0 = time.perf_counter()
    res = nsq.compress(model, recipe, train_data=data["train"], calib_data=data["calib"],
                       eval_data=data["test"], progress=False)
    seconds = time.perf_counter() - t0
    r = res.report
    label = recipe if isinstance(recipe, str) else "deep-compression with finetune instead of distill"
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
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if a.train == "finetune":
        rec = nsq.load_recipe(a.recipe).to_dict()
        for s in rec["steps"]:
            if "distill" in s:
                cfg = {k: v for k, v in s.pop("distill").items() if k not in ("alpha", "temperature", "hints")}
                s["finetune"] = cfg
        a.recipe = rec
    torch.set_num_threads(a.threads)
    print(f"date {date.today()}, CPU {cpu_model()}, {a.threads} threads, torch {torch.__version__}")
    data = mnist1d.load_data()
    if a.model in ("cnn", "both"):
        run("demo CNN (MNIST-1D)", mnist1d.pretrained(), mnist1d.build_model(), data, a.recipe)
    if a.model in ("mlp", "both"):
        run("MLP 40-256-256-10 (MNIST-1D)", mlp_pretrained(data), build_mlp(), data, a.recipe)


if __name__ == "__main__":
    main()
