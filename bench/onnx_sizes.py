"""Benchmark: ONNX file size of low-bit static weights (codes stored at their width) on the demo CNN.

The demo CNN (MNIST-1D, ``nnsqueeze.zoo.mnist1d.pretrained()``) is quantized by the ``quantize``
step with each weight scheme, exported with ``export_onnx`` (verified in ONNX Runtime against the
torch simulation), and compared with the fp32 export and the ``int8`` preset's export. Columns:
ONNX bytes, ratio to fp32 / to int8, weight containers in the file, ORT accuracy on the 1000 test
samples, ORT kernels, median ORT latency (batch 128). ``(opset 17 kept)`` rows: the same model with
the opset-21 upgrade disabled (what happens when ONNX's version converter cannot convert a model):
int8 codes for symmetric per-channel weights, com.microsoft int4 DequantizeLinear otherwise.
``(float constants)`` rows: the export before low-bit storage (the quantized weight traced as a
float constant, which ONNX Runtime then re-quantizes to per-tensor int8 itself), for comparison.

    python bench/onnx_sizes.py [--threads 1] [--runs 50]
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import tempfile
from datetime import date

import torch

from nnsqueeze.context import Context
from nnsqueeze.env import cpu_model
from nnsqueeze.export import lowbit
from nnsqueeze.quant import fakequant_export
from nnsqueeze.errors import ExportError
from nnsqueeze.export.onnx import export_onnx, verify_onnx
from nnsqueeze.export.ort import OrtModule, ort_latency_ms
from nnsqueeze.metrics import accuracy
from nnsqueeze.steps.quantize import Quantize
from nnsqueeze.zoo import mnist1d

QUIET = logging.getLogger("bench.onnx_sizes")
QUIET.setLevel(logging.ERROR)

SCHEMES = {
    "int8 preset (w8 per-channel sym)": {"bits": 8, "reduce_range": "auto"},
    "w4 per-channel sym": {"bits": 4},
    "w4 per-channel sym (opset 17 kept)": {"bits": 4},
    "w4 per-channel asym": {"bits": 4, "symmetric": False},
    "w4 per-channel asym (opset 17 kept)": {"bits": 4, "symmetric": False},
    "w4 per-channel asym (float constants)": {"bits": 4, "symmetric": False},
    "w4 g16 sym": {"bits": 4, "granularity": "per-group", "group_size": 16},
    "w4 g16 asym": {"bits": 4, "granularity": "per-group", "group_size": 16, "symmetric": False},
    "w4 g16 sym (float constants)": {"bits": 4, "granularity": "per-group", "group_size": 16},
    "nf4": {"bits": 4, "levels": "nf4"},
    "nf4 (float constants)": {"bits": 4, "levels": "nf4"},
    "w2 per-channel sym": {"bits": 2},
    "w2 per-channel asym": {"bits": 2, "symmetric": False},
    "w6 per-channel asym": {"bits": 6, "symmetric": False},
}


def quantize(base: torch.nn.Module, weights: dict, data) -> torch.nn.Module:
    ctx = Context(calib_data=data["calib"], progress=False, log=QUIET)
    ctx.report.begin_step("quantize", {})
    cfg = {"weights": weights, "calibration": {"method": "minmax", "samples": 512}}
    return Quantize(Quantize.Config.model_validate(cfg)).run(copy.deepcopy(base), ctx).eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = mnist1d.load_data()
    base = mnist1d.pretrained().eval()
    test = data["test"]
    x = test[0][0]
    rows = []
    marker, upgrade = fakequant_export.lowbit_weight, lowbit._upgrade_to_21
    with tempfile.TemporaryDirectory() as d:
        def run(name: str, model: torch.nn.Module) -> None:
            path = os.path.join(d, "m.onnx")
            try:
                figs = export_onnx(model, path, x[:8], samples=[x])
                diff = f"{figs['max_abs_diff']:.2g}"
            except ExportError as e:   # recorded, not hidden: export unverified to measure it anyway
                figs = export_onnx(model, path, x[:8], verify=False)
                diff = f"FAILS parity: {e.problem.split(' on ')[0].replace('ONNX Runtime output 0 ', '')}"
                figs.update(verify_onnx(model, open(path, "rb").read(), [x], True, atol=1e9))
            acc = accuracy(OrtModule(path, threads=args.threads), test)
            ms = ort_latency_ms(path, x, threads=args.threads, warmup=5, runs=args.runs)
            kernels = figs.get("ort_int8_ops") or figs.get("ort_float_ops") or {}
            rows.append((name, os.path.getsize(path), figs.get("lowbit_weights") or
                         ({"int8": figs["int8_weights"]} if figs.get("int8_weights") else {"float": "all"}),
                         acc, kernels, ms, diff))

        run("fp32", base)
        for name, w in SCHEMES.items():
            model = quantize(base, w, data)
            if "float constants" in name:   # the traced weight stays a float constant (no marker)
                fakequant_export.lowbit_weight = lambda layer, w, *group: w
            if "opset 17 kept" in name:     # as when ONNX's version converter cannot upgrade a model
                lowbit._upgrade_to_21 = lambda model: "disabled for comparison"
            try:
                run(name, model)
            finally:
                fakequant_export.lowbit_weight, lowbit._upgrade_to_21 = marker, upgrade
    fp32, int8 = rows[0][1], rows[1][1]
    print(f"# ONNX sizes, demo CNN (MNIST-1D), {date.today()}, {cpu_model()}, {args.threads} thread(s), "
          f"latency median of {args.runs} runs, batch {x.shape[0]}")
    print("| model | ONNX bytes | / fp32 | / int8 preset | weights stored as | ORT accuracy | ORT kernels | "
          "latency ms | max abs diff vs torch |")
    print("|---|---:|---:|---:|---|---:|---|---:|---:|")
    for name, size, store, acc, kern, ms, diff in rows:
        kern_s = ", ".join(f"{k} {v}" for k, v in sorted(kern.items()))
        store_s = ", ".join(f"{k} x{v}" if isinstance(v, int) else k for k, v in store.items())
        print(f"| {name} | {size} | {size / fp32:.3f} | {size / int8:.3f} | {store_s} | {acc:.4f} | {kern_s} | "
              f"{ms:.3f} | {diff} |")


if __name__ == "__main__":
    main()
