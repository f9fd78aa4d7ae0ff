"""Benchmark: the demo's CNN on MNIST-1D, nnsqueeze vs ONNX Runtime's own static quantizer.

Same model, same calibration samples (512), same test set (1000), same machine, same run.
Accuracy is measured by running each ONNX model in ONNX Runtime; latency is the median of
``--runs`` calls at batch 256 with ``--threads`` intra-op threads, all models timed in turns.

    python bench/demo_vs_ort.py [--runs 50] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from datetime import date

import numpy as np
import onnxruntime as ort
import torch

import nnsqueeze as nsq
from nnsqueeze.env import cpu_model
from nnsqueeze.export.ort import OrtModule
from nnsqueeze.metrics import accuracy
from nnsqueeze.zoo import mnist1d


def ort_static(fp32_path: str, out_path: str, calib: list) -> None:
    """ONNX Runtime's documented static QDQ flow: pre-process, then per-channel minmax."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            name = ort.InferenceSession(fp32_path, providers=["CPUExecutionProvider"]).get_inputs()[0].name
            self.it = iter([{name: x.numpy()} for x, _ in calib])

        def get_next(self):
            return next(self.it, None)

    pre = out_path + ".pre.onnx"
    quant_pre_process(fp32_path, pre)
    quantize_static(pre, out_path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    os.remove(pre)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    data = mnist1d.load_data()
    model = mnist1d.pretrained()
    test, calib = data["test"], data["calib"]
    x256 = torch.cat([x for x, _ in test])[:256]

    with tempfile.TemporaryDirectory() as d:
        paths = {"fp32 (ONNX Runtime)": os.path.join(d, "fp32.onnx")}
        nsq.export_onnx(model, paths["fp32 (ONNX Runtime)"], example_inputs=x256[:8])
        t = time.perf_counter()
        paths["ORT quantize_static QDQ per-channel minmax"] = os.path.join(d, "ort.onnx")
        ort_static(paths["fp32 (ONNX Runtime)"], paths["ORT quantize_static QDQ per-channel minmax"], calib)
        secs = {"ORT quantize_static QDQ per-channel minmax": time.perf_counter() - t}
        for preset in ("int8", "prune-int8"):
            t = time.perf_counter()
            r = nsq.compress(model, preset, train_data=data["train"], calib_data=calib, eval_data=test,
                             progress=False)
            key = f"nnsqueeze {preset}"
            secs[key] = time.perf_counter() - t
            paths[key] = os.path.join(d, f"{preset}.onnx")
            nsq.export_onnx(r, paths[key])

        sessions = {}
        for k, p in paths.items():
            so = ort.SessionOptions()
            so.intra_op_num_threads = args.threads
            so.inter_op_num_threads = 1
            sessions[k] = ort.InferenceSession(p, so, providers=["CPUExecutionProvider"])
        feed = x256.numpy()
        times = {k: [] for k in sessions}
        for s in sessions.values():  # warm-up
            for _ in range(5):
                s.run(None, {s.get_inputs()[0].name: feed})
        # Rounds of blocks: each model runs 10 calls in a row (an idle ORT pool stops spinning between
        # blocks, so sessions don't steal each other's cores); rounds spread load changes over all.
        for _ in range(max(1, args.runs // 10)):
            for k, s in sessions.items():
                for _ in range(10):
                    t = time.perf_counter()
                    s.run(None, {s.get_inputs()[0].name: feed})
                    times[k].append((time.perf_counter() - t) * 1e3)
                time.sleep(0.05)

        base_ms = statistics.median(times["fp32 (ONNX Runtime)"])
        base_size = os.path.getsize(paths["fp32 (ONNX Runtime)"])
        rows = []
        for k, p in paths.items():
            acc = accuracy(OrtModule(p, threads=args.threads), test)
            ms = statistics.median(times[k])
            rows.append((k, acc, os.path.getsize(p), ms, base_ms / ms, os.path.getsize(p) / base_size, secs.get(k)))

    base_acc = rows[0][1]
    print(f"# demo CNN on MNIST-1D, {date.today()}, CPU: {cpu_model()}, threads {args.threads}, "
          f"batch 256, median of {args.runs}; torch {torch.__version__}, onnxruntime {ort.__version__}")
    print("| system | ORT accuracy | change | size | size vs fp32 | ORT latency (ms) | speed vs fp32 | time (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for k, acc, size, ms, speed, ratio, s in rows:
        print(f"| {k} | {100 * acc:.2f}% | {100 * (acc - base_acc):+.2f} pt | {size / 1024:.0f} KiB | "
              f"{100 * ratio:.1f}% | {ms:.3f} | {speed:.2f}x | {'-' if s is None else f'{s:.1f}'} |")


if __name__ == "__main__":
    np.random.seed(0)
    main()
