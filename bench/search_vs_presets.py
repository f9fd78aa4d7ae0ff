"""Benchmark: does a searched front beat the shipped presets? (issue #15, demo CNN).

Runs every shipped preset that applies to the MNIST-1D demo CNN through ``nsq.compress`` with the
search's evaluation settings, then looks for a trial on the search's Pareto front (``front.json``)
that dominates each preset: no larger metric drop, no more ONNX bytes and a speed-up at least as
large. Speed-ups are each run's compressed ONNX Runtime latency against the fp32 baseline measured
in the same run (a ratio, so a machine-wide load shifts both sides), and the front's against the
median of its trials' baselines.

    nnsqueeze search --model nnsqueeze.zoo.mnist1d:pretrained --data mnist1d --space cnn \\
        --max-drop 0.02 --trials 40 --out search-cnn
    python bench/search_vs_presets.py search-cnn
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from datetime import date
from pathlib import Path

import torch

import nnsqueeze as nsq
from nnsqueeze.env import cpu_model
from nnsqueeze.recipe import load_recipe, presets
from nnsqueeze.zoo import mnist1d

# Presets written for other model kinds (language models, BERT encoders): not measured here.
SKIP = {"int8-dynamic-bert", "w4-g128-gptq", "w4-g128-quarot-gptq"}


def measure(name: str, model, data, evaluate: dict) -> dict:
    raw = load_recipe(name).to_dict()
    raw["evaluate"] = {**raw.get("evaluate", {}), **evaluate}
    res = nsq.compress(model, raw, train_data=data["train"], calib_data=data["calib"], eval_data=data["test"],
                       progress=False)
    b, c = res.report["baseline"], res.report["compressed"]
    return {"preset": name, "drop": b["accuracy"] - c["accuracy"], "size_bytes": c["size_bytes"],
            "speedup": b["latency_ms"]["onnxruntime"] / c["latency_ms"]["onnxruntime"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("search_dir")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("nnsqueeze").setLevel(logging.ERROR)
    front = json.loads((Path(args.search_dir) / "front.json").read_text())
    rows = front["front"]  # Pareto-optimal feasible trials: if any trial dominates a preset, one of these does
    model, data = mnist1d.pretrained(), mnist1d.load_data()
    evaluate = {"latency_batch": 256, "threads": args.threads, "runs": 10, "warmup": 3}
    print(f"# search front vs presets, {date.today()}, CPU {cpu_model()}, {os.cpu_count()} cores, "
          f"threads {args.threads}; front: {len(rows)} trials")
    print("| preset | drop (pt) | ONNX bytes | speed-up | dominated by front trial |")
    print("|---|---|---|---|---|")
    for name in sorted(presets()):
        if name in SKIP:
            continue
        try:
            p = measure(name, model, data, evaluate)
        except nsq.NnsqueezeError as e:
            print(f"| {name} | n/a: {str(e).splitlines()[0][:80]} | | | |")
            continue
        dom = [r for r in rows if r["drop"] <= p["drop"] + 1e-12 and r["size_bytes"] <= p["size_bytes"]
               and r["speedup"] >= p["speedup"]]
        best = min(dom, key=lambda r: r["size_bytes"]) if dom else None
        print(f"| {name} | {100 * p['drop']:.2f} | {p['size_bytes']:,} | {p['speedup']:.2f}x | "
              + (f"trial {best['trial']}: {100 * best['drop']:.2f} pt, {best['size_bytes']:,} B, "
                 f"{best['speedup']:.2f}x" if best else "none") + " |")


if __name__ == "__main__":
    main()
