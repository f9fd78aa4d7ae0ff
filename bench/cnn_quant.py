"""Benchmark: quantization algorithms on the demo CNN (MNIST-1D), side by side with ONNX Runtime's
static quantizer, every model evaluated in ONNX Runtime on the same 1000 test samples.

Rows: fp32; ORT ``quantize_static`` (QDQ, per-channel, minmax, same 512 calibration samples);
nnsqueeze int8 PTQ (the ``int8`` preset's step); W4A8 nearest rounding vs AdaRound; int4 QAT
(``qat`` + ``finetune``, LSQ, BN folded on the fly); mixed int8/int4/fp32 under a 4x-smaller size
budget. Targets (issue #3): int8 drop <= 0.2 pt, W4A8 AdaRound <= 1 pt, int4 QAT <= 0.5 pt, mixed
<= 0.3 pt. ``packed`` is the artifact's weight bytes (int4 codes two per byte); the ONNX file
stores 2-4-bit codes as int4 too (``nnsqueeze/export/lowbit.py``).

    python bench/cnn_quant.py [--qat-steps 600] [--threads 1] [--only "int8 PTQ,mixed"]
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import tempfile
import time
from collections import Counter
from datetime import date

import numpy as np
import onnxruntime as ort
import torch

from nnsqueeze.context import Context
from nnsqueeze.env import cpu_model
from nnsqueeze.export.onnx import INT8_OPS, export_onnx
from nnsqueeze.export.ort import OrtModule, optimized_op_types
from nnsqueeze.metrics import accuracy
from nnsqueeze.quant.modules import fake_quant_modules
from nnsqueeze.registry import STEPS
from nnsqueeze.zoo import mnist1d

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from demo_vs_ort import ort_static  # noqa: E402

QUIET = logging.getLogger("bench.cnn_quant")
QUIET.setLevel(logging.ERROR)


def packed_bytes(model: torch.nn.Module) -> int:
    """Bytes of the state dict as the artifact stores it (quantized layers packed)."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for name, m in fake_quant_modules(model):
        m.pack_state(sd, f"{name}.")
    return sum(v.numel() * v.element_size() for v in sd.values())


def run_steps(model, steps: list[tuple[str, dict]], data) -> tuple[torch.nn.Module, Context]:
    ctx = Context(train_data=data["train"], calib_data=data["calib"], eval_data=data["test"],
                  metric=accuracy, progress=False, log=QUIET)
    for name, cfg in steps:
        ctx.report.begin_step(name, cfg)
        cls = STEPS.get(name)
        model = cls(cls.Config.model_validate(cfg)).run(model, ctx)
    return model.eval(), ctx


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--qat-steps", type=int, default=600)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="", help="comma-separated substrings: run only the matching systems")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = mnist1d.load_data()
    base = mnist1d.pretrained().eval()
    test, calib = data["test"], data["calib"]
    x8 = test[0][0][:8]
    w = {"reduce_range": "auto"}
    systems = {
        "nnsqueeze int8 PTQ (int8 preset)": [("quantize", {"weights": {"bits": 8, **w}})],
        "nnsqueeze W4A8 nearest": [("quantize", {"weights": {"bits": 4}})],
        "nnsqueeze W4A8 per-tensor": [("quantize", {"weights": {"bits": 4, "granularity": "per-tensor"}})],
        "nnsqueeze W4A8 per-tensor + CLE": [("quantize", {"weights": {"bits": 4, "granularity": "per-tensor"},
                                                          "equalize": {"method": "cle", "iterations": 2}})],
        "nnsqueeze W4A8 mse-clip": [("quantize", {"weights": {"bits": 4, "clip": "mse"}})],
        "nnsqueeze W4A8 AdaRound": [("quantize", {"weights": {"bits": 4, "adaround": {"iters": 1000,
                                                                                       "samples": 512}}})],
        "nnsqueeze W4A8 mse-clip + AdaRound": [("quantize", {"weights": {
            "bits": 4, "clip": "mse", "adaround": {"iters": 1000, "samples": 512}}})],
        f"nnsqueeze int4 QAT ({args.qat_steps} steps)": [
            ("qat", {"weights": {"bits": 4}, "lsq": True, "freeze_bn_after": args.qat_steps // 2}),
            ("finetune", {"steps": args.qat_steps, "lr": 1e-3, "schedule": "cosine", "shift": 8})],
        "nnsqueeze mixed int8/int4/fp32, size <= fp32/4": [
            ("mixed", {"formats": ["int8", "int4", "fp32"], "budget": {"size_ratio": 0.25, "max_metric_drop": 0.003}})],
    }
    if args.only:
        keys = [k.strip() for k in args.only.split(",") if k.strip()]
        systems = {n: v for n, v in systems.items() if any(k in n for k in keys)}
    rows = []
    with tempfile.TemporaryDirectory() as d:
        fp32_path = os.path.join(d, "fp32.onnx")
        export_onnx(base, fp32_path, x8)
        fp32_bytes = sum(p.numel() * 4 for p in base.parameters())
        base_acc = accuracy(OrtModule(fp32_path, threads=args.threads), test)
        rows.append(("fp32 (ONNX Runtime)", base_acc, fp32_bytes, os.path.getsize(fp32_path), 0.0, "", ""))
        t = time.perf_counter()
        ort_path = os.path.join(d, "ort.onnx")
        ort_static(fp32_path, ort_path, calib)
        ort_secs = time.perf_counter() - t
        ort_ops = Counter(t for t in optimized_op_types(open(ort_path, "rb").read()) if t in INT8_OPS)
        ort_acc = accuracy(OrtModule(ort_path, threads=args.threads), test)
        rows.append(("ORT quantize_static QDQ per-channel minmax", ort_acc, None, os.path.getsize(ort_path), ort_secs,
                     ",".join(f"{k}x{v}" for k, v in sorted(ort_ops.items())), ""))
        for name, steps in systems.items():
            t = time.perf_counter()
            model, ctx = run_steps(copy.deepcopy(base), steps, data)
            secs = time.perf_counter() - t
            path = os.path.join(d, "m.onnx")
            figs = export_onnx(model, path, x8, samples=[test[1][0]])
            acc = accuracy(OrtModule(path, threads=args.threads), test)
            note = ""
            last = ctx.report.steps[0]["figures"]
            if "formats" in last:
                note = " ".join(f"{k}:{v}" for k, v in last["formats"].items())
            if "equalized_pairs" in last:
                note = f"{len(last['equalized_pairs'])} pairs equalized"
            if "adaround_layers" in last:
                note = f"AdaRound kept learned rounding on {last['adaround_layers']}/{last['quantized_layers']} layers"
            kernels = ",".join(f"{k}x{v}" for k, v in figs["ort_int8_ops"].items())
            rows.append((name, acc, packed_bytes(model), os.path.getsize(path), secs, kernels, note))
            print(f"done: {name} {100 * acc:.2f}% ({secs:.1f} s)", file=sys.stderr)

    print(f"# demo CNN on MNIST-1D (1000 test samples, 512 calibration), {date.today()}, CPU: {cpu_model()}, "
          f"threads {args.threads}; torch {torch.__version__}, onnxruntime {ort.__version__}")
    print("| system | ORT accuracy | change | packed weights | ONNX file | ORT int8 kernels | time (s) | notes |")
    print("|---|---|---|---|---|---|---|---|")
    for name, acc, packed, onnx_size, secs, kernels, note in rows:
        packed_s = "-" if packed is None else f"{packed / 1024:.0f} KiB ({fp32_bytes / packed:.2f}x smaller)"
        print(f"| {name} | {100 * acc:.2f}% | {100 * (acc - base_acc):+.2f} pt | {packed_s} | "
              f"{onnx_size / 1024:.0f} KiB | {kernels or '-'} | {secs:.1f} | {note} |")


if __name__ == "__main__":
    np.random.seed(0)
    main()
